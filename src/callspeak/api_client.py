"""A small client of the control API, and the ``callspeak calls|say|clear|hangup`` commands.

:class:`ApiClient` is synchronous (the CLI makes one request and exits) and takes an optional
``httpx.BaseTransport``, so tests can hand it ``httpx.MockTransport`` instead of patching.
Every failure — an error body from the server, a refused connection, a non-JSON reply — is one
:class:`ApiClientError` whose message is fit to print. Exit codes: 0 ok, 1 API or connection
error, 2 usage (argparse's own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import quote

import httpx

__all__ = ["ApiClient", "ApiClientError", "add_api_arguments", "default_server", "run_api_command"]

API_COMMANDS = ("calls", "say", "clear", "hangup")


class ApiClientError(Exception):
    """A request failed; ``str()`` says why. ``status`` and ``code`` come from the server."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def default_server(environ: Mapping[str, str] | None = None) -> str:
    """``$CALLSPEAK_SERVER``, else ``http://127.0.0.1:$CALLSPEAK_PORT`` (port 5000). Raises
    :class:`ApiClientError` naming CALLSPEAK_PORT if that is no port a server can listen on
    (it was blamed on CALLSPEAK_SERVER as an invalid URL, or dialled as it was: port 99999)."""
    env = os.environ if environ is None else environ
    if env.get("CALLSPEAK_SERVER"):
        return env["CALLSPEAK_SERVER"]
    port = (env.get("CALLSPEAK_PORT") or "5000").strip()
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ApiClientError(
            f"CALLSPEAK_PORT {port!r} is not a port from 1 to 65535: set it to the server's "
            "port, or give the server's URL with --server / CALLSPEAK_SERVER"
        )
    return f"http://127.0.0.1:{int(port)}"


