"""A loopback stand-in for Deepgram Aura text-to-speech: REST ``POST /v1/speak`` and the
``/v1/speak`` WebSocket, written from the public API description
(https://developers.deepgram.com/reference/text-to-speech-api,
https://developers.deepgram.com/docs/tts-websocket) and ``/work/shared/reference/deepgram-aura.md``.

Serve :attr:`FakeDeepgram.app` with :func:`callspeak.testing.asgi_server.serve_asgi` and point a
client's base URL at it. What it reproduces:

* auth (``Token KEY`` or ``Bearer KEY``), model names, ``encoding``/``sample_rate``/``container``
  combinations and the documented error bodies ``{"err_code", "err_msg", "request_id"}``;
  REST defaults to ``linear16``/24 kHz/**wav** when the client does not say (the WebSocket to raw);
* audio as deterministic tone bursts, 60 ms per character (:func:`synthesize`), streamed in
  ``chunk_size`` pieces after ``first_byte_delay``, optionally paced at ``bytes_per_second``;
* WebSocket ``Metadata`` on connect, ``Speak`` buffering, ``Flush`` → audio then ``Flushed``,
  ``Clear`` → ``Cleared`` with no stale audio after it, ``Close`` → flush then close, the 20
  flushes / 60 s limit (extra flushes get a ``Warning`` and are ignored), 2000 characters a Speak.

Only the raw encodings (linear16, mulaw, alaw) are simulated; mp3/opus/flac/aac are refused with
``INVALID_QUERY_PARAMETER``. Faults are queued per test: each ``count`` is consumed by the next
requests (REST), handshakes, or flushes (WebSocket); ``count=None`` makes a fault persistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import struct
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

__all__ = ["MAX_CHARS", "FakeDeepgram", "RecordedRequest", "synthesize"]

MAX_CHARS = 2000
SECONDS_PER_CHAR = 0.060
_MODEL = re.compile(r"^aura-(?:2-)?[a-z]+-en$")
_RATES = {
    "mulaw": (8000, 16000),
    "alaw": (8000, 16000),
    "linear16": (8000, 16000, 24000, 32000, 48000),
}
_DEFAULT_RATE = {"mulaw": 8000, "alaw": 8000, "linear16": 24000}
_RAW_TYPES = {"mulaw": "audio/basic", "alaw": "audio/x-alaw-basic", "linear16": "audio/l16"}
_WAV_TAG = {"linear16": 1, "alaw": 6, "mulaw": 7}


# ---------------------------------------------------------------- audio
def _pcm(text: str, rate: int) -> np.ndarray[Any, np.dtype[np.int16]]:
    """One 60 ms tone burst per character; letters loud and pitched by code point, others quiet."""
    n = int(rate * SECONDS_PER_CHAR)
    codes = np.array([ord(c) for c in text], dtype=np.float64)[:, None]
    loud = np.array([c.isalnum() for c in text], dtype=np.float64)[:, None]
    t = np.arange(n, dtype=np.float64) / rate
    freq = 180.0 + (codes * 37.0) % 700.0
    wave = np.sin(2 * np.pi * freq * t) + 0.35 * np.sin(4 * np.pi * freq * t)
    envelope = np.sin(np.pi * (np.arange(n) + 0.5) / n)
    amplitude = 2000.0 + 7000.0 * loud
    return (wave * envelope * amplitude).astype(np.int16).reshape(-1)


def _mulaw(pcm: np.ndarray[Any, np.dtype[np.int16]]) -> bytes:
    """G.711 μ-law."""
    x = pcm.astype(np.int32)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    code = ((x < 0).astype(np.int32) << 7) | (exponent << 4) | mantissa
    return bytes((~code & 0xFF).astype(np.uint8).tobytes())


def _alaw(pcm: np.ndarray[Any, np.dtype[np.int16]]) -> bytes:
    """G.711 A-law."""
    x = pcm.astype(np.int32) >> 3
    mask = np.where(x >= 0, 0xD5, 0x55)
    mag = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), mag)
    shift = np.where(seg < 2, 1, seg)
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | ((mag >> shift) & 0x0F))
    return bytes((code ^ mask).astype(np.uint8).tobytes())


def _wav_header(encoding: str, rate: int, data_len: int) -> bytes:
    width = 2 if encoding == "linear16" else 1
    fmt = struct.pack("<HHIIHH", _WAV_TAG[encoding], 1, rate, rate * width, width, 8 * width)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_len)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + (b"data" + struct.pack("<I", data_len))
    )


@functools.lru_cache(maxsize=1024)
def _char_audio(char: str, encoding: str, sample_rate: int) -> bytes:
    """One character's burst, encoded (each character's samples depend on it alone)."""
    pcm = _pcm(char, sample_rate)
    if encoding == "linear16":
        return pcm.astype("<i2").tobytes()
    return _mulaw(pcm) if encoding == "mulaw" else _alaw(pcm)


@functools.lru_cache(maxsize=64)
def synthesize(
    text: str, encoding: str = "mulaw", sample_rate: int = 8000, container: str = "none"
) -> bytes:
    """The exact bytes the fake streams for ``text`` in this format (deterministic, cached).

    Joined from per-character bursts: the same bytes as encoding the whole text at once, but a
    benchmark's 200 new texts cost the fake almost nothing (it shares the CPU being measured).
    """
    audio = b"".join(_char_audio(char, encoding, sample_rate) for char in text)
    return _wav_header(encoding, sample_rate, len(audio)) + audio if container == "wav" else audio


# ---------------------------------------------------------------- validation
class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _audio_params(query: Mapping[str, str], *, websocket: bool) -> tuple[str, int, str]:
    """``(encoding, sample_rate, container)`` with Deepgram's defaults, or :class:`_Reject`."""
    encoding = query.get("encoding", "linear16")
    if encoding not in _RATES:
        raise _Reject(400, "INVALID_QUERY_PARAMETER", f"Unsupported encoding: {encoding!r}.")
    raw_rate = query.get("sample_rate", str(_DEFAULT_RATE[encoding]))
    if not raw_rate.isdigit() or int(raw_rate) not in _RATES[encoding]:
        raise _Reject(
            400, "INVALID_QUERY_PARAMETER", f"sample_rate {raw_rate} is not valid for {encoding}."
        )
    container = query.get("container", "none" if websocket else "wav")
    if container not in (("none",) if websocket else ("none", "wav")):
        raise _Reject(
            400, "INVALID_QUERY_PARAMETER", f"container {container!r} is not valid for {encoding}."
        )
    return encoding, int(raw_rate), container


