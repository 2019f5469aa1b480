"""Outbound call control through Twilio's REST API: place a call, hang up, redirect.

A thin wrapper over the ``twilio`` package's ``Client``, which is synchronous (``requests``). The
CLI calls it directly; async code must call it with ``asyncio.to_thread`` so a slow Twilio never
blocks the event loop. Each method is one HTTP request with a timeout; nothing is retried here
(``TwilioApiError.retryable`` tells the caller whether retrying could help). Twilio answers every
request made here with a JSON object; any other reply (a proxy's or captive portal's HTML page, a
wrong base URL) is a :class:`TwilioApiError` naming the URL, the status and the start of the body.

The API base URL is configurable (:attr:`TwilioCredentials.api_base_url`) so tests and the local
emulator can point the client at :class:`callspeak.testing.fake_twilio_rest.FakeTwilioRest`.
``TWILIO_REGION``, ``TWILIO_EDGE``, ``TWILIO_ACCOUNT_SID`` and ``TWILIO_AUTH_TOKEN`` in the
environment are ignored: the twilio client would otherwise silently rewrite the host (or fill in
missing credentials); to use a Twilio region, set the regional host as ``api_base_url``.

https://www.twilio.com/docs/voice/api/call-resource
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http import HttpClient
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from callspeak.twiml import TwiMLError

__all__ = [
    "CALL_STATUS_EVENTS",
    "DEFAULT_API_BASE_URL",
    "MAX_TWIML_LENGTH",
    "TwilioApiError",
    "TwilioConnectionError",
    "TwilioCredentials",
    "TwilioError",
    "TwilioRestClient",
]

DEFAULT_API_BASE_URL: Final = "https://api.twilio.com"
MAX_TWIML_LENGTH: Final = 4000
"""Twilio refuses inline ``Twiml`` longer than this many characters (error 32018)."""
CALL_STATUS_EVENTS: Final = ("initiated", "ringing", "answered", "completed")
"""The values ``StatusCallbackEvent`` accepts, in the order a call goes through them."""

_CALL_SID: Final = re.compile(r"CA[0-9a-f]{32}")


@dataclass(frozen=True)
class TwilioCredentials:
    """An account's REST credentials. ``auth_token`` is kept out of ``repr`` so it is never logged.

    ``api_base_url`` is ``https://api.twilio.com`` in production, a regional host
    (``https://api.dublin.ie1.twilio.com``) to use a region, or a fake's loopback URL in tests.
    """

    account_sid: str
    auth_token: str = field(repr=False)
    api_base_url: str = DEFAULT_API_BASE_URL

    def __post_init__(self) -> None:
        # The twilio client falls back to TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN when given an
        # empty string, so an empty value here would silently use whatever the environment holds.
        if not self.account_sid or not self.auth_token:
            raise ValueError("Twilio account_sid and auth_token must both be non-empty")
        parts = urlsplit(self.api_base_url)
        if (
            parts.scheme not in ("https", "http")
            or not parts.hostname
            or parts.query
            or parts.fragment
        ):
            raise ValueError(
                f"api_base_url {self.api_base_url!r} must be an absolute http(s) URL without a "
                f"query string or fragment, e.g. {DEFAULT_API_BASE_URL}"
            )


class TwilioError(Exception):
    """Base class for failures talking to Twilio's REST API."""


class TwilioApiError(TwilioError):
    """Twilio answered with an error status, or something answered that is not Twilio's JSON.

    ``status`` is the HTTP status, ``code`` Twilio's error code (https://www.twilio.com/docs/errors/
    + code) when it gave one, ``message`` its explanation (for a reply that is not Twilio's JSON,
    the URL and the start of the body).
    """

    def __init__(
        self, status: int, code: int | None, message: str, *, method: str = "", uri: str = ""
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.uri = uri

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again may succeed (429 and 5xx)."""
        return self.status == 429 or self.status >= 500

    def __str__(self) -> str:
        code = f" (Twilio error {self.code})" if self.code is not None else ""
        return f"Twilio API HTTP {self.status}{code}: {self.message}"


class TwilioConnectionError(TwilioError):
    """Twilio could not be reached or did not answer in time (DNS, TCP, TLS, timeout)."""


class TwilioRestClient:
    """Place and control calls for one account.

    ``http_client`` replaces the twilio package's ``requests``-based transport (the seam for
    recording or failing transports); when omitted, one is created with a ``timeout`` in seconds
    per request, and :meth:`close` releases its connection pool.
    """

    def __init__(
        self,
        credentials: TwilioCredentials,
        *,
        http_client: HttpClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._owns_http_client = http_client is None
        self._http_client: HttpClient = (
            http_client if http_client is not None else TwilioHttpClient(timeout=timeout)
        )
        client = Client(
            username=credentials.account_sid,
            password=credentials.auth_token,
            account_sid=credentials.account_sid,
            http_client=_JsonOnlyHttpClient(self._http_client),
        )
        # ClientBase.get_hostname rewrites every request's host when edge or region is set, and
        # the constructor reads both from os.environ; the base URL below must be used verbatim.
        client.edge = None
        client.region = None
        # Every Calls request is built from the Api domain's base_url (Domain.absolute_url).
        client.api.base_url = credentials.api_base_url.rstrip("/")
        self._client = client
        self._account_sid = credentials.account_sid

    def place_call(
        self,
        *,
        to: str,
        from_: str,
        twiml: str,
        status_callback: str | None = None,
        status_callback_events: Sequence[str] = CALL_STATUS_EVENTS,
    ) -> str:
        """Start an outbound call that runs ``twiml`` when answered; return its call SID.

        ``status_callback_events`` are sent only with a ``status_callback`` URL. Raises
        :class:`callspeak.twiml.TwiMLError` for TwiML over :data:`MAX_TWIML_LENGTH` characters,
        :class:`ValueError` for an unknown status event, :class:`TwilioApiError` when Twilio refuses
        (or the reply is not Twilio's JSON) and :class:`TwilioConnectionError` when it cannot be
        reached.
        """
        _check_twiml(twiml)
        unknown = [e for e in status_callback_events if e not in CALL_STATUS_EVENTS]
        if unknown:
            raise ValueError(
                f"unknown status_callback_events {unknown}; choose from {list(CALL_STATUS_EVENTS)}"
            )
        kwargs: dict[str, Any] = {"to": to, "from_": from_, "twiml": twiml}
        if status_callback is not None:
            kwargs["status_callback"] = status_callback
            kwargs["status_callback_event"] = list(status_callback_events)
        call = self._call_twilio(lambda: self._calls().create(**kwargs))
        sid: str = call.sid
        return sid

    def hangup(self, call_sid: str) -> None:
        """End a call (``Status=completed``). Raises like :meth:`place_call`."""
        _check_call_sid(call_sid)
        self._call_twilio(lambda: self._calls()(call_sid).update(status="completed"))

    def redirect(self, call_sid: str, twiml: str) -> None:
        """Replace a live call's TwiML with ``twiml``. Raises like :meth:`place_call`."""
        _check_call_sid(call_sid)
        _check_twiml(twiml)
        self._call_twilio(lambda: self._calls()(call_sid).update(twiml=twiml))

    def close(self) -> None:
        """Release the connection pool of a transport this client created; never an injected one."""
        session = getattr(self._http_client, "session", None)
        if self._owns_http_client and session is not None:
            session.close()

    def __enter__(self) -> TwilioRestClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _calls(self) -> Any:
        # client.api.account.calls, not client.api.calls: the latter emits a DeprecationWarning.
        return self._client.api.account.calls

    def _call_twilio(self, request: Callable[[], Any]) -> Any:
        try:
            return request()
        except TwilioRestException as exc:
            # Without a Twilio code in the body the library puts the HTTP status in `code`;
            # Twilio's codes are five digits, so an equal value means "no code".
            code = None if exc.code == exc.status else exc.code
            raise TwilioApiError(
                exc.status, code, _strip_prefix(exc.msg), method=exc.method, uri=exc.uri
            ) from exc
        except TwilioServiceException as exc:  # RFC 9457 "problem details" errors
            message = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
            raise TwilioApiError(
                exc.status, exc.code, message, method=exc.method, uri=exc.uri
            ) from exc
        except OSError as exc:  # every requests.RequestException is an OSError
            raise TwilioConnectionError(f"could not reach Twilio: {exc}") from exc


class _JsonOnlyHttpClient(HttpClient):  # type: ignore[misc]
    """Passes requests to ``inner``; raises :class:`TwilioApiError` for a reply that is not a JSON
    object, before the twilio package parses it.

    The package would raise ``json.JSONDecodeError`` for a 2xx reply that is not JSON, and turn a
    non-2xx one into a bare "Unable to create record" without the body that explains it.
    """

    def __init__(self, inner: HttpClient) -> None:
        super().__init__(inner.logger, inner.is_async, inner.timeout)
        self._inner = inner

    def request(self, method: str, uri: str, **kwargs: Any) -> Any:
        response = self._inner.request(method, uri, **kwargs)
        if response.status_code == 204:  # No Content (a DELETE): nothing to parse
            return response
        text = response.text or ""
        try:
            is_object = isinstance(json.loads(text), dict)
        except ValueError:  # json.JSONDecodeError, or bytes that are not UTF-8
            is_object = False
        if not is_object:
            start = " ".join(text.split())[:_BODY_START]
            body = f"the body starts {start!r}" if start else "the body is empty"
            raise TwilioApiError(
                response.status_code,
                None,
                f"{method} {uri} answered with something other than Twilio's JSON ({body}): "
                "check the API base URL; a proxy or captive portal may be answering instead",
                method=method,
                uri=uri,
            )
        return response


_BODY_START: Final = 120
"""Characters of a reply that is not Twilio's JSON quoted in the error."""


def _strip_prefix(message: str) -> str:
    # The twilio package prefixes Twilio's message with "Unable to create record: " etc.
    for prefix in ("Unable to create record: ", "Unable to update record: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _check_twiml(twiml: str) -> None:
    if len(twiml) > MAX_TWIML_LENGTH:
        raise TwiMLError(
            f"TwiML is {len(twiml)} characters; Twilio accepts at most {MAX_TWIML_LENGTH} inline "
            "(error 32018): shorten the <Say> text or serve the TwiML from a webhook URL"
        )


def _check_call_sid(call_sid: str) -> None:
    if not _CALL_SID.fullmatch(call_sid):
        raise ValueError(f"{call_sid!r} is not a call SID (CA followed by 32 hex digits)")
