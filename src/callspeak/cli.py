"""``callspeak`` command line.

* ``serve`` — the server; refuses to start while signature validation is on without
  ``TWILIO_AUTH_TOKEN`` and ``CALLSPEAK_PUBLIC_URL`` (``--no-validate-signatures`` for local work).
* ``dial`` — one emulated Twilio call (optionally signing its upgrade like Twilio).
* ``demo`` — a loopback server plus one emulated call; needs no Twilio account.
* ``twiml`` — print TwiML for a TwiML Bin.
* ``call`` / ``end-call`` — place and end real calls through Twilio's REST API (credentials from
  ``TWILIO_ACCOUNT_SID`` / ``TWILIO_AUTH_TOKEN``, base URL from ``CALLSPEAK_TWILIO_API_URL``).
* ``calls`` / ``say`` / ``clear`` / ``hangup`` — clients of the server's control API
  (``api_client.py``): list live calls, speak into one, stop its speech, end its media stream.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from callspeak import __version__, eventloop
from callspeak.config import ConfigError, Settings
from callspeak.logs import flush_logs

if TYPE_CHECKING:  # the emulator is imported when a call is placed, not for every command
    from callspeak.emulator import CallReport

__all__ = ["main"]

#: ``serve`` flags and the settings they set (flag → field); flags win over CALLSPEAK_* variables.
_SERVE_FLAGS: dict[str, dict[str, Any]] = {
    "host": {"help": "address to listen on (CALLSPEAK_HOST, default 127.0.0.1)"},
    "port": {"type": int, "help": "port (CALLSPEAK_PORT, default 5000)"},
    "public-url": {"help": "URL Twilio reaches this server at (CALLSPEAK_PUBLIC_URL)"},
    "greeting": {"help": "spoken when a call starts without a 'say' parameter"},
    "notice": {"help": "optional <Say> text in the /voice TwiML (CALLSPEAK_NOTICE)"},
    "tts": {"choices": ["auto", "piper", "deepgram", "deepgram-ws"], "help": "voice engine"},
    "piper-model": {"help": "path to a Piper .onnx voice (default: bundled joe)"},
    "synth-workers": {"type": int, "help": "synthesis threads (0 = one per core)"},
    "piper-cache-mb": {"type": float, "help": "cache of rendered sentences (0 = none)"},
    "deepgram-model": {"help": "Deepgram Aura model (CALLSPEAK_DEEPGRAM_MODEL)"},
    "deepgram-url": {"help": "Deepgram REST base URL (CALLSPEAK_DEEPGRAM_URL)"},
    "deepgram-ws-url": {"help": "Deepgram WebSocket base URL (CALLSPEAK_DEEPGRAM_WS_URL)"},
    "max-lead-ms": {"type": int, "help": "how far audio may run ahead of playback"},
    "barge-in": {
        "action": argparse.BooleanOptionalAction,
        "help": "stop interruptible speech when the caller talks (default on)",
    },
    "vad-aggressiveness": {"type": int, "help": "voice activity detection, 0..3 (default 2)"},
    "min-speech-ms": {"type": int, "help": "caller speech that counts as barge-in (default 100)"},
    "interrupt-digits": {"help": "DTMF digits that stop interruptible speech, e.g. '#'"},
    "max-message-bytes": {"type": int, "help": "largest inbound WebSocket message"},
    "max-calls": {"type": int, "help": "concurrent media streams (CALLSPEAK_MAX_CALLS, 100)"},
    "idle-timeout": {
        "type": float,
        "help": "close a stream after this many seconds with no inbound message (30)",
    },
    "max-text-chars": {"type": int, "help": "longest text spoken at once (5000)"},
    "no-validate-signatures": {
        "dest": "validate_signatures",
        "action": "store_const",
        "const": False,
        "help": "do not check X-Twilio-Signature (local development only)",
    },
    "call-token": {
        "action": "store_const",
        "const": True,
        "help": "require a one-time /voice token in each stream's start (CALLSPEAK_CALL_TOKEN)",
    },
    "certfile": {"help": "TLS certificate (PEM) to serve https:// and wss:// directly"},
    "keyfile": {"help": "TLS private key (PEM) for --certfile"},
    # In any case, as CALLSPEAK_LOG_LEVEL: --log-level INFO as Python and uvicorn spell it.
    "log-level": {"type": str.lower, "choices": ["debug", "info", "warning", "error"]},
    "log-format": {"type": str.lower, "choices": ["text", "json"]},
}


class UsageError(Exception):
    """A command line that cannot be carried out; main() prints it and exits 2."""


def _dest(flag: str) -> str:
    dest: str = _SERVE_FLAGS[flag].get("dest", flag.replace("-", "_"))
    return dest


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        _dest(flag): getattr(args, _dest(flag))
        for flag in _SERVE_FLAGS
        if getattr(args, _dest(flag), None) is not None
    }
    return Settings(**overrides)


def _env_settings() -> Settings:
    """Settings from CALLSPEAK_* / TWILIO_* variables alone (for twiml, call, end-call)."""
    return _settings_from(argparse.Namespace())


def _parse_params(pairs: Sequence[str], flag: str = "--param") -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"{flag} takes name=value, not {pair!r}")
        params[name] = value
    return params


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more ("nan" and "inf" parse as floats
    and failed only once the call was under way)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be a finite number, 0 or more")
    return value


def _parse_dtmf(items: Sequence[str]) -> list[tuple[float, str]]:
    from callspeak.protocol import DTMF_DIGITS

    out = []
    for item in items:
        at, sep, digits = item.partition(":")
        try:
            when = _seconds(at)
        except argparse.ArgumentTypeError:
            raise UsageError(f"--dtmf takes SECONDS:DIGITS, not {item!r}") from None
        if not sep or not digits:
            raise UsageError(f"--dtmf takes SECONDS:DIGITS, not {item!r}")
        if bad := sorted(set(digits) - DTMF_DIGITS):
            raise UsageError(
                f"--dtmf {item!r}: {''.join(bad)!r} is no key Twilio reports (0-9, *, #, A-D)"
            )
        out += [(when + 0.1 * i, d) for i, d in enumerate(digits)]
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callspeak", description="Speak text-to-speech into live Twilio phone calls."
    )
    parser.add_argument("--version", action="version", version=f"callspeak {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (TwiML, media stream, health)")
    _add_serve_flags(serve)
    serve.add_argument(
        "--hooks",
        metavar="MODULE:NAME",
        help="a CallHooks object scripting calls, e.g. examples.menu:hooks",
    )

    dial = sub.add_parser("dial", help="place an emulated Twilio call against a server")
    dial.add_argument("url", help="the server's media stream URL, e.g. ws://127.0.0.1:5000/twilio")
    _add_dial_flags(dial)

    demo = sub.add_parser("demo", help="start a server and place one emulated call against it")
    demo.add_argument(
        "--wav", default="demo.wav", help="where to write what the caller heard (default: demo.wav)"
    )
    demo.add_argument("--say", help="text to speak instead of the greeting")
    _add_serve_flags(
        demo,
        # The demo's call never fetches TwiML, so a notice (a <Say> in it) is never heard.
        skip={
            "host",
            "port",
            "public-url",
            "notice",
            "no-validate-signatures",
            "call-token",
            "certfile",
            "keyfile",
        },
    )

    twiml = sub.add_parser("twiml", help="print TwiML that connects a call (for a TwiML Bin)")
    twiml.add_argument(
        "--url", help="the wss:// stream URL (default: from CALLSPEAK_PUBLIC_URL + /twilio)"
    )
    _add_twiml_flags(twiml)

    call = sub.add_parser("call", help="place a real outbound call through Twilio's REST API")
    call.add_argument("--to", required=True, help="the number to call, E.164 (+15551234567)")
    call.add_argument("--from", dest="from_", required=True, help="your Twilio number, E.164")
    call.add_argument(
        "--url", help="the wss:// stream URL (default: from CALLSPEAK_PUBLIC_URL + /twilio)"
    )
    _add_twiml_flags(call)

    end_call = sub.add_parser("end-call", help="end a call through Twilio's REST API")
    end_call.add_argument("call_sid", metavar="CALLSID")
    _add_api_commands(sub)
    return parser


def _add_api_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from callspeak.api_client import add_api_arguments

    add_api_arguments(sub)


def _add_twiml_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--say", help="text callspeak speaks (sent as the 'say' <Parameter>)")
    parser.add_argument("--notice", help="text Twilio itself says (<Say>) before connecting")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another <Parameter> (arrives in start.customParameters); repeatable",
    )
    parser.add_argument(
        "--status-callback",
        help="URL for stream (and call) status callbacks (default: CALLSPEAK_PUBLIC_URL/status)",
    )


def _add_serve_flags(parser: argparse.ArgumentParser, skip: set[str] | None = None) -> None:
    for flag, options in _SERVE_FLAGS.items():
        if skip and flag in skip:
            continue
        parser.add_argument(f"--{flag}", default=None, **options)


def _add_dial_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a <Parameter> (arrives in start.customParameters); repeatable",
    )
    parser.add_argument("--wav", help="write what the caller heard to this WAV file")
    parser.add_argument("--audio", help="a WAV file the caller speaks (sent as inbound media)")
    parser.add_argument("--audio-at", type=_seconds, default=0.0, help="when the caller starts it")
    parser.add_argument(
        "--dtmf",
        action="append",
        default=[],
        metavar="SECONDS:DIGITS",
        help="press DIGITS at SECONDS after start; repeatable",
    )
    parser.add_argument("--duration", type=_seconds, help="hang up after this many seconds")
    parser.add_argument(
        "--quiet",
        type=_seconds,
        default=1.0,
        help="without --duration: hang up after this much silence once speech was heard",
    )
    parser.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--sign-with",
        metavar="AUTH_TOKEN",
        help="sign the upgrade with x-twilio-signature like Twilio (visible in ps: testing only)",
    )
    parser.add_argument(
        "--signed-url",
        metavar="WSS_URL",
        help="the URL to sign, as written in the TwiML (default: the dial URL with wss://)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "dial":
            return eventloop.run(_dial(args))
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "twiml":
            return _twiml(args)
        if args.command == "call":
            return _call(args)
        if args.command == "end-call":
            return _hangup(args)
        if args.command in ("calls", "say", "clear", "hangup"):
            from callspeak.api_client import run_api_command

            return run_api_command(args)
    except ValidationError as exc:
        return _refused(f"invalid setting: {_one_line(exc)}")
    except (ConfigError, UsageError) as exc:
        return _refused(str(exc))
    except ValueError as exc:
        # (Imported here: the voices pull numpy in, which the API commands do without.)
        from callspeak.voices import VoiceSetupError

        if not isinstance(exc, VoiceSetupError):
            raise
        return _refused(str(exc))
    except KeyboardInterrupt:
        return 130
    finally:
        flush_logs()  # what the command logged is written before it returns
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover - parser.error exits


def _refused(message: str) -> int:
    """Say why the command cannot run, after the lines it logged, and return the usage exit."""
    flush_logs()
    print(f"callspeak: {message}", file=sys.stderr)
    return 2


def _one_line(exc: ValidationError) -> str:
    """The problems pydantic found, one line (no input values: they may be secrets), each
    setting named as a user sets it too (see :func:`_setting_names`)."""
    problems = []
    for error in exc.errors():
        field = ".".join(map(str, error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        named = _setting_names(field)
        if message.startswith(field):
            problems.append(named + message[len(field) :])
        else:
            problems.append(f"{named}: {message}")
    return "; ".join(problems)


def _setting_names(field: str) -> str:
    """``field`` with the variable and the ``serve`` flag that set it, e.g. ``max_calls
    (CALLSPEAK_MAX_CALLS, --max-calls)``: the field's name alone sent users looking. ``field``
    as it is when it is no setting."""
    from callspeak.config import Settings

    info = Settings.model_fields.get(field)
    if info is None:
        return field
    choices = getattr(info.validation_alias, "choices", [])
    aliases = [c for c in choices if isinstance(c, str) and c.isupper()]
    prefix = str(Settings.model_config.get("env_prefix", "")).upper()
    names = [aliases[0] if aliases else f"{prefix}{field.upper()}"]
    if field.replace("_", "-") in _SERVE_FLAGS:
        names.append(f"--{field.replace('_', '-')}")
    return f"{field} ({', '.join(names)})"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from callspeak.logs import configure_logging
    from callspeak.server import create_app

    settings = _settings_from(args)
    problem = settings.signature_problem()
    if problem is not None:  # before anything is set up: the message is the whole output
        raise ConfigError(problem)
    _check_can_listen(settings.host, settings.port)
    _check_tls_files(settings.certfile, settings.keyfile)
    configure_logging(settings.log_level, settings.log_format)
    _warn_of_unknown_variables()
    app = create_app(
        settings, hooks=_load_hooks(args.hooks) if args.hooks else None, freeze_heap=True
    )
    with _VoiceStartGuard(app, settings) as guard, _log_flushed_on_sigterm():
        try:
            uvicorn.run(guard, **uvicorn_options(settings, app))
        except SystemExit:  # uvicorn's exit 3 when the app did not start
            guard.raise_if_failed()
            raise
    return 0


@contextlib.contextmanager
def _log_flushed_on_sigterm() -> Iterator[None]:
    """While the server runs, SIGTERM writes the log lines still queued before it ends the
    process. uvicorn shuts down on SIGTERM, then raises it again with the handler it found
    there — the default, which ended the process at once: before main()'s flush_logs() and
    the exit's, so the lines queued behind a slow log reader (the shutdown's own among them)
    were lost. The process still ends by the signal, as supervisors expect."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def flush_then_end(signum: int, frame: object) -> None:
        flush_logs()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    previous = signal.signal(signal.SIGTERM, flush_then_end)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _VoiceStartGuard:
    """The app, as uvicorn runs it, but a voice that cannot start (a Piper model that is not
    one, say) is not the lifespan traceback uvicorn logs for any start-up failure: it is kept
    for :meth:`raise_if_failed`, which the command reports in one line once uvicorn has given
    up. Any other start-up failure is a bug, and uvicorn logs it as it would. Used as a
    context manager around the server's run (it filters uvicorn's log meanwhile)."""

    _UVICORN_LINE = "Application startup failed. Exiting."

    def __init__(self, app: Any = None, settings: Settings | None = None) -> None:
        #: The app made by create_app from ``settings`` (the demo sets both once it made them).
        self.app = app
        self.settings = settings
        self.error: Exception | None = None

    def __enter__(self) -> _VoiceStartGuard:
        # uvicorn's own last line on a failed start says nothing the command will not.
        logging.getLogger("uvicorn.error").addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("uvicorn.error").removeFilter(self)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        from callspeak.tts.piper import PiperUnavailable
        from callspeak.voices import VoiceSetupError

        held: list[Any] = []  # the failure message (the traceback) until its cause is known

        async def hold_failure(message: Any) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except (PiperUnavailable, VoiceSetupError) as exc:
            if held:
                self.error = exc
                held[0] = {**held[0], "message": ""}
            raise
        finally:
            for message in held:
                await send(message)

    def filter(self, record: Any) -> bool:
        """A logging filter: uvicorn's own last word is dropped once the reason is kept."""
        return self.error is None or record.getMessage() != self._UVICORN_LINE

    def raise_if_failed(self) -> None:
        """Raise :class:`ConfigError` saying why the voice did not start, if it did not."""
        if self.error is None:
            return
        chosen = self.settings is not None and self.settings.piper_model is not None
        hint = " (--piper-model / CALLSPEAK_PIPER_MODEL)" if chosen else ""
        raise ConfigError(f"the voice cannot start: {self.error}{hint}") from None