@dataclass(slots=True)
class RecordedRequest:
    """One request as the fake saw it (``method`` is ``"GET"`` for a WebSocket handshake)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    text: str | None = None
    status: int = 0


@dataclass(slots=True)
class _Fault:
    kind: str
    remaining: int | None
    status: int = 0
    body: bytes = b""
    content_type: str = "application/json"
    n_bytes: int = 0
    code: int = 1011
    reason: str = ""


def _take(faults: deque[_Fault], *kinds: str) -> _Fault | None:
    for fault in faults:
        if fault.kind in kinds:
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    faults.remove(fault)
            return fault
    return None


class _AudioStream(Response):
    """Streams audio chunk by chunk (chunked encoding), honouring delay, pacing and faults."""

    def __init__(
        self, fake: FakeDeepgram, audio: bytes, headers: dict[str, str], fault: _Fault | None
    ):
        super().__init__(status_code=200, headers=headers)
        self.text = ""
        # no content-length: the body is chunked, like Deepgram's
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.fake, self.audio, self.fault = fake, audio, fault

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self._send_audio(send, gone)
        finally:
            watcher.cancel()
            await asyncio.wait({watcher})

    async def _send_audio(self, send: Send, gone: asyncio.Event) -> None:
        fake, fault = self.fake, self.fault
        limit = len(self.audio) if fault is None else min(fault.n_bytes, len(self.audio))
        await fake.sleep(fake.first_byte_delay)
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        fake.first_bytes[self.text] = fake.clock()
        sent = 0
        while sent < limit and not gone.is_set():
            piece = self.audio[sent : min(sent + fake.chunk_size, limit)]
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += len(piece)
            if fake.bytes_per_second:
                await fake.sleep(len(piece) / fake.bytes_per_second)
        if fault is not None and fault.kind == "stall":
            # hang without closing until the client gives up (bounded for shutdown's sake)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fake.stall_limit):
                    await gone.wait()
        if fault is None or fault.kind == "stall":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # a "cut" returns with the body incomplete: the server drops the connection


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
        self.requests: list[RecordedRequest] = []
        self.ws_messages: list[dict[str, Any]] = []
        self.ws_connections = 0  #: WebSocket handshakes received, refused ones included
        self.ws_open = 0  #: WebSockets open right now
        #: When the first audio byte of each text was sent (``clock()``), for latency benches.
        self.first_bytes: dict[str, float] = {}
        #: When each text's request was read (REST: the whole body; WebSocket: its Flush).
        self.arrivals: dict[str, float] = {}
        self._faults: deque[_Fault] = deque()
        self.app = Starlette(
            routes=[
                Route("/v1/speak", self._speak_http, methods=["POST"]),
                WebSocketRoute("/v1/speak", self._speak_ws),
                # Not Deepgram's: lets a benchmark in another process read first-byte times.
                Route("/_fake/first-bytes", self._first_bytes, methods=["GET"]),
                Route("/_fake/arrivals", self._arrivals, methods=["GET"]),
            ]
        )

    async def _first_bytes(self, request: Request) -> JSONResponse:
        return JSONResponse(self.first_bytes)

    async def _arrivals(self, request: Request) -> JSONResponse:
        return JSONResponse(self.arrivals)

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
            _Fault("fail", count, status=status, body=raw, content_type=content_type)
        )

    def stall_after(self, n_bytes: int, *, count: int | None = 1) -> None:
        """Next REST responses send ``n_bytes`` of audio, then hang with the connection open."""
        self._faults.append(_Fault("stall", count, n_bytes=n_bytes))

    def cut_after(self, n_bytes: int, *, count: int | None = 1) -> None:
        """Next REST responses send ``n_bytes`` of audio, then drop the connection."""
        self._faults.append(_Fault("cut", count, n_bytes=n_bytes))

    def refuse_ws(
        self, status: int, body: dict[str, Any] | None = None, *, count: int | None = 1
    ) -> None:
        """Refuse the next WebSocket handshakes with an HTTP ``status`` (e.g. 401, 429, 503)."""
        raw = json.dumps(body or {"err_code": "FAKE_ERROR", "err_msg": f"injected {status}"})
        self._faults.append(_Fault("refuse", count, status=status, body=raw.encode()))

    def ws_close_after(
        self, n_bytes: int, code: int = 1011, reason: str = "", *, count: int | None = 1
    ) -> None:
        """During the next flushes, close the socket with ``code``/``reason`` after ``n_bytes``."""
        self._faults.append(_Fault("ws_close", count, n_bytes=n_bytes, code=code, reason=reason))

    def ws_close_after_flushed(
        self, code: int = 1000, reason: str = "", *, count: int | None = 1
    ) -> None:
        """After the next ``Flushed``, close the socket (a server-side close between utterances)."""
        self._faults.append(_Fault("ws_close_flushed", count, code=code, reason=reason))

    def ws_stall(self, *, count: int | None = 1) -> None:
        """The next flushes produce neither audio nor ``Flushed`` (until a Clear or a close)."""
        self._faults.append(_Fault("ws_stall", count))

    def ws_warn(
        self, description: str, code: str = "FAKE_WARNING", *, count: int | None = 1
    ) -> None:
        """Send a ``Warning`` before the audio of the next flushes."""
        self._faults.append(_Fault("ws_warn", count, body=description.encode(), reason=code))

    def clear_faults(self) -> None:
        self._faults.clear()

    def audio_for(
        self, text: str, encoding: str = "mulaw", sample_rate: int = 8000, container: str = "none"
    ) -> bytes:
        """What this fake sends for ``text`` (same as :func:`synthesize`)."""
        return synthesize(text, encoding, sample_rate, container)

    # -- shared checks --------------------------------------------------------------------
    def _check(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() not in ("token", "bearer") or token.strip() != self.api_key:
            raise _Reject(401, "INVALID_AUTH", "Invalid credentials.")
        model = query.get("model", "aura-asteria-en")
        if not _MODEL.match(model):
            raise _Reject(
                400, "Bad Request", f"No such model/version/tier combination found: {model}"
            )
        return model

    def _record(self, method: str, conn: Request | WebSocket) -> RecordedRequest:
        keep = (
            "authorization",
            "content-type",
            "user-agent",
            "accept-encoding",
            "sec-websocket-extensions",
        )
        record = RecordedRequest(
            method,
            conn.url.path,
            dict(conn.query_params),
            {k: conn.headers[k] for k in keep if k in conn.headers},
        )
        self.requests.append(record)
        return record

    # -- REST -------------------------------------------------------------------------------
    async def _speak_http(self, request: Request) -> Response:
        record, rid = self._record("POST", request), str(uuid.uuid4())
        body = await request.body()
        fault = _take(self._faults, "fail")
        if fault is not None:
            record.status = fault.status
            return Response(fault.body, fault.status, {"dg-request-id": rid}, fault.content_type)
        try:
            model = self._check(request.headers, request.query_params)
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                raise _Reject(
                    415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/json."
                )
            encoding, rate, container = _audio_params(request.query_params, websocket=False)
            try:
                payload = json.loads(body)
            except ValueError:
                raise _Reject(400, "PAYLOAD_ERROR", "Could not parse the JSON payload.") from None
            text = payload.get("text") if isinstance(payload, dict) else None
            record.text = text if isinstance(text, str) else None
            if not isinstance(text, str) or not text.strip():
                raise _Reject(400, "Bad Request", "Input text contains no characters.")
            if len(text) > MAX_CHARS:
                raise _Reject(
                    413,
                    "PAYLOAD_TOO_LARGE",
                    f"Text is {len(text)} characters; the limit is {MAX_CHARS}.",
                )
        except _Reject as reject:
            record.status = reject.status
            error = {"err_code": reject.code, "err_msg": reject.message, "request_id": rid}
            return JSONResponse(error, reject.status, {"dg-request-id": rid})
        record.status = 200
        headers = {
            "content-type": "audio/wav" if container == "wav" else _RAW_TYPES[encoding],
            "dg-request-id": rid,
            "dg-model-name": model,
            "dg-model-uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, model)),
            "dg-char-count": str(len(text)),
        }
        self.arrivals[text] = self.clock()
        audio = synthesize(text, encoding, rate, container)
        stream = _AudioStream(self, audio, headers, _take(self._faults, "stall", "cut"))
        stream.text = text
        return stream

    # -- WebSocket --------------------------------------------------------------------------
    async def _speak_ws(self, ws: WebSocket) -> None:
        self.ws_connections += 1
        record, rid = self._record("GET", ws), str(uuid.uuid4())
        try:
            fault = _take(self._faults, "refuse")
            if fault is not None:
                error = json.loads(fault.body)
                raise _Reject(fault.status, error.get("err_code", ""), error.get("err_msg", ""))
            model = self._check(ws.headers, ws.query_params)
            encoding, rate, _ = _audio_params(ws.query_params, websocket=True)
        except _Reject as reject:
            record.status = reject.status
            error = json.dumps(
                {"err_code": reject.code, "err_msg": reject.message, "request_id": rid}
            )
            headers = {"dg-request-id": rid, "dg-error": error}
            await ws.send_denial_response(
                Response(error, reject.status, headers, "application/json")
            )
            return
        record.status = 101
        await ws.accept(headers=[(b"dg-request-id", rid.encode())])
        self.ws_open += 1
        try:
            await ws.send_json(
                {
                    "type": "Metadata",
                    "request_id": rid,
                    "model_name": model,
                    "model_version": "fake",
                    "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, model)),
                }
            )
            await _Session(self, ws, encoding, rate).run()
        finally:
            self.ws_open -= 1


class _Session:
    """One accepted WebSocket: a reader that parses client messages into ordered operations and a
    writer that performs them, so a ``Clear`` can stop audio of earlier flushes mid-way."""

    def __init__(self, fake: FakeDeepgram, ws: WebSocket, encoding: str, rate: int) -> None:
        self.fake, self.ws, self.encoding, self.rate = fake, ws, encoding, rate
        self.buffer: list[str] = []
        self.generation = 0  # bumped by Clear; audio of older generations is dropped
        self.woken = asyncio.Event()
        self.ops: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.flush_times: deque[float] = deque()
        self.flushed_seq = self.cleared_seq = 0

    async def run(self) -> None:
        writer = asyncio.create_task(self._write_loop())
        try:
            if await self._read_loop():  # the client sent Close: let the writer finish
                await asyncio.wait({writer}, timeout=self.fake.stall_limit)
        finally:
            writer.cancel()
            await asyncio.wait({writer})

    async def _read_loop(self) -> bool:
        """Turn client messages into ops; True when the writer should be let finish."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.woken.set()
                return False
            if message.get("text") is None:
                self.ops.put_nowait(("close", (1003, "Binary messages are not accepted.")))
                return True
            try:
                data = json.loads(message["text"])
                kind = data["type"]
            except (ValueError, TypeError, KeyError):
                self.ops.put_nowait(("warn", ("Could not parse the message.", "INVALID_MESSAGE")))
                continue
            self.fake.ws_messages.append(data)
            if kind == "Speak":
                text = data.get("text")
                if not isinstance(text, str) or len(text) > MAX_CHARS:
                    self.ops.put_nowait(
                        ("close", (1009, f"Speak text over {MAX_CHARS} characters."))
                    )
                    return True
                self.buffer.append(text)
            elif kind == "Flush":
                self._flush()
            elif kind == "Clear":
                self.buffer.clear()
                self.generation += 1
                self.woken.set()
                self.ops.put_nowait(("clear", None))
            elif kind == "Close":
                if self.buffer:
                    self.ops.put_nowait(("flush", (self.generation, "".join(self.buffer))))
                self.ops.put_nowait(("close", (1000, "")))
                return True
            else:
                self.ops.put_nowait(
                    ("warn", (f"Unknown message type {kind!r}.", "INVALID_MESSAGE"))
                )

    def _flush(self) -> None:
        now = self.fake.clock()
        while self.flush_times and now - self.flush_times[0] >= self.fake.flush_window:
            self.flush_times.popleft()
        if len(self.flush_times) >= self.fake.flush_limit:
            description = (
                f"Flush limit of {self.fake.flush_limit} per {self.fake.flush_window:g} s"
                " reached; flush ignored."
            )
            self.ops.put_nowait(("warn", (description, "FLUSH_LIMIT")))
            return
        self.flush_times.append(now)
        self.ops.put_nowait(("flush", (self.generation, "".join(self.buffer))))
        self.buffer.clear()

    async def _write_loop(self) -> None:
        try:
            while True:
                op, arg = await self.ops.get()
                if op == "flush" and not await self._speak(*arg):
                    return
                if op == "clear":
                    await self.ws.send_json({"type": "Cleared", "sequence_id": self.cleared_seq})
                    self.cleared_seq += 1
                elif op == "warn":
                    await self.ws.send_json(
                        {"type": "Warning", "description": arg[0], "code": arg[1]}
                    )
                elif op == "close":
                    await self.ws.close(*arg)
                    return
        except Exception:  # the client went away mid-send: nothing left to do
            return

    async def _speak(self, generation: int, text: str) -> bool:
        """Audio of one flush, then ``Flushed``. False when the socket was closed by a fault."""
        if generation != self.generation:
            return True
        fake = self.fake
        fake.arrivals[text] = fake.clock()
        fault = _take(fake._faults, "ws_close", "ws_stall", "ws_warn", "ws_close_flushed")
        if fault is not None and fault.kind == "ws_warn":
            await self.ws.send_json(
                {"type": "Warning", "description": fault.body.decode(), "code": fault.reason}
            )
        if fault is not None and fault.kind == "ws_stall":
            self.woken.clear()
            with contextlib.suppress(TimeoutError):  # (not wait_for: it can swallow a cancel)
                async with asyncio.timeout(fake.stall_limit):
                    await self.woken.wait()
            return True
        audio = synthesize(text, self.encoding, self.rate) if text.strip() else b""
        closing = fault is not None and fault.kind == "ws_close"
        limit = min(fault.n_bytes, len(audio)) if fault is not None and closing else len(audio)
        await fake.sleep(fake.first_byte_delay)
        fake.first_bytes[text] = fake.clock()
        sent = 0
        while sent < limit and generation == self.generation:
            piece = audio[sent : min(sent + fake.chunk_size, limit)]
            await self.ws.send_bytes(piece)
            sent += len(piece)
            if fake.bytes_per_second:
                await fake.sleep(len(piece) / fake.bytes_per_second)
        if generation != self.generation:
            return True
        if fault is not None and closing:
            await self.ws.close(fault.code, fault.reason)
            return False
        await self.ws.send_json({"type": "Flushed", "sequence_id": self.flushed_seq})
        self.flushed_seq += 1
        if fault is not None and fault.kind == "ws_close_flushed":
            await self.ws.close(fault.code, fault.reason)
            return False
        return True


def main(argv: list[str] | None = None) -> None:
    """Serve a fake Deepgram on loopback: ``python -m callspeak.testing.fake_deepgram --port N``."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="A fake Deepgram Aura server for tests/benches.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--first-byte-delay", type=float, default=0.15)
    parser.add_argument("--chunk-size", type=int, default=333)
    parser.add_argument("--bytes-per-second", type=float, default=None)
    args = parser.parse_args(argv)
    fake = FakeDeepgram(
        args.api_key,
        first_byte_delay=args.first_byte_delay,
        chunk_size=args.chunk_size,
        bytes_per_second=args.bytes_per_second,
    )
    uvicorn.run(fake.app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
