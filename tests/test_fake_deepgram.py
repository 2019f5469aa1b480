"""The fake Deepgram server itself, over real loopback sockets."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_deepgram import FakeDeepgram, WsVerdict, synthesize
from callspeak.testing.fake_deepgram import main as fake_deepgram_main
from callspeak.testing.fake_deepgram.audio import (
    SECONDS_PER_CHAR,
    alaw_encode,
    mulaw_encode,
    pcm_for_text,
)
from callspeak.testing.fake_deepgram.websocket import WebSocketSession
from callspeak.testing.processes import wait_until_listening
from callspeak.tts.base import TTSError
from callspeak.tts.deepgram_rest import DeepgramRestService
from callspeak.tts.deepgram_ws import DeepgramWebSocketService
from tests.fakes import SettableClock

AUTH = {"Authorization": "Token test-key"}
PHONE = {
    "model": "aura-2-thalia-en",
    "encoding": "mulaw",
    "sample_rate": "8000",
    "container": "none",
}


@pytest.fixture
async def client(base: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as c:
        yield c


async def speak(
    client: httpx.AsyncClient, text: Any = "Hello.", params: dict[str, str] | None = None, **kw: Any
) -> httpx.Response:
    kw.setdefault("headers", AUTH)
    if "content" not in kw:
        kw["json"] = {"text": text}
    return await client.post("/v1/speak", params=PHONE if params is None else params, **kw)


async def test_rest_and_streaming_limits_are_counted_apart_and_reported(
    client: httpx.AsyncClient, base: str, fake: FakeDeepgram
) -> None:
    """Deepgram's rate-limit page lists "Text to Speech REST" and "Text to Speech Streaming" as
    two limits: two answers in progress fill the REST one (the third is refused), and a socket
    is still accepted; ``/_fake/counts`` tells a benchmark in another process what happened."""
    fake.max_concurrent, fake.bytes_per_second = 2, 8000  # answers stream in real time
    params = {"params": PHONE, "headers": AUTH}
    async with (
        client.stream("POST", "/v1/speak", json={"text": "One, two."}, **params) as one,
        client.stream("POST", "/v1/speak", json={"text": "Three, four."}, **params) as two,
    ):
        assert (one.status_code, two.status_code) == (200, 200)
        third = await speak(client)
        assert third.status_code == 429 and third.json()["err_code"] == "TOO_MANY_REQUESTS"
        url = base.replace("http", "ws") + "/v1/speak?model=aura-2-thalia-en"
        async with connect(url, additional_headers=AUTH) as ws:
            assert json.loads(await ws.recv())["type"] == "Metadata"
    counts = (await client.get("/_fake/counts")).json()
    assert counts == {"statuses": {"200": 2, "429": 1, "101": 1}, "rest_peak": 2, "ws_peak": 1}


# -- audio ---------------------------------------------------------------------------------
def test_synthetic_audio_is_deterministic_speechlike_and_grows_with_text() -> None:
    short, longer = synthesize("Hi"), synthesize("Hi there")
    assert len(short) == 2 * 480 and len(longer) == 8 * 480  # 60 ms of 8 kHz μ-law per char
    assert synthesize("Hi") == short
    assert len(set(short)) > 20  # not silence (μ-law silence is one repeated byte)
    assert len(synthesize("Hi", "linear16", 24000)) == 2 * 1440 * 2


def test_wav_container_header() -> None:
    wav = synthesize("Hey", "linear16", 16000, "wav")
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
    tag, channels, rate = struct.unpack("<HHI", wav[20:28])
    assert (tag, channels, rate) == (1, 1, 16000)
    assert wav[36:40] == b"data" and struct.unpack("<I", wav[40:44])[0] == len(wav) - 44
    assert struct.unpack("<H", synthesize("Hey", "mulaw", 8000, "wav")[20:22])[0] == 7
    assert struct.unpack("<H", synthesize("Hey", "alaw", 8000, "wav")[20:22])[0] == 6


# -- REST validation -------------------------------------------------------------------------
async def test_auth_refused(client: httpx.AsyncClient) -> None:
    for headers in (
        {},
        {"Authorization": "Token nope"},
        {"Authorization": "test-key"},
        {"Authorization": "Basic test-key"},  # the right key under another scheme
    ):
        response = await speak(client, headers=headers)
        assert response.status_code == 401
        body = response.json()
        assert body["err_code"] == "INVALID_AUTH"
        assert body["request_id"] == response.headers["dg-request-id"]


async def test_bearer_accepted(client: httpx.AsyncClient) -> None:
    response = await speak(client, headers={"Authorization": "Bearer test-key"})
    assert response.status_code == 200


async def test_model_names(client: httpx.AsyncClient) -> None:
    for model in ("aura-asteria-en", "aura-2-thalia-en", "aura-2-celeste-es", "aura-2-x-ja"):
        response = await speak(client, params={**PHONE, "model": model})
        assert response.status_code == 200 and response.headers["dg-model-name"] == model
    for model in ("nova-3", "aura-2-thalia-xx", "aura-3-x-en", "AURA-asteria-en", "aura-x-es"):
        response = await speak(client, params={**PHONE, "model": model})
        assert response.status_code == 400 and response.json()["err_code"] == "Bad Request"


INVALID_QUERIES: list[dict[str, str]] = [
    {"encoding": "wma"},
    {"encoding": "mp3"},
    {"sample_rate": "24000"},
    {"sample_rate": "abc"},
    {"encoding": "linear16", "sample_rate": "44100"},
    {"encoding": "alaw", "sample_rate": "48000"},
    {"container": "ogg"},
]


async def test_invalid_query_parameter(client: httpx.AsyncClient) -> None:
    for override in INVALID_QUERIES:
        response = await speak(client, params={**PHONE, **override})
        assert response.status_code == 400, override
        assert response.json()["err_code"] == "INVALID_QUERY_PARAMETER"


BODY_CASES: list[tuple[dict[str, Any], int, str]] = [
    (
        {"content": b"{not json", "headers": {**AUTH, "Content-Type": "application/json"}},
        400,
        "PAYLOAD_ERROR",
    ),
    ({"text": ""}, 400, "Bad Request"),
    ({"text": "   "}, 400, "Bad Request"),
    ({"text": 5}, 400, "Bad Request"),
    ({"text": "x" * 2001}, 413, "PAYLOAD_TOO_LARGE"),
    (
        {"content": b"hello", "headers": {**AUTH, "Content-Type": "text/plain"}},
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    ),
]


async def test_body_validation(client: httpx.AsyncClient) -> None:
    for kwargs, status, code in BODY_CASES:
        response = await speak(client, **kwargs)
        assert response.status_code == status and response.json()["err_code"] == code, code


async def test_2000_chars_accepted(client: httpx.AsyncClient) -> None:
    response = await speak(client, "a" * 2000)
    assert response.status_code == 200 and response.headers["dg-char-count"] == "2000"


# -- REST success ----------------------------------------------------------------------------
async def test_streams_odd_chunks_chunked_with_headers(
    client: httpx.AsyncClient, fake: FakeDeepgram
) -> None:
    async with client.stream(
        "POST", "/v1/speak", params=PHONE, json={"text": "Hello world."}, headers=AUTH
    ) as r:
        chunks = [c async for c in r.aiter_raw()]
    assert r.headers["content-type"] == "audio/basic"
    assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
    assert r.headers["dg-char-count"] == "12" and r.headers["dg-request-id"]
    assert b"".join(chunks) == fake.audio_for("Hello world.")
    assert all(len(c) == 333 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 333
    record = fake.requests[-1]
    assert (record.method, record.path, record.text, record.status) == (
        "POST",
        "/v1/speak",
        "Hello world.",
        200,
    )
    assert record.query == PHONE and record.headers["authorization"] == "Token test-key"


async def test_rest_defaults_to_linear16_wav_24k(
    client: httpx.AsyncClient, fake: FakeDeepgram
) -> None:
    response = await speak(client, "Hi", params={})
    assert response.headers["content-type"] == "audio/wav"
    assert response.headers["dg-model-name"] == "aura-asteria-en"
    assert response.content == fake.audio_for("Hi", "linear16", 24000, "wav")
    assert response.content[:4] == b"RIFF"


async def test_first_byte_delay_is_honoured(client: httpx.AsyncClient, fake: FakeDeepgram) -> None:
    fake.first_byte_delay = 0.3
    started = time.perf_counter()
    response = await speak(client)
    assert response.status_code == 200
    assert time.perf_counter() - started >= 0.3
    # What a benchmark in another process reads: when the request came, when its audio began.
    arrivals = (await client.get("/_fake/arrivals")).json()
    first_bytes = (await client.get("/_fake/first-bytes")).json()
    assert first_bytes["Hello."] - arrivals["Hello."] >= 0.3


async def test_first_byte_delay_is_a_floor_even_when_timers_fire_early() -> None:
    # uvloop rounds timers to milliseconds and may wake a little before the deadline.
    clock = SettableClock(now=10.0)
    slept: list[float] = []

    async def early_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds * 0.9

    fake = FakeDeepgram(first_byte_delay=0.3, clock=clock, sleep=early_sleep)
    await fake.hold_first_byte(since=10.0)
    assert clock.now >= 10.3 - 1e-4
    assert len(slept) == 4 and slept[0] == pytest.approx(0.3)


async def test_first_byte_top_ups_outlast_millisecond_timers() -> None:
    # Like uvloop: a timer is whole milliseconds, rounded down, and fires a little early; a
    # sub-millisecond sleep returns at once. Topping up by the exact remainder would never land.
    clock = SettableClock(now=10.0)
    slept: list[float] = []

    async def millisecond_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += max(0.0, math.floor(seconds * 1000) / 1000 - 0.0002)

    fake = FakeDeepgram(first_byte_delay=0.3, clock=clock, sleep=millisecond_sleep)
    await fake.hold_first_byte(since=10.0)
    assert clock.now >= 10.3
    assert slept == [pytest.approx(0.3), pytest.approx(0.001)]


async def test_first_byte_wait_is_bounded_when_the_clock_stands_still() -> None:
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    fake = FakeDeepgram(first_byte_delay=0.3, clock=SettableClock(now=10.0), sleep=record)
    await fake.hold_first_byte(since=10.0)
    assert slept == [pytest.approx(0.3)] * 4


# -- REST faults -----------------------------------------------------------------------------
async def test_fail_next_json_plain_count_and_persistent(
    client: httpx.AsyncClient, fake: FakeDeepgram
) -> None:
    fake.fail_next(429, {"err_code": "TOO_MANY_REQUESTS", "err_msg": "slow down"}, count=2)
    fake.fail_next(500, "internal oops")
    responses = [await speak(client) for _ in range(4)]
    assert [r.status_code for r in responses] == [429, 429, 500, 200]
    assert responses[0].json()["err_code"] == "TOO_MANY_REQUESTS"
    assert responses[2].text == "internal oops"
    assert responses[2].headers["content-type"].startswith("text/plain")
    assert responses[2].headers["dg-request-id"]
    fake.fail_next(503, {"error_code": "BUSY"}, count=None)
    assert [(await speak(client)).status_code for _ in range(3)] == [503] * 3
    fake.clear_faults()
    assert (await speak(client)).status_code == 200


async def test_stall_after_keeps_connection_open(
    client: httpx.AsyncClient, fake: FakeDeepgram
) -> None:
    fake.stall_after(700)
    received = 0
    async with client.stream(
        "POST", "/v1/speak", params=PHONE, json={"text": "Hello there."}, headers=AUTH
    ) as r:
        chunks = r.aiter_raw()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.4):
                async for chunk in chunks:
                    received += len(chunk)
    assert received == 700


async def test_cut_after_drops_connection(client: httpx.AsyncClient, fake: FakeDeepgram) -> None:
    fake.cut_after(1000)
    received = 0
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream(
            "POST", "/v1/speak", params=PHONE, json={"text": "Hello there."}, headers=AUTH
        ) as r:
            async for chunk in r.aiter_raw():
                received += len(chunk)
    assert received == 1000
    assert (await speak(client)).status_code == 200  # the next request is served normally


async def test_paced_stream_takes_real_time(client: httpx.AsyncClient, fake: FakeDeepgram) -> None:
    fake.bytes_per_second = 16000  # 2x real time for 8 kHz μ-law
    started = time.perf_counter()
    response = await speak(client, "Hello world")  # 11 chars = 5280 bytes = 0.33 s at 2x
    assert len(response.content) == 5280
    assert time.perf_counter() - started >= 0.3


# -- WebSocket -------------------------------------------------------------------------------
WS_QUERY = "?model=aura-2-thalia-en&encoding=mulaw&sample_rate=8000"


async def ws_connect(base: str, query: str = WS_QUERY, key: str = "test-key") -> ClientConnection:
    url = base.replace("http://", "ws://") + "/v1/speak" + query
    return await connect(url, additional_headers={"Authorization": f"Token {key}"}, open_timeout=5)


async def send(ws: ClientConnection, kind: str, **fields: Any) -> None:
    await ws.send(json.dumps({"type": kind, **fields}))


async def audio_until_closed(ws: ClientConnection) -> tuple[bytes, ConnectionClosed]:
    """All audio received until the server closes the socket (within 5 s), and that close."""
    audio = bytearray()
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(5):
            while True:
                message = await ws.recv()
                audio += message if isinstance(message, bytes) else b""
    return bytes(audio), info.value


async def until(ws: ClientConnection, kind: str) -> tuple[bytes, list[dict[str, Any]]]:
    """Audio and events received up to and including the first event of ``kind``."""
    audio, events = bytearray(), []
    async with asyncio.timeout(5):
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                audio += message
                continue
            events.append(json.loads(message))
            if events[-1]["type"] == kind:
                return bytes(audio), events


async def test_ws_metadata_speak_flush(base: str, fake: FakeDeepgram) -> None:
    ws = await ws_connect(base)
    metadata = json.loads(await ws.recv())
    assert metadata["type"] == "Metadata" and metadata["model_name"] == "aura-2-thalia-en"
    assert {"request_id", "model_version", "model_uuid"} <= metadata.keys()
    await send(ws, "Speak", text="Hello ")
    await send(ws, "Speak", text="world.")
    await send(ws, "Flush")
    audio, events = await until(ws, "Flushed")
    assert audio == fake.audio_for("Hello world.")
    assert events[-1] == {"type": "Flushed", "sequence_id": 0}
    assert fake.first_bytes["Hello world."] >= fake.arrivals["Hello world."]
    await send(ws, "Speak", text="Again.")
    await send(ws, "Flush")
    audio, events = await until(ws, "Flushed")
    assert audio == fake.audio_for("Again.") and events[-1]["sequence_id"] == 1
    await ws.close()
    assert fake.ws_connections == 1
    assert [m["type"] for m in fake.ws_messages] == ["Speak", "Speak", "Flush", "Speak", "Flush"]


async def test_ws_clear_drops_audio_then_cleared(base: str, fake: FakeDeepgram) -> None:
    fake.bytes_per_second = 16000
    ws = await ws_connect(base)
    await ws.recv()
    await send(ws, "Speak", text="A long sentence that takes a while to say.")
    await send(ws, "Flush")
    first = await ws.recv()
    assert isinstance(first, bytes)
    await send(ws, "Clear")
    stale, events = await until(ws, "Cleared")
    assert events[-1] == {"type": "Cleared", "sequence_id": 0}
    assert len(first) + len(stale) < len(
        fake.audio_for("A long sentence that takes a while to say.")
    )
    assert all(e["type"] != "Flushed" for e in events)
    await send(ws, "Speak", text="Fresh.")
    await send(ws, "Flush")
    audio, _ = await until(ws, "Flushed")
    assert audio == fake.audio_for("Fresh.")  # nothing of the cleared utterance
    await ws.close()


async def test_ws_clear_drops_text_spoken_but_not_yet_flushed(
    base: str, fake: FakeDeepgram
) -> None:
    ws = await ws_connect(base)
    await ws.recv()
    await send(ws, "Speak", text="Never said. ")
    await send(ws, "Clear")
    await until(ws, "Cleared")
    await send(ws, "Speak", text="Fresh.")
    await send(ws, "Flush")
    audio, _ = await until(ws, "Flushed")
    assert audio == fake.audio_for("Fresh.")
    await ws.close()


async def test_ws_close_message_flushes_then_closes(base: str, fake: FakeDeepgram) -> None:
    ws = await ws_connect(base)
    await ws.recv()
    await send(ws, "Speak", text="Bye.")
    await send(ws, "Close")
    audio, closed = await audio_until_closed(ws)
    assert audio == fake.audio_for("Bye.")
    assert closed.rcvd is not None and closed.rcvd.code == 1000


async def test_ws_flush_limit_warns_and_ignores() -> None:
    clock = SettableClock()
    fake = FakeDeepgram(first_byte_delay=0.0, clock=clock)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as base:
        ws = await ws_connect(base)
        await ws.recv()
        for _ in range(20):
            await send(ws, "Speak", text="a")
            await send(ws, "Flush")
            await until(ws, "Flushed")
        await send(ws, "Speak", text="b")
        await send(ws, "Flush")
        audio, events = await until(ws, "Warning")
        assert audio == b"" and "limit" in events[-1]["description"].lower()
        clock.now += 60
        await send(ws, "Flush")  # the buffered "b" is still there
        audio, _ = await until(ws, "Flushed")
        assert audio == fake.audio_for("b")
        await ws.close()


async def test_ws_speak_over_limit_closes(base: str) -> None:
    ws = await ws_connect(base)
    await ws.recv()
    await send(ws, "Speak", text="x" * 2001)
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(5):
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_ws_handshake_refused(base: str, fake: FakeDeepgram) -> None:
    cases = [
        (WS_QUERY, "wrong", 401),
        ("?model=nope", "test-key", 400),
        ("?encoding=mp3", "test-key", 400),
        ("?container=wav", "test-key", 400),
    ]
    for query, key, status in cases:
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(base, query, key)
        response = info.value.response
        assert response.status_code == status
        body = json.loads(bytes(response.body or b""))
        assert body["request_id"] == response.headers["dg-request-id"]
        assert json.loads(response.headers["dg-error"])["err_code"] == body["err_code"]
    assert fake.ws_connections == len(cases) and fake.ws_open == 0


async def test_ws_defaults_to_linear16_24k(base: str, fake: FakeDeepgram) -> None:
    ws = await ws_connect(base, "")
    await ws.recv()
    await send(ws, "Speak", text="Hi")
    await send(ws, "Flush")
    audio, _ = await until(ws, "Flushed")
    assert audio == fake.audio_for("Hi", "linear16", 24000)
    await ws.close()


async def test_ws_refuse_fault_then_accept(base: str, fake: FakeDeepgram) -> None:
    fake.refuse_ws(503, {"err_code": "BUSY", "err_msg": "later"})
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(base)
    assert info.value.response.status_code == 503
    ws = await ws_connect(base)
    await ws.close()
    assert fake.ws_connections == 2


@pytest.mark.parametrize(("code", "reason"), [(1011, "boom"), (1006, "")])
async def test_ws_close_after_bytes(base: str, fake: FakeDeepgram, code: int, reason: str) -> None:
    """A close frame with the code and reason asked for; 1006, what a client sees when the socket
    dies without one (the reference's "sockets can close abruptly"), drops the TCP connection
    (before, the fake tried to send a 1006 close frame, which websockets refuses; the writer
    swallowed the error and the socket stayed open, silent: a stall instead)."""
    fake.ws_close_after(500, code, reason)
    ws = await ws_connect(base)
    await ws.recv()
    await send(ws, "Speak", text="Hello there.")
    await send(ws, "Flush")
    audio, closed = await audio_until_closed(ws)
    assert len(audio) == 500
    if code == 1006:
        assert closed.rcvd is None  # no close frame: the connection was dropped
    else:
        assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (code, reason)


async def test_ws_close_after_flushed(base: str, fake: FakeDeepgram) -> None:
    fake.ws_close_after_flushed(1001, "going away")
    ws = await ws_connect(base)
    await ws.recv()
    await send(ws, "Speak", text="Hi.")
    await send(ws, "Flush")
    await until(ws, "Flushed")
    async with asyncio.timeout(5):
        await ws.wait_closed()
    assert ws.close_code == 1001


async def test_ws_stall_then_clear_recovers(base: str, fake: FakeDeepgram) -> None:
    fake.ws_stall()
    ws = await ws_connect(base)
    await ws.recv()
    await send(ws, "Speak", text="Hi.")
    await send(ws, "Flush")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await ws.recv()
    await send(ws, "Clear")
    _, events = await until(ws, "Cleared")
    assert [e["type"] for e in events] == ["Cleared"]
    await ws.close()


async def test_ws_warning_fault(base: str, fake: FakeDeepgram) -> None:
    fake.ws_warn("flush rate high", "FLUSH_RATE")
    ws = await ws_connect(base)
    await ws.recv()
    await send(ws, "Speak", text="Hi.")
    await send(ws, "Flush")
    audio, events = await until(ws, "Flushed")
    assert events[0] == {"type": "Warning", "description": "flush rate high", "code": "FLUSH_RATE"}
    assert audio == fake.audio_for("Hi.")
    await ws.close()


@pytest.mark.parametrize(
    ("encoding", "rate"), [("mulaw", 8000), ("alaw", 8000), ("linear16", 24000)]
)
def test_synthesis_from_cached_characters_equals_whole_text_encoding(
    encoding: str, rate: int
) -> None:
    """The fake joins per-character bursts; that must be the bytes of encoding the whole text."""
    text = "Hello there, caller 7! é☎"
    pcm = pcm_for_text(text, rate)
    whole = {
        "mulaw": lambda: mulaw_encode(pcm),
        "alaw": lambda: alaw_encode(pcm),
        "linear16": lambda: pcm.astype("<i2").tobytes(),
    }[encoding]()
    assert synthesize(text, encoding, rate) == whole
    assert len(whole) == len(text) * int(rate * SECONDS_PER_CHAR) * (
        2 if encoding == "linear16" else 1
    )


# -- the WebSocket's connection (speak_socket) ------------------------------------------------
async def test_ws_other_paths_are_not_found(base: str, fake: FakeDeepgram) -> None:
    url = base.replace("http://", "ws://") + "/v1/listen" + WS_QUERY
    with pytest.raises(InvalidStatus) as info:
        await connect(url, additional_headers=AUTH, open_timeout=5)
    assert info.value.response.status_code == 404
    assert fake.ws_connections == 0 and fake.requests == []


async def test_ws_broken_handshake_gets_websockets_answer(base: str, fake: FakeDeepgram) -> None:
    """An upgrade without a WebSocket key is refused by websockets (400), before the fake."""
    reader, writer = await asyncio.open_connection(*base.removeprefix("http://").split(":"))
    writer.write(
        b"GET /v1/speak" + WS_QUERY.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Authorization: Token test-key\r\n\r\n"
    )
    async with asyncio.timeout(5):
        status = await reader.readline()
    writer.close()
    assert status.startswith(b"HTTP/1.1 400 ")
    assert fake.ws_connections == 0


async def test_ws_records_headers_and_query(base: str, fake: FakeDeepgram) -> None:
    ws = await ws_connect(base)
    await ws.close()
    (record,) = fake.requests
    assert (record.method, record.path, record.status) == ("GET", "/v1/speak", 101)
    assert record.query == {"model": "aura-2-thalia-en", "encoding": "mulaw", "sample_rate": "8000"}
    assert record.headers["authorization"] == "Token test-key"
    assert record.headers["host"] == base.removeprefix("http://")


async def test_ws_fragmented_speak_is_joined(base: str, fake: FakeDeepgram) -> None:
    ws = await ws_connect(base)
    await ws.recv()
    await ws.send(iter(['{"type": "Speak", ', '"text": "Split in ', 'three."}']))
    await send(ws, "Flush")
    audio, _ = await until(ws, "Flushed")
    assert audio == fake.audio_for("Split in three.")
    await ws.close()


async def test_ws_binary_message_closes_1003(base: str) -> None:
    ws = await ws_connect(base)
    await ws.recv()
    await ws.send(b"\x00\x01")
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(5):
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1003


async def test_ws_invalid_utf8_closes_1007(base: str) -> None:
    """A text frame that is not UTF-8 fails the socket (RFC 6455 §8.1), sent as raw bytes: a
    well-behaved client cannot send one."""
    ws = await ws_connect(base)
    await ws.recv()
    transport = ws.transport  # (uvloop's transports are not asyncio.WriteTransport subclasses)
    key = b"\x01\x02\x03\x04"
    payload = bytes(b ^ key[i % 4] for i, b in enumerate(b"\xff\xfe"))
    transport.write(b"\x81\x82" + key + payload)  # FIN + text, masked, 2 bytes
    async with asyncio.timeout(5):
        await ws.wait_closed()
    assert ws.close_code == 1007


async def test_ws_open_sockets_close_1012_at_shutdown() -> None:
    fake = FakeDeepgram(first_byte_delay=0.0)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as base:
        ws = await ws_connect(base)
        await ws.recv()
        assert fake.ws_open == 1
    async with asyncio.timeout(5):
        await ws.wait_closed()
    assert ws.close_code == 1012 and fake.ws_open == 0


class ScriptedPeer:
    """A client's end for a session, without a socket: hands out ``messages`` (each with when it
    was read), then waits until the test lets it go; records what the session sent."""

    def __init__(self, messages: list[tuple[str | bytes, float]]) -> None:
        self.messages, self.sent = list(messages), list[Any]()
        self.done = asyncio.Event()

    async def receive(self) -> tuple[str | bytes, float] | None:
        if self.messages:
            return self.messages.pop(0)
        await self.done.wait()
        return None

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))
        if self.sent[-1]["type"] == "Flushed":
            self.done.set()

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.done.set()


async def test_ws_first_byte_delay_runs_from_the_flush_being_read() -> None:
    """The session counts the delay from when the socket read the Flush, not from when its task
    got to it: a fake kept busy meanwhile does not add its own lateness to Deepgram's."""
    clock = SettableClock(now=5.0)  # the session runs at 5.0; the Flush was read at 2.0
    fake = FakeDeepgram(first_byte_delay=0.2, clock=clock)
    peer = ScriptedPeer(
        [(json.dumps({"type": "Speak", "text": "Hi."}), 1.9), ('{"type": "Flush"}', 2.0)]
    )
    async with asyncio.timeout(5):
        await WebSocketSession(fake, peer, "mulaw", 8000, collections.deque()).run()
    assert fake.arrivals["Hi."] == 2.0
    assert fake.first_bytes["Hi."] == 5.0  # 0.2 s after 2.0 had passed already: no more waiting
    assert b"".join(m for m in peer.sent if isinstance(m, bytes)) == fake.audio_for("Hi.")


