"""A loopback stand-in for Deepgram Aura text-to-speech: REST ``POST /v1/speak`` and the
``/v1/speak`` WebSocket, written from the public API description
(https://developers.deepgram.com/reference/text-to-speech-api,
https://developers.deepgram.com/docs/tts-websocket) and ``/work/shared/reference/deepgram-aura.md``.

Serve :attr:`FakeDeepgram.app` with uvicorn, giving it :attr:`FakeDeepgram.ws_protocol` as
``ws=`` (``serve_asgi(fake.app, ws=fake.ws_protocol)``, see
:func:`callspeak.testing.asgi_server.serve_asgi`), and point a client's base URLs at it: REST
goes through the ASGI app, the WebSocket straight from the socket (:mod:`.speak_socket`). What it
reproduces:

* auth (``Token KEY`` or ``Bearer KEY``), model names, ``encoding``/``sample_rate``/``container``
  combinations and the documented error bodies ``{"err_code", "err_msg", "request_id"}``;
  REST defaults to ``linear16``/24 kHz/**wav** when the client does not say (the WebSocket to raw);
* audio as deterministic tone bursts, 60 ms per character (:func:`synthesize`), streamed in
  ``chunk_size`` pieces after ``first_byte_delay``, optionally paced at ``bytes_per_second``;
* WebSocket ``Metadata`` on connect, ``Speak`` buffering, ``Flush`` → audio then ``Flushed``,
  ``Clear`` → ``Cleared`` with no stale audio after it, ``Close`` → flush then close, the 20
  flushes / 60 s limit (extra flushes get a ``Warning`` and are ignored), 2000 characters a Speak;
* with ``max_concurrent``, Deepgram's per-project concurrency limits: a REST request past that
  many REST answers in progress, or a WebSocket handshake past that many sockets open, is
  refused with 429 (with ``Retry-After`` when ``retry_after`` is set). Deepgram's "API Rate
  Limits" page lists the two apart ("Text to Speech REST" and "Text to Speech Streaming", 15
  each on Pay as You Go and Growth); ``rest_peak`` and ``ws_peak`` keep the most there were.

Only the raw encodings (linear16, mulaw, alaw) are simulated; mp3/opus/flac/aac are refused with
``INVALID_QUERY_PARAMETER``. Faults are queued per test: each ``count`` is consumed by the next
requests (REST), handshakes, or flushes (WebSocket); ``count=None`` makes a fault persistent.

The package: :mod:`.audio` (the tone bursts and :func:`synthesize`), :mod:`.validation` (auth,
model and format checks, :data:`MAX_CHARS`), :mod:`.faults` (the fault queue),
:mod:`.rest_stream` (the streamed REST body), :mod:`.speak_socket` (the WebSocket's connection),
:mod:`.websocket` (one open socket's messages), and here
:class:`FakeDeepgram` itself; ``python -m callspeak.testing.fake_deepgram`` runs :func:`main`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.exceptions import ProtocolError
from websockets.frames import Close, Frame, Opcode

from callspeak.testing.fake_deepgram.audio import RAW_CONTENT_TYPES, SECONDS_PER_CHAR, synthesize
from callspeak.testing.fake_deepgram.faults import Fault, take
from callspeak.testing.fake_deepgram.rest_stream import AudioStream
from callspeak.testing.fake_deepgram.speak_socket import speak_socket_protocol
from callspeak.testing.fake_deepgram.validation import (
    MAX_CHARS,
    Reject,
    audio_params,
    check_auth_and_model,
)
from callspeak.testing.fake_deepgram.websocket import ABRUPT_CLOSE, Peer, WebSocketSession

log = logging.getLogger("callspeak.testing.fake_deepgram")

__all__ = [
    "MAX_CHARS",
    "SECONDS_PER_CHAR",
    "FakeDeepgram",
    "RecordedRequest",
    "WsVerdict",
    "main",
    "synthesize",
]


@dataclass(frozen=True, slots=True)
class WsVerdict:
    """The fake's answer to one WebSocket handshake: ``status`` 101 with the socket's audio
    format, or an error ``status`` with its JSON body (``error``)."""

    request_id: str
    status: int
    error: str = ""
    retry_after: str = ""  #: a refusal's ``Retry-After`` header, if any
    model: str = ""
    encoding: str = ""
    rate: int = 0


@dataclass(slots=True)
class RecordedRequest:
    """One request as the fake saw it (``method`` is ``"GET"`` for a WebSocket handshake)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    text: str | None = None
    status: int = 0