def _warn_of_unknown_variables() -> None:
    """Log a warning for each CALLSPEAK_* environment variable nothing reads: a misspelt
    setting (CALLSPEAK_MAXCALLS) was silently ignored, and its default used."""
    from callspeak.config import unknown_variables

    log = logging.getLogger("callspeak.config")
    for variable, close in unknown_variables(os.environ):
        advice = f"did you mean {close}?" if close else "see the README for the settings"
        log.warning("%s is not a callspeak setting and is ignored: %s", variable, advice)


def _check_can_listen(host: str, port: int) -> None:
    """Raise :class:`ConfigError` if ``host:port`` cannot be bound — a port in use, an address
    not of this machine — now, in one line, rather than after the voice has loaded (seconds)
    and through uvicorn's start-up. Bound and released at once: uvicorn binds it again."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"cannot listen on {host}:{port}: {reason} (CALLSPEAK_PORT / --port, "
                "CALLSPEAK_HOST / --host)"
            ) from None


#: Where ``serve`` is told its certificate and key, for the errors that name them.
_CERTFILE = "CALLSPEAK_CERTFILE / --certfile"
_KEYFILE = "CALLSPEAK_KEYFILE / --keyfile"


def _check_tls_files(certfile: str | None, keyfile: str | None) -> None:
    """Raise :class:`ConfigError` naming the setting to fix if ``certfile`` and ``keyfile`` (both
    or neither: Settings checks that) cannot serve TLS — a file missing or unreadable, not PEM,
    a key that is not the certificate's or is encrypted — now, in one line, rather than as
    uvicorn's traceback after the voice has loaded."""
    if certfile is None or keyfile is None:
        return
    import ssl

    for path, setting in ((certfile, _CERTFILE), (keyfile, _KEYFILE)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"cannot read TLS file {path!r}: {reason} ({setting})") from None
    asked_for_password = False

    def no_password() -> bytes:
        # Without this callback OpenSSL would prompt on the terminal (and uvicorn again after).
        nonlocal asked_for_password
        asked_for_password = True
        return b""

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile, no_password)
    except ssl.SSLError as exc:
        # OpenSSL says "PEM lib" for any file it cannot parse: find which one it was.
        if asked_for_password:
            problem = (
                f"the TLS key {keyfile!r} is encrypted and callspeak cannot ask for its pass "
                f"phrase: give an unencrypted key ({_KEYFILE})"
            )
        elif not _holds_a_certificate(certfile):
            problem = f"{certfile!r} holds no PEM certificate ({_CERTFILE})"
        elif exc.reason is None:  # "PEM lib", and the certificate parsed
            problem = f"{keyfile!r} holds no PEM private key ({_KEYFILE})"
        elif exc.reason == "KEY_VALUES_MISMATCH":
            problem = (
                f"the TLS key {keyfile!r} is not the key of the certificate {certfile!r} "
                f"({_KEYFILE}, {_CERTFILE})"
            )
        else:
            problem = (
                f"cannot serve TLS with {certfile!r} and {keyfile!r}: {exc.reason} "
                f"({_CERTFILE}, {_KEYFILE})"
            )
        raise ConfigError(problem) from None