async def test_ws_audio_waits_for_a_client_that_does_not_read() -> None:
    """The fake writes no faster than the client reads: its write buffer stays bounded (about
    uvicorn's 64 KiB high-water mark), and nothing is lost once the client reads again."""
    peers: list[Any] = []

    class Watched(FakeDeepgram):
        def serve_ws(self, peer: Any, verdict: Any) -> Any:
            peers.append(peer)
            return super().serve_ws(peer, verdict)

    fake = Watched(first_byte_delay=0.0)
    text = "x" * 2000  # 11.5 MB as linear16 at 48 kHz: more than loopback's socket buffers
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as base:
        ws = await ws_connect(base, "?encoding=linear16&sample_rate=48000")
        await ws.recv()
        await send(ws, "Speak", text=text)
        await send(ws, "Flush")
        await asyncio.sleep(0.5)  # the client reads nothing meanwhile
        assert text in fake.first_bytes
        (peer,) = peers
        assert peer._transport.get_write_buffer_size() < 128 * 1024
        audio, events = await until(ws, "Flushed")
        await ws.close()
    assert audio == fake.audio_for(text, "linear16", 48000) and events[-1]["type"] == "Flushed"


async def test_ws_refusal_with_a_status_http_does_not_name(base: str, fake: FakeDeepgram) -> None:
    fake.refuse_ws(529, {"err_code": "OVERLOADED", "err_msg": "try later"})
    with pytest.raises(InvalidStatus) as info:
        await ws_connect(base)
    response = info.value.response
    assert response.status_code == 529
    assert json.loads(response.headers["dg-error"])["err_code"] == "OVERLOADED"
    assert json.loads(bytes(response.body or b""))["err_msg"] == "try later"