class FakeDeepgram:
    """A fake Deepgram Aura TTS server. See the module docstring for what it reproduces.

    ``clock``/``sleep`` drive the flush window and all delays, so tests can make time fast.
    """

    def __init__(
        self,
        api_key: str = "test-key",
        *,
        first_byte_delay: float = 0.15,
        chunk_size: int = 333,
        bytes_per_second: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        flush_limit: int = 20,
        flush_window: float = 60.0,
        stall_limit: float = 30.0,
        max_concurrent: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.api_key, self.first_byte_delay, self.chunk_size = api_key, first_byte_delay, chunk_size
        self.bytes_per_second, self.clock, self.sleep = bytes_per_second, clock, sleep
        self.flush_limit, self.flush_window, self.stall_limit = (
            flush_limit,
            flush_window,
            stall_limit,
        )
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        #: The project's concurrency limit (None: no limit), and the 429's ``Retry-After``.
        self.max_concurrent, self.retry_after = max_concurrent, retry_after
        self.rest_in_progress = 0  #: REST answers being streamed right now
        self.rest_peak = 0  #: the most REST answers there were in progress at once
        self.requests: list[RecordedRequest] = []
        self.ws_messages: list[dict[str, Any]] = []
        self.ws_connections = 0  #: WebSocket handshakes received, refused ones included
        self.ws_open = 0  #: WebSockets open right now
        self.ws_peak = 0  #: the most WebSockets there were open at once
        #: When the first audio byte of each text was sent (``clock()``), for latency benches.
        self.first_bytes: dict[str, float] = {}
        #: When each text's request was read (REST: the whole body; WebSocket: its Flush).
        self.arrivals: dict[str, float] = {}
        self._faults: deque[Fault] = deque()
        self._ws_protocol: type[asyncio.Protocol] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/speak", self._speak_http, methods=["POST"]),
                # Not Deepgram's: lets a benchmark in another process read first-byte times.
                Route("/_fake/first-bytes", self._first_bytes, methods=["GET"]),
                Route("/_fake/arrivals", self._arrivals, methods=["GET"]),
                Route("/_fake/counts", self._counts, methods=["GET"]),
            ]
        )

    async def hold_first_byte(self, since: float) -> None:
        """Wait until ``first_byte_delay`` has passed since ``since`` (a ``clock()`` reading).

        Timers may fire a little early (uvloop rounds to milliseconds), so the wait is topped up
        a few times rather than trusted once: the delay is a floor callers can measure against.
        A top-up is rounded up to whole milliseconds: uvloop runs a 0.1 ms timer at once, so
        sleeping the exact remainder could spend every top-up without time passing.
        """
        deadline = since + self.first_byte_delay
        left = max(0.0, deadline - self.clock())
        for _ in range(4):  # bounded: an injected clock need not advance while we sleep
            await self.sleep(left)
            left = deadline - self.clock()
            if left <= 0:
                return
            left = max(1, math.ceil(left * 1000 - 1e-6)) / 1000

    async def _first_bytes(self, request: Request) -> JSONResponse:
        return JSONResponse(self.first_bytes)

    async def _arrivals(self, request: Request) -> JSONResponse:
        return JSONResponse(self.arrivals)

    def counts(self) -> dict[str, Any]:
        """How many requests (REST) and handshakes (WebSocket) were answered with each status,
        and the most REST answers in progress and sockets open there were at once."""
        statuses: dict[str, int] = {}
        for request in self.requests:
            key = str(request.status)
            statuses[key] = statuses.get(key, 0) + 1
        return {"statuses": statuses, "rest_peak": self.rest_peak, "ws_peak": self.ws_peak}

    async def _counts(self, request: Request) -> JSONResponse:
        return JSONResponse(self.counts())

    # -- fault injection ----------------------------------------------------------------
    def fail_next(
        self,
        status: int,
        body: bytes | str | dict[str, Any] | None = None,
        *,
        count: int | None = 1,
    ) -> None:
        """Answer the next ``count`` REST requests with ``status`` and ``body`` (dict → JSON,
        str → text/plain, None → a documented-style JSON body)."""
        content_type = "application/json"
        if body is None:
            body = {"err_code": "FAKE_ERROR", "err_msg": f"injected {status}"}
        if isinstance(body, dict):
            raw = json.dumps(body).encode()
        else:
            raw = body.encode() if isinstance(body, str) else body
            content_type = "text/plain; charset=utf-8"
        self._faults.append(
            Fault("fail", count, status=status, body=raw, content_type=content_type)
        )

    def stall_after(self, n_bytes: int, *, count: int | None = 1) -> None:
        """Next REST responses send ``n_bytes`` of audio, then hang with the connection open."""
        self._faults.append(Fault("stall", count, n_bytes=n_bytes))

    def cut_after(self, n_bytes: int, *, count: int | None = 1) -> None:
        """Next REST responses send ``n_bytes`` of audio, then drop the connection."""
        self._faults.append(Fault("cut", count, n_bytes=n_bytes))

    def answer_in_wav(
        self, encoding: str = "", sample_rate: int = 0, *, count: int | None = 1
    ) -> None:
        """Answer the next REST requests in a WAV container whatever ``container`` asked (a
        Deepgram ignoring ``container=none``), in ``encoding``/``sample_rate`` when given."""
        self._faults.append(Fault("wav", count, reason=encoding, n_bytes=sample_rate))

    def refuse_ws(
        self, status: int, body: dict[str, Any] | None = None, *, count: int | None = 1
    ) -> None:
        """Refuse the next WebSocket handshakes with an HTTP ``status`` (e.g. 401, 429, 503)."""
        raw = json.dumps(body or {"err_code": "FAKE_ERROR", "err_msg": f"injected {status}"})
        self._faults.append(Fault("refuse", count, status=status, body=raw.encode()))

    def ws_close_after(
        self, n_bytes: int, code: int = 1011, reason: str = "", *, count: int | None = 1
    ) -> None:
        """During the next flushes, close the socket with ``code``/``reason`` after ``n_bytes``.

        ``code`` 1006 drops the TCP connection without a close frame (an abrupt close: what a
        client then reports as 1006); a close no server may send (1005, 1015, a code out of
        range, a reason over 123 bytes) raises ``ValueError`` here."""
        _check_close(code, reason)
        self._faults.append(Fault("ws_close", count, n_bytes=n_bytes, code=code, reason=reason))

    def ws_close_after_flushed(
        self, code: int = 1000, reason: str = "", *, count: int | None = 1
    ) -> None:
        """After the next ``Flushed``, close the socket (a server-side close between utterances;
        ``code`` as for :meth:`ws_close_after`)."""
        _check_close(code, reason)
        self._faults.append(Fault("ws_close_flushed", count, code=code, reason=reason))

    def ws_stall(self, n_bytes: int = 0, *, count: int | None = 1) -> None:
        """The next flushes send ``n_bytes`` of audio, then nothing more — neither audio nor
        ``Flushed`` — until a Clear or a close."""
        self._faults.append(Fault("ws_stall", count, n_bytes=n_bytes))

    def ws_silent(self, *, count: int | None = 1) -> None:
        """Answer the next flushes with ``Flushed`` and no audio."""
        self._faults.append(Fault("ws_silent", count))

    def ws_warn(
        self, description: str, code: str = "FAKE_WARNING", *, count: int | None = 1
    ) -> None:
        """Send a ``Warning`` before the audio of the next flushes."""
        self._faults.append(Fault("ws_warn", count, body=description.encode(), reason=code))

    def _check_concurrency(self, in_progress: int) -> None:
        """Refuse (429) a request past ``max_concurrent`` ``in_progress`` of its kind (REST
        answers, or sockets open: see the module docs)."""
        limit = self.max_concurrent
        if limit is not None and in_progress >= limit:
            raise Reject(
                429,
                "TOO_MANY_REQUESTS",
                f"Too many requests in progress; this project's concurrency limit is {limit}.",
            )

    def _retry_after(self, status: int) -> str:
        """The ``Retry-After`` of an answer with ``status`` ("": none)."""
        return "" if status != 429 or self.retry_after is None else f"{self.retry_after:g}"

    def clear_faults(self) -> None:
        self._faults.clear()

    def audio_for(
        self, text: str, encoding: str = "mulaw", sample_rate: int = 8000, container: str = "none"
    ) -> bytes:
        """What this fake sends for ``text`` (same as :func:`synthesize`)."""
        return synthesize(text, encoding, sample_rate, container)

    # -- shared checks --------------------------------------------------------------------
    def _record(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]
    ) -> RecordedRequest:
        keep = (
            "authorization",
            "content-type",
            "user-agent",
            "accept-encoding",
            "sec-websocket-extensions",
            "host",
        )
        record = RecordedRequest(
            method, path, dict(query), {k: headers[k] for k in keep if k in headers}
        )
        self.requests.append(record)
        return record

    # -- REST -------------------------------------------------------------------------------
    async def _speak_http(self, request: Request) -> Response:
        record = self._record("POST", request.url.path, request.query_params, request.headers)
        rid = str(uuid.uuid4())
        body = await request.body()
        fault = take(self._faults, "fail")
        if fault is not None:
            record.status = fault.status
            return Response(fault.body, fault.status, {"dg-request-id": rid}, fault.content_type)
        try:
            model = check_auth_and_model(request.headers, request.query_params, self.api_key)
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                raise Reject(
                    415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/json."
                )
            encoding, rate, container = audio_params(request.query_params, websocket=False)
            try:
                payload = json.loads(body)
            except ValueError:
                raise Reject(400, "PAYLOAD_ERROR", "Could not parse the JSON payload.") from None
            text = payload.get("text") if isinstance(payload, dict) else None
            record.text = text if isinstance(text, str) else None
            if not isinstance(text, str) or not text.strip():
                raise Reject(400, "Bad Request", "Input text contains no characters.")
            if len(text) > MAX_CHARS:
                raise Reject(
                    413,
                    "PAYLOAD_TOO_LARGE",
                    f"Text is {len(text)} characters; the limit is {MAX_CHARS}.",
                )
            self._check_concurrency(self.rest_in_progress)
        except Reject as reject:
            record.status = reject.status
            error = {"err_code": reject.code, "err_msg": reject.message, "request_id": rid}
            headers = {"dg-request-id": rid}
            if retry_after := self._retry_after(reject.status):
                headers["retry-after"] = retry_after
            return JSONResponse(error, reject.status, headers)
        record.status = 200
        if (wav := take(self._faults, "wav")) is not None:
            encoding, rate, container = wav.reason or encoding, wav.n_bytes or rate, "wav"
        headers = {
            "content-type": "audio/wav" if container == "wav" else RAW_CONTENT_TYPES[encoding],
            "dg-request-id": rid,
            "dg-model-name": model,
            "dg-model-uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, model)),
            "dg-char-count": str(len(text)),
        }
        self.arrivals[text] = arrived = self.clock()
        audio = synthesize(text, encoding, rate, container)
        # Counted from here until the stream ends (AudioStream.__call__): a concurrency slot.
        self.rest_in_progress += 1
        self.rest_peak = max(self.rest_peak, self.rest_in_progress)
        stream = AudioStream(self, audio, headers, take(self._faults, "stall", "cut"), arrived)
        stream.text = text
        return stream

    # -- WebSocket --------------------------------------------------------------------------
    @property
    def ws_protocol(self) -> type[asyncio.Protocol]:
        """The class to give uvicorn as ``ws=`` when serving :attr:`app`: the ``/v1/speak``
        WebSocket is served by it (see :mod:`.speak_socket`), not through ASGI."""
        if self._ws_protocol is None:
            self._ws_protocol = speak_socket_protocol(self)
        return self._ws_protocol

    def answer_ws_handshake(
        self, path: str, query: Mapping[str, str], headers: Mapping[str, str]
    ) -> WsVerdict:
        """Record a ``/v1/speak`` handshake and decide it: 101, or a documented error
        (``headers`` lower-cased; an injected ``refuse`` fault is taken first)."""
        self.ws_connections += 1
        record, rid = self._record("GET", path, query, headers), str(uuid.uuid4())
        try:
            fault = take(self._faults, "refuse")
            if fault is not None:
                error = json.loads(fault.body)
                raise Reject(fault.status, error.get("err_code", ""), error.get("err_msg", ""))
            model = check_auth_and_model(headers, query, self.api_key)
            encoding, rate, _ = audio_params(query, websocket=True)
            self._check_concurrency(self.ws_open)
        except Reject as reject:
            record.status = reject.status
            error = json.dumps(
                {"err_code": reject.code, "err_msg": reject.message, "request_id": rid}
            )
            retry_after = self._retry_after(reject.status)
            return WsVerdict(rid, reject.status, error=error, retry_after=retry_after)
        record.status = 101
        return WsVerdict(rid, 101, model=model, encoding=encoding, rate=rate)

    def serve_ws(self, peer: Peer, verdict: WsVerdict) -> asyncio.Task[None]:
        """Serve an accepted socket in a new task: ``Metadata``, then the session until either
        side closes; then the socket is closed (1011 if the session failed). :attr:`ws_open`
        counts the socket from now until the task is done, however it ends."""
        self.ws_open += 1
        self.ws_peak = max(self.ws_peak, self.ws_open)
        task = asyncio.get_running_loop().create_task(self._served(peer, verdict))
        task.add_done_callback(self._ws_closed)
        return task

    def _ws_closed(self, task: asyncio.Task[None]) -> None:
        self.ws_open -= 1

    async def _served(self, peer: Peer, verdict: WsVerdict) -> None:
        metadata = {
            "type": "Metadata",
            "request_id": verdict.request_id,
            "model_name": verdict.model,
            "model_version": "fake",
            "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, verdict.model)),
        }
        code, reason = 1000, ""
        try:
            await peer.send_text(json.dumps(metadata))
            await WebSocketSession(self, peer, verdict.encoding, verdict.rate, self._faults).run()
        except ConnectionError:  # the client left
            pass
        except Exception:  # a bug in the fake: say so, and do not leave the client waiting
            log.exception("the fake Deepgram's WebSocket session failed")
            code, reason = 1011, "internal error"
        finally:
            # The session may end with the socket still open (e.g. a Close whose audio outlasted
            # stall_limit): close it, as an ASGI server closes a socket its handler left.
            await peer.close(code, reason)


