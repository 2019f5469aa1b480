"""TwiML that connects a call to callspeak, and the public URLs it points at.

Pure functions: no I/O, no configuration lookups. The XML is built with the ``twilio`` package's
``VoiceResponse`` so escaping is the library's, and every input Twilio would silently mangle or
reject at call time is refused here with a :class:`TwiMLError` that says how to fix it.

Twilio references:
https://www.twilio.com/docs/voice/twiml/stream and https://www.twilio.com/docs/voice/twiml/connect
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal
from urllib.parse import SplitResult, quote_plus, urlsplit

from twilio.twiml.voice_response import Connect, Parameter, Stream, VoiceResponse

from callspeak.base_urls import checked_base_url

__all__ = [
    "MAX_PARAMETER_LENGTH",
    "MAX_SAY_BYTES",
    "MAX_SAY_URL_ENCODED",
    "TwiMLError",
    "connect_stream_twiml",
    "say_problem",
    "stream_url_from_public",
    "webhook_url_from_public",
    "xml_text_problem",
]

MAX_PARAMETER_LENGTH: Final = 500
"""Twilio's limit: a ``<Parameter>``'s name plus value must be shorter than this (characters)."""

MAX_SAY_BYTES: Final = 3000
"""Twilio's limit on a ``<Say>``'s text, in UTF-8 bytes: 3000 with a Polly voice, 4096 with the
basic ones (warning 13521 beyond). A ``<Say>`` without ``voice=`` speaks with the account's
default voice, which the Console may set to Polly: the lower limit is the one that always holds."""

MAX_SAY_URL_ENCODED: Final = 4500
"""Twilio's other limit on a ``<Say>``'s text: its length URL-encoded (warning 13521)."""

_CALLBACK_METHODS: Final = frozenset({"GET", "POST"})


class TwiMLError(ValueError):
    """TwiML, or a URL meant for it, that Twilio would reject or silently change."""


def connect_stream_twiml(
    stream_url: str,
    *,
    say: str | None = None,
    parameters: Mapping[str, str] | None = None,
    stream_name: str | None = None,
    status_callback: str | None = None,
    status_callback_method: str = "POST",
) -> str:
    """Return TwiML that (optionally, when not blank) says ``say``, then opens a
    bidirectional Media Stream.

    Shape (no XML declaration; attributes in the library's sorted order)::

        <Response>[<Say>say</Say>]<Connect><Stream url="wss://…" [name=…]
            [statusCallback=… statusCallbackMethod=…]>[<Parameter name=… value=…/>…]
        </Stream></Connect></Response>

    ``<Connect>`` (not ``<Start>``) is what makes the stream bidirectional: with ``<Start>`` Twilio
    only forks the caller's audio and ignores media sent back. The call stays inside ``<Connect>``
    while the WebSocket is open; TwiML after ``</Connect>`` runs only once the server closes the
    socket, so this document ends there and the server hangs up (REST) or closes when done.

    ``parameters`` (written in mapping order) arrive in the ``start`` message's
    ``customParameters``; they are the only way to pass per-call data, as Twilio refuses a stream
    URL with a query string.
    ``statusCallbackMethod`` is written only when ``status_callback`` is given.

    Raises :class:`TwiMLError` for: a ``stream_url`` that is not ``wss://host/…`` or that has a
    query string or fragment; a URL with a port that is not 1 to 65535 in plain digits, a user
    name or password, or a malformed host; a ``say`` Twilio's ``<Say>`` cannot take whole
    (:func:`say_problem`); an empty parameter name; a parameter whose name and value together
    are :data:`MAX_PARAMETER_LENGTH` characters or more; a ``status_callback`` that is not an
    absolute ``http(s)`` URL; a ``status_callback_method`` other than GET or POST.
    """
    _check_stream_url(stream_url)
    params = dict(parameters or {})
    for name, value in params.items():
        _check_parameter(name, value)
    method = status_callback_method.upper()
    if status_callback is not None:
        _check_callback_url(status_callback)
        if method not in _CALLBACK_METHODS:
            raise TwiMLError(
                f"status_callback_method must be GET or POST, not {status_callback_method!r}"
            )

    if say is not None:
        _check_say(say)
    response = VoiceResponse()
    if say is not None and say.strip():  # an empty or blank one says nothing: no <Say/>
        response.say(say)
    stream = Stream(
        url=stream_url,
        name=stream_name,
        status_callback=status_callback,
        status_callback_method=method if status_callback is not None else None,
    )
    for name, value in params.items():
        stream.append(Parameter(name=name, value=value))
    connect = Connect()
    connect.append(stream)
    response.append(connect)
    xml: str = response.to_xml(xml_declaration=False)
    return xml


def stream_url_from_public(public_url: str, path: str = "/twilio") -> str:
    """Map the server's public base URL to the Media Stream URL for ``<Stream url=…>``.

    ``https://host[:port][/prefix]`` becomes ``wss://host[:port][/prefix]/twilio``. ``http://``
    becomes ``ws://``, which is only useful against a local Twilio emulator: real Twilio refuses
    ``ws://`` (error 31922) and :func:`connect_stream_twiml` refuses it too.

    Raises :class:`TwiMLError` if ``public_url`` is not an absolute http(s) URL with a valid
    port, or if it or ``path`` carries a query string or fragment (Twilio would strip or refuse
    it).
    """
    if "?" in path or "#" in path:
        raise TwiMLError(
            f"stream path {path!r} has a query string or fragment; Twilio refuses those on "
            "<Stream url>, pass per-call data as <Parameter> instead"
        )
    base = _check_public_url(public_url)
    scheme = urlsplit(base).scheme  # lower-cased; same length as what the user typed
    return ("wss" if scheme == "https" else "ws") + base[len(scheme) :] + _normalise_path(path)


def webhook_url_from_public(public_url: str, path: str) -> str:
    """Join the server's public base URL and a webhook path: ``https://host[/prefix]/voice``.

    ``path`` may carry a query string (Twilio signs the URL including it); ``public_url`` may not.
    Raises :class:`TwiMLError` if ``public_url`` is not an absolute http(s) URL with a valid port
    and without a query string or fragment.
    """
    return _check_public_url(public_url) + _normalise_path(path)


def _check_public_url(public_url: str) -> str:
    """Return ``public_url`` without a trailing slash, or raise :class:`TwiMLError`: an absolute
    http(s) URL with a host, a valid port and no query string or fragment."""
    try:
        return checked_base_url(
            "public URL",
            public_url,
            "http(s)",
            "e.g. https://example.ngrok.app (http:// only for a local emulator)",
        )
    except ValueError as exc:
        raise TwiMLError(str(exc)) from None


def _normalise_path(path: str) -> str:
    return path if path.startswith("/") else "/" + path


def xml_text_problem(value: str) -> str | None:
    """Why ``value`` cannot be written into TwiML, or None. XML 1.0 has no way to write most
    control characters (not even escaped): TwiML holding one is not XML, and Twilio cannot
    read it."""
    for index, char in enumerate(value):
        if (
            (char < " " and char not in "\t\n\r")
            or char in "\ufffe\uffff"
            or ("\ud800" <= char <= "\udfff")
        ):
            return f"holds {char!r} at character {index}, which XML (and so TwiML) cannot carry"
    return None


def _check_xml_text(what: str, value: str) -> None:
    problem = xml_text_problem(value)
    if problem is not None:
        raise TwiMLError(f"{what} {problem}")


def say_problem(say: str) -> str | None:
    """Why Twilio's ``<Say>`` cannot speak ``say`` whole, or None: over :data:`MAX_SAY_BYTES`,
    or over the :data:`MAX_SAY_URL_ENCODED` characters Twilio also counts (URL-encoded: non-ASCII
    text is three characters a byte there)."""
    size = len(say.encode())
    encoded = len(quote_plus(say))
    if size <= MAX_SAY_BYTES and encoded <= MAX_SAY_URL_ENCODED:
        return None
    measure = (
        f"{size} bytes (UTF-8), over the {MAX_SAY_BYTES}"
        if size > MAX_SAY_BYTES
        else f"{encoded} characters URL-encoded, over the {MAX_SAY_URL_ENCODED}"
    )
    return f"is {measure} Twilio's <Say> takes (warning 13521)"


def _check_say(say: str) -> None:
    _check_xml_text("the <Say> text", say)
    problem = say_problem(say)
    if problem is not None:
        raise TwiMLError(
            f"the <Say> text {problem}: shorten it, or have callspeak speak it (the 'say' "
            "parameter, or the greeting)"
        )


def _check_url_text(what: str, url: str) -> None:
    _check_xml_text(what, url)
    if any(char.isspace() for char in url):
        raise TwiMLError(f"{what} {url!r} holds a space or line break: Twilio cannot use it")


def _split(url: str) -> SplitResult | None:
    """``urlsplit(url)``, or None where it raises ("wss://[::1"): :func:`_check_authority`
    then says why, naming the URL."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _check_authority(
    what: str, url: str, schemes: Literal["http(s)", "ws(s)"], example: str
) -> None:
    """The host, port and credentials of ``url`` (its query string aside), checked as the
    public URL's are: a port from 1 to 65535 in plain digits, no user name or password, a host
    urlsplit can read."""
    try:
        checked_base_url(what, url.partition("?")[0], schemes, example)
    except ValueError as exc:
        raise TwiMLError(str(exc)) from None