async def test_ws_socket_is_closed_when_the_session_gives_up() -> None:
    """A Close whose flush stalls: the session stops waiting after stall_limit, and the socket
    is closed then rather than left open with nobody serving it."""
    fake = FakeDeepgram(first_byte_delay=0.0, stall_limit=0.3)
    fake.ws_stall()
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as base:
        ws = await ws_connect(base)
        await ws.recv()
        await send(ws, "Speak", text="Hi.")
        await send(ws, "Flush")
        await send(ws, "Close")
        async with asyncio.timeout(3):
            await ws.wait_closed()
        assert ws.close_code == 1000 and fake.ws_open == 0


async def test_ws_shutdown_does_not_wait_for_a_client_that_never_answers() -> None:
    fake = FakeDeepgram(first_byte_delay=0.0)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /v1/speak" + WS_QUERY.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Token test-key\r\n\r\n"
        )
        async with asyncio.timeout(5):
            assert (await reader.readline()).startswith(b"HTTP/1.1 101 ")
        leaving = time.monotonic()
    took = time.monotonic() - leaving  # serve_asgi allows 2 s for a graceful shutdown
    async with asyncio.timeout(5):
        rest = await reader.read()  # the 1012 close frame, then EOF: the fake hung up
    writer.close()
    assert took < 1.5 and b"\x88" in rest and fake.ws_open == 0