def _check_close(code: int, reason: str) -> None:
    """``ValueError`` unless a server can end a socket so: 1006 (dropped), or a close frame."""
    if code == ABRUPT_CLOSE:
        if reason:
            raise ValueError("a dropped connection (1006) carries no reason")
        return
    try:
        Frame(Opcode.CLOSE, Close(code, reason).serialize()).check()
    except ProtocolError as exc:
        raise ValueError(f"no server can close with {code} {reason!r:.40}: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    """Serve a fake Deepgram on loopback: ``python -m callspeak.testing.fake_deepgram --port N``."""
    import argparse

    import uvicorn

    from callspeak.heap import collect_young_less_often, freeze_startup_objects

    parser = argparse.ArgumentParser(
        prog="python -m callspeak.testing.fake_deepgram",
        description="A fake Deepgram Aura server for tests/benches.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--api-key",
        default="test-key",
        help="the key clients must send as DEEPGRAM_API_KEY (default: %(default)s)",
    )
    parser.add_argument(
        "--first-byte-delay",
        type=float,
        default=0.15,
        help="seconds from a request (or Flush) to its first audio (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=333,
        help="bytes of audio per chunk or frame sent (default: %(default)s)",
    )
    parser.add_argument(
        "--bytes-per-second",
        type=float,
        default=None,
        help="pace the audio at this rate (default: as fast as it can; 8000 is real time)",
    )
    parser.add_argument(
        "--certfile",
        help="serve https:// and wss:// with this certificate (PEM), as Deepgram does; clients "
        "trust it through SSL_CERT_FILE",
    )
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="refuse with 429 past this many REST answers in progress, or sockets open, as "
        "Deepgram's per-project concurrency limits do (default: no limit)",
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=None,
        help="the Retry-After header of those 429s, in seconds (default: none sent)",
    )
    args = parser.parse_args(argv)
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    fake = FakeDeepgram(
        args.api_key,
        first_byte_delay=args.first_byte_delay,
        chunk_size=args.chunk_size,
        bytes_per_second=args.bytes_per_second,
        max_concurrent=args.max_concurrent,
        retry_after=args.retry_after,
    )
    # In a benchmark the fake shares the machine with the server under test and stands in for
    # another company's fleet: its own collector's passes would read as Deepgram being slow.
    freeze_startup_objects()
    collect_young_less_often()
    # One line on what to point callspeak at (uvicorn's own lines are at warning level).
    base = f"{args.host}:{args.port}"
    secure = "s" if args.certfile else ""
    print(
        f"fake Deepgram starting: CALLSPEAK_DEEPGRAM_URL=http{secure}://{base} "
        f"CALLSPEAK_DEEPGRAM_WS_URL=ws{secure}://{base} DEEPGRAM_API_KEY={args.api_key}"
        + (f" SSL_CERT_FILE={args.certfile}" if secure else ""),
        flush=True,
    )
    uvicorn.run(
        fake.app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ws=fake.ws_protocol,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
    )