def _holds_a_certificate(path: str) -> bool:
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        return False
    return True


def _load_hooks(spec: str) -> Any:
    import importlib

    from callspeak.hooks import CallHooks

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--hooks takes MODULE:NAME, not {spec!r}")
    sys.path.insert(0, ".")  # scripts next to where the user runs the server
    try:
        hooks = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load --hooks {spec}: {exc}") from exc
    if not isinstance(hooks, CallHooks):
        raise UsageError(f"--hooks {spec} is a {type(hooks).__name__}, not a CallHooks")
    return hooks


#: Seconds ``callspeak serve`` waits on SIGTERM for requests other than calls to finish.
GRACEFUL_SHUTDOWN_SECONDS = 10
#: Seconds a kept-alive connection may sit idle between requests (uvicorn's 5 s by default).
#: Longer than common HTTP clients keep an idle pooled connection (httpx 5 s, aiohttp 15 s,
#: Node's 4–5 s; nginx's own default is 75 s, Go's client keeps one 90 s): a server closing one
#: as the client sends on it fails that request, and a ``POST /say`` is not sent again by any
#: client (in a soak, 17 of 12 000 with httpx at uvicorn's default).
KEEP_ALIVE_SECONDS = 75


def uvicorn_options(settings: Settings, app: Any) -> dict[str, Any]:
    """The keyword arguments ``callspeak serve`` gives ``uvicorn.run`` for ``app`` (made by
    :func:`~callspeak.server.create_app` from ``settings``): address, logging, TLS, and the
    WebSocket protocol that serves ``/twilio`` without ASGI."""
    from callspeak.request_head import BoundedHeadProtocol
    from callspeak.uvicorn_ws import uvicorn_ws_protocol

    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "log_level": settings.log_level,
        # A hard cap far above the soft limit the session enforces: a message between the two
        # is logged and ignored; beyond this one uvicorn closes the socket (1009).
        "ws_max_size": max(16 * settings.max_message_bytes, 1024 * 1024),
        "ws_per_message_deflate": False,
        # httptools (llhttp, in C) parses requests: with h11, parsing the upgrade requests was
        # ~15 % of the server's CPU when 200 calls arrived together. Its subclass bounds the
        # time a request's head may take (a connection that sends nothing, or slowloris).
        "http": BoundedHeadProtocol,
        # /twilio without ASGI (media_socket.py); other WebSocket paths get uvicorn's
        # websockets-sansio, which had the steadiest 20 ms pacing of its options (measured in
        # bench/framework_choice.py, like the native path).
        "ws": uvicorn_ws_protocol(app),
        # On SIGTERM calls end at once (1012); this bounds the wait for any other request still
        # open (a stalled client), after which uvicorn cancels it and the app shuts down.
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        # Serving wss:// directly; behind a TLS-terminating proxy or tunnel leave both unset.
        "ssl_certfile": settings.certfile,
        "ssl_keyfile": settings.keyfile,
    }