async def test_ws_open_count_survives_a_session_cancelled_before_it_ran() -> None:
    fake = FakeDeepgram(first_byte_delay=0.0)
    verdict = WsVerdict("rid", 101, model="aura-2-thalia-en", encoding="mulaw", rate=8000)
    task = fake.serve_ws(ScriptedPeer([]), verdict)
    assert fake.ws_open == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert fake.ws_open == 0


async def test_ws_session_failure_is_logged_and_closed_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing(ScriptedPeer):
        closed: tuple[int, str] | None = None

        async def receive(self) -> tuple[str | bytes, float] | None:
            raise RuntimeError("a bug")

        async def close(self, code: int = 1000, reason: str = "") -> None:
            self.closed = (code, reason)

    fake, peer = FakeDeepgram(first_byte_delay=0.0), Failing([])
    verdict = WsVerdict("rid", 101, model="aura-2-thalia-en", encoding="mulaw", rate=8000)
    async with asyncio.timeout(5):
        await fake.serve_ws(peer, verdict)
    assert peer.closed == (1011, "internal error") and fake.ws_open == 0
    assert "WebSocket session failed" in caplog.text


@pytest.fixture
def fake_over_tls(self_signed: tuple[Path, Path]) -> Iterator[str]:
    """The fake's command line serving https:// and wss:// with a throw-away certificate;
    yields ``host:port``."""
    cert, key = self_signed
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [
        sys.executable, "-m", "callspeak.testing.fake_deepgram", "--port", str(port),
        "--first-byte-delay", "0", "--certfile", str(cert), "--keyfile", str(key),
    ]  # fmt: skip
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            wait_until_listening(proc, port, timeout=20)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert f"CALLSPEAK_DEEPGRAM_URL=https://127.0.0.1:{port} " in line, line
            assert f"CALLSPEAK_DEEPGRAM_WS_URL=wss://127.0.0.1:{port} " in line, line
            assert line.rstrip().endswith(f"SSL_CERT_FILE={cert}"), line
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