class ApiClient:
    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        # Surrounding spaces are dropped, as the server drops them from CALLSPEAK_API_TOKEN (a
        # header value cannot carry them); a blank token means none.
        token = token.strip() if token else None
        # As UTF-8 bytes: httpx would encode a str as ASCII and fail on any other token, which
        # the server accepts (it compares the header's bytes with the token's UTF-8).
        headers = {b"Authorization": f"Bearer {token}".encode()} if token else {}
        self._server = server.rstrip("/")
        try:
            self._http = httpx.Client(
                base_url=self._server, headers=headers, timeout=timeout, transport=transport
            )
        except httpx.InvalidURL as exc:  # e.g. "http://[::1" or a port that is no number
            raise ApiClientError(
                f"invalid server URL {server!r} (--server / CALLSPEAK_SERVER): {exc}"
            ) from exc

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def calls(self) -> list[dict[str, Any]]:
        calls = self._request("GET", "/calls").get("calls")
        if not isinstance(calls, list):
            raise ApiClientError(
                f"GET {self._server}/calls answered without a list of calls "
                "(is this a callspeak server?)"
            )
        return calls

    def call(self, call_sid: str) -> dict[str, Any]:
        return self._request("GET", f"/calls/{_seg(call_sid)}")

    def say(
        self, call_sid: str, text: str, *, interruptible: bool = True, wait: bool = False
    ) -> dict[str, Any]:
        """Queue ``text``; with ``wait``, return once it was played or interrupted (≤ 60 s)."""
        return self._request(
            "POST",
            f"/calls/{_seg(call_sid)}/say",
            json={"text": text, "interruptible": interruptible},
            params={"wait": "true"} if wait else None,
            # The server holds a waiting request for up to 60 s.
            timeout=75.0 if wait else None,
        )

    def clear(self, call_sid: str) -> dict[str, Any]:
        return self._request("POST", f"/calls/{_seg(call_sid)}/clear")

    def hangup(self, call_sid: str, *, after_speech: bool = False) -> dict[str, Any]:
        return self._request(
            "POST",
            f"/calls/{_seg(call_sid)}/hangup",
            json={"afterSpeech": after_speech},
            timeout=45.0 if after_speech else None,  # the server waits ≤ 30 s for speech
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        try:
            response = self._http.request(
                method,
                path,
                json=json,
                params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            # Connected, so the request may have been carried out: a retry could say it twice.
            limit = timeout if timeout is not None else self._http.timeout.read
            within = f" within {limit:g} s" if limit is not None else ""
            raise ApiClientError(
                f"no answer from the callspeak server at {self._server}{within}; "
                f"{method} {path} may have been carried out"
            ) from exc
        except httpx.HTTPError as exc:
            raise ApiClientError(
                f"cannot reach the callspeak server at {self._server}: "
                f"{str(exc) or type(exc).__name__}"
            ) from exc
        except UnicodeEncodeError as exc:  # text from argv or a file in another encoding
            raise ApiClientError(
                f"the text is not valid Unicode ({exc.reason} at character {exc.start}): "
                "check the encoding of the terminal or file it came from"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success and isinstance(body, dict):
            return body
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
            code = str(error.get("code", "error"))
            raise ApiClientError(
                f"{response.status_code} {code}: {error.get('message', '')}".rstrip(": "),
                status=response.status_code,
                code=code,
            )
        raise ApiClientError(
            f"{response.status_code} from {self._server}{path}: {response.text[:200]!r} "
            "(is this a callspeak server?)",
            status=response.status_code,
        )


def _seg(value: str) -> str:
    return quote(value, safe="")


# -- the commands ---------------------------------------------------------------------------


def add_api_arguments(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> None:
    """Add ``calls``, ``say``, ``clear``, ``hangup`` to ``callspeak``'s subcommands."""

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--server",
            default=None,
            help="the server's base URL (CALLSPEAK_SERVER; default http://127.0.0.1:"
            "$CALLSPEAK_PORT or :5000)",
        )
        parser.add_argument("--token", default=None, help="API token (CALLSPEAK_API_TOKEN)")
        parser.add_argument("--json", action="store_true", help="print the server's JSON")

    common(sub.add_parser("calls", help="list live calls (control API)"))
    say = sub.add_parser("say", help="speak text into a live call (control API)")
    say.add_argument("call_sid", metavar="CALLSID")
    say.add_argument("text")
    say.add_argument(
        "--no-interrupt", action="store_true", help="barge-in may not stop it (a clear still does)"
    )
    say.add_argument("--wait", action="store_true", help="return once it was played (≤ 60 s)")
    common(say)
    clear = sub.add_parser("clear", help="stop speech in a live call now (control API)")
    clear.add_argument("call_sid", metavar="CALLSID")
    common(clear)
    hangup = sub.add_parser("hangup", help="end a live call's media stream (control API)")
    hangup.add_argument("call_sid", metavar="CALLSID")
    hangup.add_argument("--after-speech", action="store_true", help="once queued speech played")
    common(hangup)


def run_api_command(
    args: argparse.Namespace,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Run one of :data:`API_COMMANDS`; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    token = args.token if args.token is not None else os.environ.get("CALLSPEAK_API_TOKEN")
    try:
        server = args.server or default_server()
    except ApiClientError as exc:
        print(f"callspeak {args.command}: {exc}", file=err)
        return 1
    try:
        with ApiClient(server, token=token or None, transport=transport) as client:
            if args.command == "calls":
                calls = client.calls()
                listed = json.dumps({"calls": calls}, indent=2)  # as GET /calls answers
                print(listed if args.json else _calls_table(calls), file=out)
                return 0
            if args.command == "say":
                result = client.say(
                    args.call_sid, args.text, interruptible=not args.no_interrupt, wait=args.wait
                )
                print(json.dumps(result, indent=2) if args.json else _said(result), file=out)
                return 0
            if args.command == "clear":
                result = client.clear(args.call_sid)
                n = len(result["cleared"])
                text = f"cleared {n} utterance{'s' if n != 1 else ''} in {result['callSid']}"
                print(json.dumps(result, indent=2) if args.json else text, file=out)
                return 0
            assert args.command == "hangup", args.command
            result = client.hangup(args.call_sid, after_speech=args.after_speech)
            print(
                json.dumps(result, indent=2) if args.json else f"hung up {args.call_sid}", file=out
            )
            return 0
    except ApiClientError as exc:
        print(f"callspeak {args.command}: {exc}", file=err)
        return 1
    except (KeyError, TypeError, AttributeError) as exc:  # a 2xx JSON answer of another shape
        print(
            f"callspeak {args.command}: unexpected answer from {server} (missing or wrong "
            f"{exc}): is this a callspeak server?",
            file=err,
        )
        return 1


def _calls_table(calls: list[dict[str, Any]]) -> str:
    if not calls:
        return "no live calls"
    lines = [f"{'CALLSID':<36}  {'PHASE':<10}  SPEAKING"]
    for call in calls:
        speaking = call.get("speaking")
        now = f"#{speaking['id']} {speaking['text'][:40]!r}" if speaking else "-"
        lines.append(f"{call['callSid']:<36}  {call['phase']:<10}  {now}")
    return "\n".join(lines)


def _said(utterance: dict[str, Any]) -> str:
    line = f"utterance {utterance['id']}: {utterance['status']}"
    record = utterance.get("record")
    if record and utterance["status"] != "queued":
        heard = len(record["heard"])
        line += f" (heard {heard} of {len(utterance['sentences'])} sentences"
        line += f", cut: {record['cut']!r})" if record.get("cut") else ")"
    return line