def _dial_options(args: argparse.Namespace, url: str) -> Any:
    from callspeak.emulator import DialOptions

    caller_audio = b""
    if args.audio:
        from callspeak.audio.convert import convert_all
        from callspeak.audio.wav import read_wav

        fmt, data = read_wav(Path(args.audio))
        caller_audio = convert_all(fmt, data)
    return DialOptions(
        url=url,
        parameters=_parse_params(args.param),
        caller_audio=caller_audio,
        caller_audio_at=args.audio_at,
        dtmf=_parse_dtmf(args.dtmf),
        duration=args.duration,
        quiet_seconds=args.quiet,
        headers=_parse_params(args.header, "--header"),
        sign_with=args.sign_with,
        signed_url=args.signed_url,
    )


async def _dial(args: argparse.Namespace) -> int:
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.uri import parse_uri

    from callspeak.audio.wav import WavError
    from callspeak.emulator import dial

    try:
        parse_uri(args.url)
    except (InvalidURI, ValueError) as exc:  # urlsplit's own, for "ws://h:99999", "ws://[::1"
        raise UsageError(f"dial takes a ws:// or wss:// URL: {exc}") from exc
    try:
        options = _dial_options(args, args.url)
    except (OSError, WavError) as exc:
        raise UsageError(f"cannot use --audio {args.audio}: {exc}") from exc
    try:
        report = await dial(options)
    except InvalidURI as exc:
        raise UsageError(f"dial takes a ws:// or wss:// URL: {exc}") from exc
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        status = exc.response.status_code
        reason = body or "(no reason given)"
        print(f"callspeak: the server refused the call: HTTP {status} {reason}", file=sys.stderr)
        return 1
    except (OSError, InvalidHandshake) as exc:  # refused, unreachable, timed out, TLS, not WS
        reason = str(exc) or type(exc).__name__
        print(f"callspeak: the call to {args.url} failed: {reason}", file=sys.stderr)
        return 1
    print(report.timeline())
    if args.wav:
        try:
            report.write_wav(args.wav)
        except OSError as exc:
            print(f"callspeak: cannot write --wav {args.wav}: {exc}", file=sys.stderr)
            return 1
        print(_wrote(args.wav, report))
    return 0 if report.first_audio_at is not None else 1