def _check_stream_url(url: str) -> None:
    _check_url_text("stream URL", url)
    if "?" in url or "#" in url:
        raise TwiMLError(
            f"stream URL {url!r} has a query string or fragment, which Twilio strips or "
            "refuses; pass per-call data as <Parameter>s instead (`parameters`; --param on the "
            "command line)"
        )
    parts = _split(url)
    if parts is not None and (parts.scheme != "wss" or not parts.hostname):
        raise TwiMLError(
            f"stream URL {url!r} must start with wss:// and name a host: Twilio only opens "
            "secure WebSockets for <Stream> (build it from the server's https:// public URL)"
        )
    _check_authority("stream URL", url, "ws(s)", "e.g. wss://example.ngrok.app/twilio")


def _check_parameter(name: str, value: str) -> None:
    if not name:
        raise TwiMLError("<Parameter> names must not be empty")
    _check_xml_text("a <Parameter> name", name)
    _check_xml_text(f"<Parameter> {name!r}", value)
    if len(name) + len(value) >= MAX_PARAMETER_LENGTH:
        raise TwiMLError(
            f"<Parameter> {name!r}: name plus value is {len(name) + len(value)} characters, "
            f"Twilio allows fewer than {MAX_PARAMETER_LENGTH}; pass an id and look the data "
            "up server-side instead"
        )


def _check_callback_url(url: str) -> None:
    _check_url_text("status_callback", url)
    parts = _split(url)
    if parts is not None and (parts.scheme not in ("https", "http") or not parts.hostname):
        # Read by Python callers and command-line users alike: both names, as for --param.
        raise TwiMLError(
            f"status_callback {url!r} must be an absolute http(s) URL Twilio can reach, e.g. "
            "https://example.ngrok.app/status (`status_callback`; --status-callback on the "
            "command line)"
        )
    _check_authority("status_callback", url, "http(s)", "e.g. https://example.ngrok.app/status")
