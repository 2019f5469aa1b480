"""``callspeak`` command line: serve, dial (the Twilio emulator), demo; calls, say, clear and
hangup (clients of the control API, see ``api_client.py``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from callspeak import __version__
from callspeak.config import Settings

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
    "log-level": {"choices": ["debug", "info", "warning", "error"]},
    "log-format": {"choices": ["text", "json"]},
}


class UsageError(Exception):
    """A command line that cannot be carried out; main() prints it and exits 2."""


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        flag.replace("-", "_"): getattr(args, flag.replace("-", "_"))
        for flag in _SERVE_FLAGS
        if getattr(args, flag.replace("-", "_"), None) is not None
    }
    return Settings(**overrides)


def _parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--param takes name=value, not {pair!r}")
        params[name] = value
    return params


def _parse_dtmf(items: Sequence[str]) -> list[tuple[float, str]]:
    out = []
    for item in items:
        at, sep, digits = item.partition(":")
        try:
            when = float(at)
        except ValueError:
            raise UsageError(f"--dtmf takes SECONDS:DIGITS, not {item!r}") from None
        if not sep or not digits:
            raise UsageError(f"--dtmf takes SECONDS:DIGITS, not {item!r}")
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
    demo.add_argument("--wav", default="demo.wav", help="where to write what the caller heard")
    demo.add_argument("--say", help="text to speak instead of the greeting")
    _add_serve_flags(demo, skip={"host", "port", "public-url"})
    _add_api_commands(sub)
    return parser


def _add_api_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from callspeak.api_client import add_api_arguments

    add_api_arguments(sub)


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
    parser.add_argument("--audio-at", type=float, default=0.0, help="when the caller starts it")
    parser.add_argument(
        "--dtmf",
        action="append",
        default=[],
        metavar="SECONDS:DIGITS",
        help="press DIGITS at SECONDS after start; repeatable",
    )
    parser.add_argument("--duration", type=float, help="hang up after this many seconds")
    parser.add_argument(
        "--quiet",
        type=float,
        default=1.0,
        help="without --duration: hang up after this much silence once speech was heard",
    )
    parser.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "dial":
            return asyncio.run(_dial(args))
        if args.command == "demo":
            return asyncio.run(_demo(args))
        if args.command in ("calls", "say", "clear", "hangup"):
            from callspeak.api_client import run_api_command

            return run_api_command(args)
    except ValidationError as exc:
        print(f"callspeak: invalid setting: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"callspeak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover - parser.error exits


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from callspeak.logs import configure_logging
    from callspeak.server import create_app

    settings = _settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, hooks=_load_hooks(args.hooks) if args.hooks else None)
    uvicorn.run(app, **_uvicorn_options(settings))
    return 0


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


def _uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "log_level": settings.log_level,
        # A hard cap far above the soft limit the session enforces: a message between the two
        # is logged and ignored; beyond this one uvicorn closes the socket (1009).
        "ws_max_size": max(16 * settings.max_message_bytes, 1024 * 1024),
        "ws_per_message_deflate": False,
        # Measured in bench/framework_choice.py: the sans-I/O websockets implementation had the
        # steadiest 20 ms pacing of the uvicorn options.
        "ws": "websockets-sansio",
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
        headers=_parse_params(args.header),
    )


async def _dial(args: argparse.Namespace) -> int:
    from callspeak.emulator import dial

    report = await dial(_dial_options(args, args.url))
    print(report.timeline())
    if args.wav:
        report.write_wav(args.wav)
        print(f"wrote {args.wav}: {report.duration:.2f} s, {report.seconds_heard:.2f} s of speech")
    return 0 if report.first_audio_at is not None else 1


async def _demo(args: argparse.Namespace) -> int:
    from callspeak.emulator import DialOptions, dial
    from callspeak.logs import configure_logging
    from callspeak.server import create_app
    from callspeak.testing.asgi_server import serve_asgi

    settings = _settings_from(args).model_copy(update={"port": 0})
    configure_logging(settings.log_level if args.log_level else "warning", settings.log_format)
    app = create_app(settings)
    print(f"callspeak demo: starting a server with the {settings.resolved_tts()} voice…")
    options = _uvicorn_options(settings)
    for key in ("host", "port"):
        options.pop(key)
    async with serve_asgi(app, **options) as base_url:
        url = base_url.replace("http://", "ws://") + "/twilio"
        params = {"say": args.say} if args.say else {}
        print(f"placing an emulated call to {url}")
        report = await dial(DialOptions(url=url, parameters=params))
    print(report.timeline())
    report.write_wav(args.wav)
    ttfa = report.time_to_first_audio
    if ttfa is None:
        print("the caller heard nothing", file=sys.stderr)
        return 1
    print(f"time to first audio: {ttfa * 1000:.0f} ms")
    print(f"wrote {args.wav}: {report.seconds_heard:.2f} s of speech heard")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