def _wrote(path: str, report: CallReport) -> str:
    """The line ``dial --wav`` and ``demo`` end with."""
    return f"wrote {path}: {report.duration:.2f} s of call, {report.seconds_heard:.2f} s of speech"


def _run_demo(args: argparse.Namespace) -> int:
    with _VoiceStartGuard() as guard:
        try:
            return eventloop.run(_demo(args, guard))
        except SystemExit:  # uvicorn's exit 3 (from the server's task) when it did not start
            guard.raise_if_failed()
            raise


async def _demo(args: argparse.Namespace, guard: _VoiceStartGuard) -> int:
    """The demo; ``guard`` keeps why its server's voice could not start, if it could not."""
    from callspeak.emulator import DialOptions, dial
    from callspeak.logs import configure_logging
    from callspeak.server import create_app
    from callspeak.testing.asgi_server import serve_asgi

    _check_can_write(args.wav, "--wav")
    # The demo's only caller is its own emulator on loopback: no Twilio, so nothing to sign.
    # Nor TLS: it dials its server over ws:// on loopback, whatever CALLSPEAK_CERTFILE says.
    settings = _settings_from(args).model_copy(
        update={
            "port": 0,
            "validate_signatures": False,
            "call_token": False,
            "certfile": None,
            "keyfile": None,
        }
    )
    configure_logging(settings.log_level if args.log_level else "warning", settings.log_format)
    _warn_of_unknown_variables()
    app = create_app(settings)
    print(f"callspeak demo: starting a server with the {settings.resolved_tts()} voice…")
    options = uvicorn_options(settings, app)
    for key in ("host", "port"):
        options.pop(key)
    if not args.log_level:  # the demo's output is the call's timeline, not server chatter
        options["log_level"] = "warning"
    guard.app, guard.settings = app, settings
    async with serve_asgi(guard, **options) as base_url:
        url = base_url.replace("http://", "ws://") + "/twilio"
        params = {"say": args.say} if args.say else {}
        print(f"placing an emulated call to {url}")
        report = await dial(DialOptions(url=url, parameters=params))
    print(report.timeline())
    try:
        report.write_wav(args.wav)
    except OSError as exc:  # checked before the call, but the directory may have gone since
        print(f"callspeak: cannot write --wav {args.wav}: {exc}", file=sys.stderr)
        return 1
    ttfa = report.time_to_first_audio
    if ttfa is None:
        print("the caller heard nothing", file=sys.stderr)
        return 1
    print(f"time to first audio: {ttfa * 1000:.0f} ms")
    print(_wrote(args.wav, report))
    return 0