async def test_the_command_line_serves_both_voices_over_tls(
    fake_over_tls: str, self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Deepgram is reached (https://, wss://): the real clients, trusting the certificate
    through ``SSL_CERT_FILE`` as a private CA would be, get the fake's audio."""
    monkeypatch.setenv("SSL_CERT_FILE", str(self_signed[0]))
    text = "Over TLS."
    rest = DeepgramRestService("test-key", base_url=f"https://{fake_over_tls}")
    ws = DeepgramWebSocketService("test-key", ws_url=f"wss://{fake_over_tls}")
    try:
        for service in (rest, ws):
            provider = service.open()
            async with asyncio.timeout(10):
                audio = b"".join([chunk async for chunk in provider.stream(text)])
            await provider.aclose()
            assert audio == synthesize(text), service.name
    finally:
        await rest.aclose()
        await ws.aclose()


def test_the_command_line_wants_a_key_with_a_certificate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fake_deepgram_main(["--port", "1", "--certfile", "cert.pem"])
    assert exit_info.value.code == 2
    assert "--certfile and --keyfile go together" in capsys.readouterr().err


@pytest.mark.parametrize(("code", "reason"), [(1005, ""), (999, ""), (5000, ""), (1011, "x" * 124)])
def test_a_close_no_server_can_send_is_refused_when_injected(code: int, reason: str) -> None:
    """Codes a close frame may not carry (1005, 1015, out of range) and reasons over 123 bytes
    are refused at once, rather than becoming a silent stall mid-test."""
    fake = FakeDeepgram()
    with pytest.raises(ValueError):
        fake.ws_close_after(0, code, reason)
    with pytest.raises(ValueError):
        fake.ws_close_after_flushed(code, reason)


async def test_rest_stall_never_ends_as_a_complete_answer() -> None:
    """A stall that outlasts ``stall_limit`` ends with the connection dropped, not with the
    chunked body's last chunk: the client must not take the truncated audio for a whole answer."""
    fake = FakeDeepgram(first_byte_delay=0.0, stall_limit=0.3)
    fake.stall_after(1000)
    async with serve_asgi(fake.app) as base, httpx.AsyncClient(base_url=base, timeout=5) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post("/v1/speak", params=PHONE, headers=AUTH, json={"text": "Hello there."})


async def test_callspeak_retries_a_socket_dropped_mid_utterance(
    base: str, fake: FakeDeepgram
) -> None:
    """callspeak's own handling of 1006 (deepgram_ws: "Its own trouble (1011 NET-…, 1006, 1001)
    is worth the one retry"), which the fake could not produce before."""
    fake.ws_close_after(480, 1006)
    service = DeepgramWebSocketService(
        "test-key", ws_url=base.replace("http", "ws"), model="aura-2-thalia-en"
    )
    provider = service.open()
    received = 0
    with pytest.raises(TTSError, match="1006") as info:
        async with asyncio.timeout(5):
            async for chunk in provider.stream("Hello there."):
                received += len(chunk)
    assert received == 480 and info.value.retryable and info.value.code == "1006"
    again = bytearray()
    async with asyncio.timeout(5):
        async for chunk in provider.stream("Again."):
            again += chunk
    assert bytes(again) == fake.audio_for("Again.")
    await provider.aclose()
    await service.aclose()