def _check_can_write(path: str, flag: str) -> None:
    """Raise :class:`UsageError` if a file cannot be written at ``path`` (given as ``flag``):
    found before the demo's voice loads and its call plays, not after."""
    target = Path(path)
    directory = target.parent
    if target.is_dir():
        raise UsageError(f"cannot write {flag} {path}: it is a directory")
    if not directory.is_dir():
        raise UsageError(f"cannot write {flag} {path}: there is no directory {str(directory)!r}")
    if not os.access(target if target.exists() else directory, os.W_OK):
        raise UsageError(f"cannot write {flag} {path}: permission denied")


def _stream_twiml(args: argparse.Namespace, settings: Settings) -> str:
    """TwiML for ``twiml`` and ``call``; raises ConfigError / TwiMLError with a fix in the text."""
    from callspeak.twiml import connect_stream_twiml, stream_url_from_public

    url = args.url
    if url is None:
        if settings.public_url is None:
            raise ConfigError("give --url wss://HOST/twilio, or set CALLSPEAK_PUBLIC_URL")
        url = stream_url_from_public(settings.public_url)
    params = _parse_params(args.param)
    if args.say is not None:
        if len(args.say) > settings.max_text_chars:
            raise ConfigError(
                f"--say is {len(args.say)} characters, over max_text_chars="
                f"{settings.max_text_chars} (CALLSPEAK_MAX_TEXT_CHARS)"
            )
        params["say"] = args.say
    return connect_stream_twiml(
        url, say=args.notice, parameters=params, status_callback=_status_callback(args, settings)
    )


def _status_callback(args: argparse.Namespace, settings: Settings) -> str | None:
    from callspeak.twiml import webhook_url_from_public

    if args.status_callback is not None:
        return str(args.status_callback)
    if settings.public_url is None:
        return None
    return webhook_url_from_public(settings.public_url, "/status")


def _twiml(args: argparse.Namespace) -> int:
    from callspeak.twiml import TwiMLError

    try:
        print(_stream_twiml(args, _env_settings()))
    except TwiMLError as exc:
        print(f"callspeak: {exc}", file=sys.stderr)
        return 2
    return 0


def _rest_client(settings: Settings) -> Any:
    from callspeak.twilio_rest import TwilioCredentials, TwilioRestClient

    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else ""
    if not settings.twilio_account_sid or not token:
        raise ConfigError("set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN to use Twilio's REST API")
    try:
        credentials = TwilioCredentials(settings.twilio_account_sid, token, settings.twilio_api_url)
    except ValueError as exc:  # Settings checks the URL too; never let this be a traceback
        raise ConfigError(f"{exc} (CALLSPEAK_TWILIO_API_URL)") from exc
    return TwilioRestClient(credentials)


def _call(args: argparse.Namespace) -> int:
    from callspeak.twilio_rest import TwilioError
    from callspeak.twiml import TwiMLError

    settings = _env_settings()
    try:
        twiml = _stream_twiml(args, settings)
    except TwiMLError as exc:
        print(f"callspeak: {exc}", file=sys.stderr)
        return 2
    with _rest_client(settings) as client:
        try:
            call_sid = client.place_call(
                to=args.to,
                from_=args.from_,
                twiml=twiml,
                status_callback=_status_callback(args, settings),
            )
        except (TwilioError, TwiMLError) as exc:
            print(f"callspeak: {exc}", file=sys.stderr)
            return 1
    print(call_sid)
    return 0


def _hangup(args: argparse.Namespace) -> int:
    from callspeak.twilio_rest import TwilioError

    with _rest_client(_env_settings()) as client:
        try:
            client.hangup(args.call_sid)
        except (TwilioError, ValueError) as exc:
            print(f"callspeak: {exc}", file=sys.stderr)
            return 1
    print(f"hung up {args.call_sid}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
