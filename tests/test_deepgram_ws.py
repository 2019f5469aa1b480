"""DeepgramWebSocketService / Provider against the fake Deepgram on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_deepgram import FakeDeepgram
from callspeak.tts.base import TTSAuthError, TTSError, TTSProvider, TTSService, worth_trying
from callspeak.tts.deepgram_ws import (
    DeepgramWebSocketProvider,
    DeepgramWebSocketService,
    speak_texts,
)
from callspeak.tts.resolved_host import AddrInfo
from tests.fakes import SettableClock
from tests.test_server_limits import until

LONG = "A long sentence that keeps on talking for a good while, so we can interrupt it."


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without this, a machine's ``http_proxy`` or ``socks_proxy`` would send these sockets
    through it (websockets reads them all); a test that wants a proxy sets its own."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def ws_url(base: str) -> str:
    return base.replace("http://", "ws://")


def make(ws_url: str, key: str = "test-key", **kw: Any) -> DeepgramWebSocketService:
    kw.setdefault("receive_timeout", 3.0)  # generous: CI runs in asyncio debug mode
    kw.setdefault("backoff", 0.01)
    return DeepgramWebSocketService(key, ws_url=ws_url, **kw)


async def collect(it: AsyncIterator[bytes]) -> bytes:
    async with asyncio.timeout(5):
        return b"".join([chunk async for chunk in it])


async def test_utterances_share_one_socket(ws_url: str, fake: FakeDeepgram) -> None:
    service = make(ws_url)
    provider = service.open()
    assert isinstance(service, TTSService) and isinstance(provider, TTSProvider)
    assert fake.ws_connections == 0  # lazy
    assert await collect(provider.stream("Hello there.")) == fake.audio_for("Hello there.")
    assert await collect(provider.stream("Second one.")) == fake.audio_for("Second one.")
    assert fake.ws_connections == 1 and provider.request_id
    assert fake.requests[0].query == {
        "model": "aura-2-thalia-en",
        "encoding": "mulaw",
        "sample_rate": "8000",
    }
    assert fake.requests[0].headers["authorization"] == "Token test-key"
    kinds = [m["type"] for m in fake.ws_messages]
    assert kinds == ["Speak", "Flush", "Speak", "Flush"]
    await provider.aclose()
    await provider.aclose()
    assert fake.ws_messages[-1] == {"type": "Close"}
    with pytest.raises(TTSError, match="closed"):
        await collect(provider.stream("Again."))


async def test_long_text_is_several_speaks_one_flush(ws_url: str, fake: FakeDeepgram) -> None:
    provider = make(ws_url).open()
    text = " ".join(f"Sentence {i} is here." for i in range(150))  # ~3000 chars
    audio = await collect(provider.stream(text))
    speaks = [m["text"] for m in fake.ws_messages if m["type"] == "Speak"]
    assert len(speaks) == 2 and all(len(s) <= 2000 for s in speaks)
    assert [m["type"] for m in fake.ws_messages].count("Flush") == 1
    assert audio == fake.audio_for("".join(speaks))
    # Deepgram speaks them joined as sent: the space between two sentences survives the split
    assert "".join(speaks) == text
    await provider.aclose()


async def test_one_sentence_split_at_whitespace_keeps_its_words_apart(
    ws_url: str, fake: FakeDeepgram
) -> None:
    provider = make(ws_url).open()
    text = " ".join(["word"] * 600)  # 2999 characters and no punctuation: one sentence
    audio = await collect(provider.stream(text))
    speaks = [m["text"] for m in fake.ws_messages if m["type"] == "Speak"]
    assert len(speaks) == 2 and all(len(s) <= 2000 for s in speaks)
    assert "".join(speaks) == text and audio == fake.audio_for(text)
    await provider.aclose()


def test_speak_texts_end_in_the_space_the_split_took_away() -> None:
    assert speak_texts("Short.") == ["Short."]
    assert speak_texts("   ") == []
    texts = speak_texts("x" * 1999 + " " + "y" * 10)
    assert texts == ["x" * 1999 + " ", "y" * 10]
    assert all(len(t) <= 2000 for t in speak_texts("word " * 1000))


async def test_clear_then_next_utterance_has_no_stale_audio(
    ws_url: str, fake: FakeDeepgram
) -> None:
    fake.bytes_per_second = 16000
    provider = make(ws_url).open()
    stream = provider.stream(LONG)
    assert await anext(stream)
    await provider.clear()
    with pytest.raises(StopAsyncIteration):  # the cleared stream ends quietly
        await anext(stream)
    fake.bytes_per_second = None
    assert await collect(provider.stream("Fresh.")) == fake.audio_for("Fresh.")
    kinds = [m["type"] for m in fake.ws_messages]
    assert kinds == ["Speak", "Flush", "Clear", "Speak", "Flush"]
    await provider.aclose()


async def test_clear_from_another_task(ws_url: str, fake: FakeDeepgram) -> None:
    fake.bytes_per_second = 16000
    provider = make(ws_url).open()
    first = asyncio.Event()

    async def speak() -> bytes:
        audio = bytearray()
        async for chunk in provider.stream(LONG):
            audio += chunk
            first.set()
        return bytes(audio)

    task = asyncio.create_task(speak())
    async with asyncio.timeout(2):
        await first.wait()
    await provider.clear()
    async with asyncio.timeout(2):
        partial = await task
    assert 0 < len(partial) < len(fake.audio_for(LONG))
    fake.bytes_per_second = None
    assert await collect(provider.stream("Next.")) == fake.audio_for("Next.")
    await provider.aclose()


async def test_abandoned_stream_does_not_leak_into_next(ws_url: str, fake: FakeDeepgram) -> None:
    fake.bytes_per_second = 16000
    provider = make(ws_url).open()
    stream = provider.stream(LONG)
    assert await anext(stream)
    await stream.aclose()
    fake.bytes_per_second = None
    assert await collect(provider.stream("After.")) == fake.audio_for("After.")
    assert fake.ws_connections == 1
    await provider.aclose()


async def test_a_clear_cancelled_while_its_send_waits_for_the_network_still_drops_old_audio(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """``Clear`` is written, but its send still waits for a full TCP buffer to drain when the
    task calling ``clear()`` is cancelled: its ``Cleared`` is still awaited before the next
    utterance, so the old audio that arrived meanwhile is discarded, not played in its place."""
    sockets: list[ClientConnection] = []

    async def keep(url: str, **kwargs: Any) -> ClientConnection:
        sockets.append(await connect(url, **kwargs))
        return sockets[-1]

    fake.bytes_per_second = 16000
    provider = make(ws_url, connect=keep).open()
    stream = provider.stream(LONG)
    assert await anext(stream)
    await asyncio.sleep(0.1)  # more of the old audio arrives, unread
    ws = sockets[0]
    ws.pause_writing()  # what the transport calls when its buffer is over the high mark
    clearing = asyncio.create_task(provider.clear())
    async with asyncio.timeout(5):
        while not ws.drain_waiters:  # noqa: ASYNC110 (a send that waits announces nothing)
            await asyncio.sleep(0)
    clearing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await clearing
    ws.resume_writing()
    with pytest.raises(StopAsyncIteration):  # the cleared stream ends quietly
        await anext(stream)
    fake.bytes_per_second = None
    assert await collect(provider.stream("Fresh.")) == fake.audio_for("Fresh.")
    assert fake.ws_connections == 1
    await provider.aclose()


@pytest.mark.parametrize("waiting_on", ["Speak", "Flush"])
async def test_a_barge_in_while_a_send_waits_for_the_network_clears_what_it_wrote(
    ws_url: str, fake: FakeDeepgram, waiting_on: str
) -> None:
    """The speaker task is cancelled while its send of ``Speak`` (or ``Flush``) waits for a full
    TCP buffer to drain — the message is already written: the utterance is cleared, so its text
    is not spoken with the next one, nor its audio played in the next one's place."""
    sockets: list[ClientConnection] = []

    async def keep(url: str, **kwargs: Any) -> ClientConnection:
        sockets.append(await connect(url, **kwargs))
        return sockets[-1]

    provider = make(ws_url, connect=keep).open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    ws = sockets[0]
    send = ws.send

    async def send_into_a_full_buffer(message: Any, **kwargs: Any) -> None:
        if f'"{waiting_on}"' in message and not ws.paused:
            ws.pause_writing()  # what the transport calls when its buffer is over the high mark
        await send(message, **kwargs)

    ws.send = send_into_a_full_buffer  # type: ignore[method-assign]
    speaker = asyncio.create_task(collect(provider.stream(LONG)))
    async with asyncio.timeout(5):
        while not ws.drain_waiters:  # noqa: ASYNC110 (a send that waits announces nothing)
            await asyncio.sleep(0)
    speaker.cancel()  # a barge-in
    asyncio.get_running_loop().call_later(0.05, ws.resume_writing)  # the buffer drains
    with pytest.raises(asyncio.CancelledError):
        await speaker
    ws.send = send  # type: ignore[method-assign]
    await provider.clear()  # what the session does next
    assert await collect(provider.stream("New.")) == fake.audio_for("New.")
    kinds = [m["type"] for m in fake.ws_messages]
    cancelled = ["Speak", "Clear"] if waiting_on == "Speak" else ["Speak", "Flush", "Clear"]
    assert kinds == ["Speak", "Flush", *cancelled, "Speak", "Flush"]
    assert fake.ws_connections == 1
    await provider.aclose()


async def test_stall_raises_then_recovers(ws_url: str, fake: FakeDeepgram) -> None:
    fake.ws_stall()
    provider = make(ws_url, receive_timeout=0.2).open()
    with pytest.raises(TTSError, match="stalled") as info:
        await collect(provider.stream("Hi."))
    assert info.value.retryable
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert fake.ws_connections == 2
    await provider.aclose()


async def test_a_stall_mid_utterance_is_judged_by_the_stall_timeout(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """Silence before the first audio may last ``receive_timeout`` (first byte); once audio has
    come, ``stall_timeout``: CALLSPEAK_DEEPGRAM_STALL_TIMEOUT, as for the REST voice."""
    fake.ws_stall(960)
    provider = make(ws_url, receive_timeout=5.0, stall_timeout=0.2).open()
    received, began = 0, time.monotonic()
    with pytest.raises(TTSError, match="no more audio and no Flushed for 0.2 s") as info:
        async for chunk in provider.stream("Hello there."):
            received += len(chunk)
    assert received == 960 and info.value.retryable
    assert time.monotonic() - began < 2.0  # not the 5 s first-byte wait
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    await provider.aclose()


async def test_abrupt_close_mid_utterance(ws_url: str, fake: FakeDeepgram) -> None:
    fake.ws_close_after(480, 1011, "internal boom")
    provider = make(ws_url).open()
    received = 0
    with pytest.raises(TTSError, match="1011") as info:
        async with asyncio.timeout(5):
            async for chunk in provider.stream("Hello there."):
                received += len(chunk)
    assert received == 480 and info.value.retryable
    assert "internal boom" in str(info.value) and info.value.code == "1011"
    assert await collect(provider.stream("Again.")) == fake.audio_for("Again.")
    await provider.aclose()


async def test_bad_key_never_reconnects(ws_url: str, fake: FakeDeepgram) -> None:
    service = make(ws_url, key="wrong", max_reconnects=5)
    provider = service.open()
    with pytest.raises(TTSAuthError) as info:
        await collect(provider.stream("Hi."))
    assert info.value.status == 401 and info.value.code == "INVALID_AUTH"
    assert "DEEPGRAM_API_KEY" in str(info.value) and info.value.request_id
    assert not service.healthy and fake.ws_connections == 1
    with pytest.raises(TTSAuthError):
        await collect(service.open().stream("Hi."))
    assert fake.ws_connections == 1


async def test_a_due_recheck_sends_one_handshake_however_many_calls_ask(
    ws_url: str, fake: FakeDeepgram
) -> None:
    clock = SettableClock()
    service = make(ws_url, key="wrong", auth_recheck=60, clock=clock)
    with pytest.raises(TTSAuthError):
        await collect(service.open().stream("Hi."))
    clock.now += 60
    providers = [service.open() for _ in range(10)]
    results = await asyncio.gather(
        *(collect(p.stream("Hi.")) for p in providers), return_exceptions=True
    )
    assert all(isinstance(r, TTSAuthError) for r in results)
    assert fake.ws_connections == 2  # the first refusal, then one re-check
    for provider in providers:
        await provider.aclose()


async def test_reconnect_delays_are_jittered_around_the_exponential_backoff(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """Calls whose sockets Deepgram dropped together must not all reconnect in the same
    instants: each delay is drawn from half to one and a half times ``backoff`` × 2ⁿ."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    draws = iter([0.0, 0.5, 0.99])
    fake.refuse_ws(503, count=3)
    service = make(ws_url, max_reconnects=3, backoff=0.2, sleep=sleep, jitter=lambda: next(draws))
    provider = service.open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert slept == [pytest.approx(0.1), pytest.approx(0.4), pytest.approx(0.8 * 1.49)]
    await provider.aclose()


async def test_refused_credentials_are_tried_again_after_auth_recheck(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """A minute (``auth_recheck``) after a refusal, a connect tries the key again, once per
    interval: accepted, the service is healthy again; refused, the next try is a minute on."""
    clock = SettableClock()
    service = make(ws_url, key="granted-later", max_reconnects=5, auth_recheck=60, clock=clock)
    with pytest.raises(TTSAuthError):
        await collect(service.open().stream("Hi."))
    clock.now += 59.9
    with pytest.raises(TTSAuthError):  # not yet: no handshake
        await collect(service.open().stream("Hi."))
    assert fake.ws_connections == 1
    clock.now += 0.1
    with pytest.raises(TTSAuthError):  # tried, refused again
        await collect(service.open().stream("Hi."))
    assert fake.ws_connections == 2 and not service.healthy
    clock.now += 30
    with pytest.raises(TTSAuthError):  # the next try is 60 s from that refusal
        await collect(service.open().stream("Hi."))
    assert fake.ws_connections == 2
    fake.api_key = "granted-later"  # e.g. the project's permission granted, its balance topped up
    clock.now += 30
    provider = service.open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert service.healthy and fake.ws_connections == 3
    await provider.aclose()
    await service.aclose()


async def test_handshake_failures_retry_with_backoff(ws_url: str, fake: FakeDeepgram) -> None:
    fake.refuse_ws(503, count=2)
    provider = make(ws_url, max_reconnects=3).open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert fake.ws_connections == 3
    await provider.aclose()

    fake.refuse_ws(503, count=None)
    provider = make(ws_url, max_reconnects=2).open()
    with pytest.raises(TTSError, match="after 3 attempts") as info:
        await collect(provider.stream("Hi."))
    # Retried here already: a fallback takes over at once rather than running these again.
    assert not info.value.retryable and info.value.status == 503
    assert info.value.kind == "server"  # (the metric's label: what the last attempt met)
    assert fake.ws_connections == 6


async def test_a_handshake_refused_as_too_many_is_not_tried_again_until_the_rest_is_over(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """Deepgram's concurrency limit (one socket here): a second call's handshake is refused with
    429 once, not again with backoff; until its Retry-After has passed no call opens a socket
    (its connect fails at once), while the call whose socket is open goes on speaking."""
    fake.max_concurrent, fake.retry_after = 1, 2.0
    clock = SettableClock()
    service = make(ws_url, max_reconnects=3, clock=clock)
    first, second, third = service.open(), service.open(), service.open()
    assert await collect(first.stream("Hi.")) == fake.audio_for("Hi.")  # its socket stays open
    with pytest.raises(TTSError, match="concurrency limit is 1") as info:
        await collect(second.stream("Hi."))
    # Not retryable: a fallback chain speaks the text with its next voice at once.
    assert info.value.status == 429 and info.value.retry_after == 2.0
    assert not info.value.retryable and service.healthy and fake.ws_connections == 2
    with pytest.raises(TTSError, match="not opening a socket for 2.0 s more") as info:
        await collect(third.stream("Hi."))
    assert not info.value.retryable and fake.ws_connections == 2  # no handshake sent
    assert worth_trying(service)  # (the open socket's call is not sent to the next voice)
    assert await collect(first.stream("Again.")) == fake.audio_for("Again.")
    clock.now += 2.0
    await first.aclose()
    await until(lambda: fake.ws_open == 0)
    assert await collect(third.stream("Hi.")) == fake.audio_for("Hi.")
    assert fake.ws_connections == 3
    await second.aclose()
    await third.aclose()


async def test_a_call_retrying_its_connect_when_a_rest_begins_opens_no_socket(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """Another call's handshake refused with 429 while this one waits to retry (after a 503):
    its retry does not go out during the rest."""
    fake.refuse_ws(503)
    service: DeepgramWebSocketService

    async def backoff(seconds: float) -> None:  # meanwhile, another call is refused with 429
        service.too_many_requests.refused(5.0)

    service = make(ws_url, max_reconnects=3, sleep=backoff)
    with pytest.raises(TTSError, match="not opening a socket for 5.0 s more") as info:
        await collect(service.open().stream("Hi."))
    assert not info.value.retryable and fake.ws_connections == 1


async def test_an_old_socket_is_kept_rather_than_replaced_during_a_rest(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """A socket past its age is replaced before the next utterance, but not while no new one
    may be opened (a 429's rest, a minute at most, well within Deepgram's 60-minute limit)."""
    clock = SettableClock()
    service = make(ws_url, clock=clock, max_connection_age=100.0)
    provider = service.open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    clock.now += 100
    service.too_many_requests.refused(30.0)
    assert await collect(provider.stream("Again.")) == fake.audio_for("Again.")
    assert fake.ws_connections == 1  # the old socket spoke
    clock.now += 30
    assert await collect(provider.stream("Third.")) == fake.audio_for("Third.")
    assert fake.ws_connections == 2  # the rest over: replaced
    await provider.aclose()


async def test_a_handshake_refused_with_a_repeated_header_is_a_tts_error(ws_url: str) -> None:
    """A load balancer's refusal with two ``Set-Cookie``: websockets' ``Headers`` raise for a
    repeated name when read as a mapping, which must not escape the error's parsing."""
    headers = Headers([("Set-Cookie", "AWSALB=a"), ("Set-Cookie", "AWSALBCORS=b")])

    async def refused(url: str, **kwargs: Any) -> ClientConnection:
        raise InvalidStatus(Response(502, "Bad Gateway", headers, b"Bad Gateway"))

    provider = make(ws_url, connect=refused, max_reconnects=1).open()
    with pytest.raises(TTSError, match="after 2 attempts: Bad Gateway") as info:
        await collect(provider.stream("Hi."))
    assert info.value.status == 502
    await provider.aclose()


async def test_reconnects_after_server_close_between_utterances(
    ws_url: str, fake: FakeDeepgram, caplog: pytest.LogCaptureFixture
) -> None:
    fake.ws_close_after_flushed(1001, "going away")
    provider = make(ws_url).open()
    assert await collect(provider.stream("One.")) == fake.audio_for("One.")
    await asyncio.sleep(0.05)  # let the close frame arrive
    with caplog.at_level(logging.INFO, "callspeak.tts"):
        assert await collect(provider.stream("Two.")) == fake.audio_for("Two.")
    assert fake.ws_connections == 2
    assert "closed between utterances (code 1001 'going away'); reconnecting" in caplog.text
    await provider.aclose()


async def test_reconnects_when_close_races_the_next_speak(ws_url: str, fake: FakeDeepgram) -> None:
    fake.ws_close_after_flushed(1001, "going away")
    provider = make(ws_url).open()
    await collect(provider.stream("One."))
    assert await collect(provider.stream("Two.")) == fake.audio_for("Two.")  # no sleep
    assert fake.ws_connections == 2
    await provider.aclose()


async def at_the_flush_limit(
    ws_url: str, fake: FakeDeepgram
) -> tuple[DeepgramWebSocketProvider, SettableClock, list[float]]:
    """A provider (``flush_wait`` 0.5 s) that has just flushed 20 times, on a settable clock
    shared with the fake; and the seconds it sleeps, which move that clock on."""
    clock = SettableClock()
    fake.clock = clock
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    provider = make(ws_url, clock=clock, sleep=sleep, flush_wait=0.5).open()
    for _ in range(20):
        await collect(provider.stream("a"))
    return provider, clock, slept


async def test_flush_limit_waits_or_fails_fast(ws_url: str, fake: FakeDeepgram) -> None:
    provider, clock, slept = await at_the_flush_limit(ws_url, fake)
    with pytest.raises(TTSError, match="flush limit") as info:
        await collect(provider.stream("b"))
    assert info.value.retryable and info.value.code == "FLUSH_LIMIT"
    assert info.value.kind == "flush_limit"  # not "connection": nothing is wrong with the network
    clock.now += 60.8  # the oldest flush leaves the window (60 s and the margin) in 0.2 s
    assert await collect(provider.stream("c")) == fake.audio_for("c")
    assert slept == [pytest.approx(0.2)]
    await provider.aclose()


async def test_a_call_with_audio_still_to_play_waits_for_the_flush_limit_unheard(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """With more of the call's audio still to play than the wait (``ahead``), the wait for a
    free slot is longer than ``flush_wait`` allows and still nobody hears it: it waits rather
    than hand the rest of the utterance to another voice."""
    provider, clock, slept = await at_the_flush_limit(ws_url, fake)
    clock.now += 56.0  # the oldest flush leaves the window in 5 s
    with pytest.raises(TTSError, match="flush limit"):  # 4 s still to play: not enough
        await collect(provider.stream("b", continuation=True, ahead=4.0))
    audio = await collect(provider.stream("c", continuation=True, ahead=6.0))
    assert audio == fake.audio_for("c") and slept == [pytest.approx(5.0)]
    await provider.aclose()


async def test_a_flush_at_the_window_edge_waits_out_the_network_jitter(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """The first flush of the window took 50 ms to reach Deepgram, the 21st takes 10 ms: sent the
    instant our own 60 s had passed, Deepgram would count it within its 60 s and ignore it."""
    clock = SettableClock()
    latency = [0.05]
    fake.clock = lambda: clock.now + latency[0]  # when a message reaches Deepgram
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    provider = make(ws_url, clock=clock, sleep=sleep, flush_wait=1.5, receive_timeout=0.5).open()
    for _ in range(20):
        await collect(provider.stream("a"))
    clock.now += 59.8
    latency[0] = 0.01
    assert await collect(provider.stream("c")) == fake.audio_for("c")
    assert slept == [pytest.approx(1.2)]  # 0.2 s to our window's edge, then the 1 s margin
    await provider.aclose()


async def test_a_flush_deepgram_ignores_fails_at_once_and_its_text_is_cleared(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """Deepgram counted more flushes than we did (another clock, another window) and answers
    the Flush with a Warning, not audio: the stream fails with FLUSH_LIMIT straight away, not as
    a stall after ``receive_timeout``, and the text it left unspoken is not said later."""
    fake.flush_limit = 1
    provider = make(ws_url, receive_timeout=3.0).open()
    assert await collect(provider.stream("One.")) == fake.audio_for("One.")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TTSError, match="ignored the Flush") as info:
        await collect(provider.stream("Two."))
    assert loop.time() - started < 1.0
    assert info.value.code == "FLUSH_LIMIT" and not info.value.retryable  # fall back at once
    assert info.value.kind == "flush_limit"
    fake.flush_limit = 20  # Deepgram's window has room again
    assert await collect(provider.stream("Three.")) == fake.audio_for("Three.")
    assert fake.ws_connections == 1  # the socket is kept
    await provider.aclose()


async def test_replaces_old_socket_between_utterances(ws_url: str, fake: FakeDeepgram) -> None:
    clock = SettableClock()
    provider = make(ws_url, clock=clock).open()
    await collect(provider.stream("One."))
    clock.now += 56 * 60
    assert await collect(provider.stream("Two.")) == fake.audio_for("Two.")
    assert fake.ws_connections == 2
    await provider.aclose()


async def test_warning_is_logged(
    ws_url: str, fake: FakeDeepgram, caplog: pytest.LogCaptureFixture
) -> None:
    fake.ws_warn("Text was normalised before synthesis", "TEXT_NORMALIZED")
    provider = make(ws_url).open()
    with caplog.at_level(logging.WARNING, "callspeak.tts.deepgram_ws"):
        assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert "TEXT_NORMALIZED" in caplog.text and "normalised before" in caplog.text
    await provider.aclose()


async def test_injected_connect_and_service_aclose(ws_url: str, fake: FakeDeepgram) -> None:
    calls: list[str] = []

    async def counting_connect(url: str, **kwargs: Any) -> ClientConnection:
        calls.append(url)
        return await connect(url, **kwargs)

    service = make(ws_url, connect=counting_connect)
    provider = service.open()
    await collect(provider.stream("Hi."))
    assert len(calls) == 1 and calls[0].startswith(ws_url)
    # audio does not deflate: the handshake offers no compression
    assert "sec-websocket-extensions" not in {k.lower() for k in fake.requests[-1].headers}
    await service.aclose()
    with pytest.raises(TTSError, match="closed"):
        await collect(provider.stream("Hi."))


async def test_closing_a_provider_whose_socket_cannot_write_still_closes_the_socket(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """Deepgram stopped reading: ``Close`` cannot be written within ``receive_timeout``.
    ``aclose()`` neither raises (a fallback chain or the service would stop closing the rest)
    nor leaves the socket open (the provider has let go of it: nothing else would close it)."""
    sockets: list[ClientConnection] = []

    async def keep(url: str, **kwargs: Any) -> ClientConnection:
        sockets.append(await connect(url, **kwargs))
        return sockets[-1]

    provider = make(ws_url, connect=keep, receive_timeout=0.3).open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    ws = sockets[0]
    ws.pause_writing()  # the buffer is full...
    ws.send_data = lambda: None  # type: ignore[method-assign]  # ...and nothing more gets out
    await asyncio.wait_for(provider.aclose(), 2)
    await asyncio.wait_for(ws.wait_closed(), 2)
    async with asyncio.timeout(5):
        while fake.ws_open:  # noqa: ASYNC110 (the fake's close announces nothing)
            await asyncio.sleep(0.01)


async def test_the_proxy_is_read_from_the_environment_once_and_used_for_every_socket(
    ws_url: str, fake: FakeDeepgram, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert make(ws_url).proxy is None
    monkeypatch.setenv("ws_proxy", "http://proxy.invalid:3128")
    asked: list[object] = []

    async def noting_connect(url: str, **kwargs: Any) -> ClientConnection:
        asked.append(kwargs["proxy"])
        kwargs["proxy"] = None  # (proxy.invalid does not exist: reach the fake directly)
        return await connect(url, **kwargs)

    service = make(ws_url, connect=noting_connect)
    monkeypatch.setenv("ws_proxy", "http://changed.invalid:3128")  # read at start-up only
    first, second = service.open(), service.open()
    await collect(first.stream("Hi."))
    await collect(second.stream("Hi."))
    assert asked == ["http://proxy.invalid:3128"] * 2
    await service.aclose()


async def test_warm_up_opens_the_socket_the_first_utterance_then_uses(
    ws_url: str, fake: FakeDeepgram
) -> None:
    connected = asyncio.Event()

    async def noting_connect(url: str, **kwargs: Any) -> ClientConnection:
        ws = await connect(url, **kwargs)
        connected.set()
        return ws

    provider = make(ws_url, connect=noting_connect).open()
    provider.warm_up()
    provider.warm_up()  # idempotent: one connect
    await asyncio.wait_for(connected.wait(), 5)  # open before anything is said
    assert fake.ws_connections == 1 and fake.ws_messages == []
    assert await collect(provider.stream("Hello there.")) == fake.audio_for("Hello there.")
    provider.warm_up()  # a socket is open: nothing to do
    assert await collect(provider.stream("Again.")) == fake.audio_for("Again.")
    assert fake.ws_connections == 1
    await provider.aclose()


async def test_a_stream_waits_for_a_warm_up_still_connecting(
    ws_url: str, fake: FakeDeepgram
) -> None:
    opened = asyncio.Event()
    go = asyncio.Event()

    async def slow_connect(url: str, **kwargs: Any) -> ClientConnection:
        opened.set()
        await go.wait()
        return await connect(url, **kwargs)

    provider = make(ws_url, connect=slow_connect).open()
    provider.warm_up()
    await asyncio.wait_for(opened.wait(), 5)
    speaking = asyncio.create_task(collect(provider.stream("Hi.")))
    await asyncio.sleep(0.05)
    assert not speaking.done() and fake.ws_connections == 0
    go.set()
    assert await speaking == fake.audio_for("Hi.")
    assert fake.ws_connections == 1  # the warm-up's socket, not a second one
    await provider.aclose()


async def test_a_warm_up_refused_for_credentials_fails_the_first_stream_only_once(
    ws_url: str, fake: FakeDeepgram
) -> None:
    service = make(ws_url, key="wrong", max_reconnects=5)
    provider = service.open()
    provider.warm_up()
    with pytest.raises(TTSAuthError) as info:
        await collect(provider.stream("Hi."))
    assert info.value.status == 401 and "DEEPGRAM_API_KEY" in str(info.value)
    assert not service.healthy and fake.ws_connections == 1  # no reconnect loop
    other = service.open()
    other.warm_up()  # the credentials are known bad: no attempt at all
    with pytest.raises(TTSAuthError):
        await collect(other.stream("Hi."))
    assert fake.ws_connections == 1
    await provider.aclose()
    await other.aclose()


def connect_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "deepgram-ws-connect"]


async def test_closing_during_a_warm_up_leaves_its_connect_to_the_service(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """``aclose()`` returns at once, without aborting the handshake under way (Deepgram may
    already count that socket); the service owns the connect until it ends, and the service's
    own close stops it."""
    started = asyncio.Event()

    async def hanging_connect(url: str, **kwargs: Any) -> ClientConnection:
        started.set()
        await asyncio.Event().wait()  # a handshake that never completes
        raise AssertionError("unreachable")

    service = make(ws_url, connect=hanging_connect, max_concurrent=2)
    provider = service.open()
    provider.warm_up()
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(provider.aclose(), 2)
    provider.warm_up()  # closed: no new connect
    with pytest.raises(TTSError, match="closed"):
        await collect(provider.stream("Hi."))
    [connecting] = connect_tasks()  # still under way, its slot held
    assert service.slots.in_use == 1
    await asyncio.wait_for(service.aclose(), 2)
    assert connecting.cancelled() and connect_tasks() == []
    assert service.slots.in_use == 0


@pytest.mark.parametrize("opened_by", ["stream", "warm-up"])
async def test_a_call_hanging_up_as_its_socket_opens_logs_no_failure(
    ws_url: str, fake: FakeDeepgram, caplog: pytest.LogCaptureFixture, opened_by: str
) -> None:
    """The call ends while its socket (the warm-up's, or a stream's own) is still opening: the
    connect, left to end by itself, closes the socket it opens. That is no failure to warn of
    (before, aclose() cancelled a warm-up, which logged nothing)."""
    held = HeldConnect()
    service = make(ws_url, connect=held, max_concurrent=1)
    provider = service.open()
    if opened_by == "warm-up":
        provider.warm_up()
    speaking = asyncio.ensure_future(collect(provider.stream("Hi.")))
    await until(lambda: held.dials == 1)
    with caplog.at_level(logging.DEBUG, logger="callspeak.tts.deepgram_ws"):
        await provider.aclose()  # the caller hung up
        held.go.set()
        with pytest.raises(TTSError, match="closed"):
            await speaking
        await until(lambda: service.slots.in_use == 0)  # the connect has ended
        await asyncio.sleep(0)  # (its done callback has run)
    assert [r.getMessage() for r in caplog.records if "failed" in r.getMessage()] == []
    await service.aclose()


async def test_a_connect_starting_after_its_call_ended_spends_no_recheck_of_the_key(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """A call hangs up as its stream's connect is created, before that connect has run its
    first step (Python 3.11 starts a task on the next loop iteration): the connect, no longer
    cancelled by aclose(), must not take the refused key's due re-check — and make every call
    wait ``auth_recheck`` more to learn the key is good again — to open no socket at all."""
    clock = SettableClock()
    service = make(ws_url, key="granted-later", auth_recheck=60, clock=clock)
    with pytest.raises(TTSAuthError):
        await collect(service.open().stream("Hi."))
    fake.api_key = "granted-later"
    clock.now += 60  # the re-check is due
    quitter = service.open()
    speaking = asyncio.ensure_future(collect(quitter.stream("Bye.")))
    await asyncio.sleep(0)  # its stream has created the connect, and waits for it
    speaking.cancel()  # the call ends: its speaker is cancelled, its voice closed
    await quitter.aclose()
    with contextlib.suppress(asyncio.CancelledError, TTSError):
        await speaking
    # (On 3.12 the connect began at once, and took the re-check: its handshake, accepted,
    # tells the service the key is good again, though nobody needs that socket now.)
    await until(lambda: connect_tasks() == [])
    provider = service.open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")  # re-checked: good
    await provider.aclose()
    await service.aclose()


class Marker:
    """Something only a caller's frame refers to."""


@pytest.mark.parametrize("opened_by", ["stream", "warm-up"])
async def test_a_connect_failing_leaves_no_cycle_for_the_collector(
    ws_url: str, caplog: pytest.LogCaptureFixture, opened_by: str
) -> None:
    """A connect fails, and the stream waiting for it raises its error: the frame that waited,
    in that error's traceback, must not hold the connect's task, which holds the error — a
    cycle that keeps the voice, and every frame up to the one that caught the error (the
    fallback chain's, with the call's), until the collector runs."""

    async def unreachable(url: str, **kwargs: Any) -> ClientConnection:
        await asyncio.sleep(0.01)  # the stream waits for this connect meanwhile
        raise OSError("network unreachable")

    async def speak_and_fall_back(
        provider: DeepgramWebSocketProvider, kept: list[weakref.ref[Marker]]
    ) -> None:
        marker = Marker()  # (what a caller's frame holds: the chain, the call)
        kept.append(weakref.ref(marker))
        with contextlib.suppress(TTSError):
            await collect(provider.stream("Hi."))

    caplog.set_level(logging.ERROR, logger="callspeak.tts.deepgram_ws")  # (records hold errors)
    provider = make(ws_url, connect=unreachable, max_reconnects=0).open()
    if opened_by == "warm-up":
        provider.warm_up()
    kept: list[weakref.ref[Marker]] = []
    gc.disable()
    try:
        await speak_and_fall_back(provider, kept)
        assert kept[0]() is None  # freed by reference counting, as the caller returned
    finally:
        gc.enable()
    await provider.aclose()


async def test_closing_while_a_stream_waits_for_the_warm_up_gives_that_stream_a_tts_error(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """``aclose()`` (a hang-up) stops the warm-up's connect: the stream waiting for it ends with
    a :class:`TTSError`, not with that connect's cancellation, which nobody asked of it."""

    async def hanging_connect(url: str, **kwargs: Any) -> ClientConnection:
        await asyncio.Event().wait()  # a handshake that never completes
        raise AssertionError("unreachable")

    provider = make(ws_url, connect=hanging_connect).open()
    provider.warm_up()
    speaking = asyncio.create_task(collect(provider.stream("Hello.")))
    await asyncio.sleep(0.05)
    await provider.aclose()
    await asyncio.wait({speaking}, timeout=2)
    assert speaking.done() and not speaking.cancelled()
    with pytest.raises(TTSError, match="closed") as info:
        speaking.result()
    assert not info.value.retryable


class HeldConnect:
    """A connect that dials only once ``go`` is set, counting the dials."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.dials = 0

    async def __call__(self, url: str, **kwargs: Any) -> ClientConnection:
        self.dials += 1
        await self.go.wait()
        return await connect(url, **kwargs)


async def a_stream_waiting_for_the_warm_up(
    ws_url: str,
) -> tuple[HeldConnect, TTSProvider, asyncio.Task[bytes]]:
    """A provider warming up on a held connect, and a stream of "Never said." waiting for it."""
    held = HeldConnect()
    provider = make(ws_url, connect=held).open()
    provider.warm_up()
    speaking = asyncio.create_task(collect(provider.stream("Never said.")))
    await asyncio.sleep(0.05)
    return held, provider, speaking


async def test_a_stream_cancelled_while_the_warm_up_connects_leaves_the_socket_to_the_next(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """A barge-in cancels the first stream while it waits for the warm-up's connect: the connect
    goes on, and the next stream speaks on its socket rather than opening another."""
    held, provider, speaking = await a_stream_waiting_for_the_warm_up(ws_url)
    speaking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await speaking
    held.go.set()
    assert await collect(provider.stream("Said.")) == fake.audio_for("Said.")
    assert held.dials == 1 and fake.ws_connections == 1
    assert [m.get("text") for m in fake.ws_messages if m["type"] == "Speak"] == ["Said."]
    await provider.aclose()


async def test_a_reconnect_after_the_warm_up_socket_closed_opens_a_new_one(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """The warm-up's task is forgotten once done: a later reconnect must not get its (dead)
    socket back — that would spend the send's one retry, and a second bad socket would then
    fail the utterance."""
    sockets: list[ClientConnection] = []
    warmed = asyncio.Event()

    async def connect_second_one_closed(url: str, **kwargs: Any) -> ClientConnection:
        ws = await connect(url, **kwargs)
        sockets.append(ws)
        if len(sockets) == 2:
            await ws.close()  # a socket that dies right after its handshake
        warmed.set()
        return ws

    fake.ws_close_after_flushed(1001, "going away")  # the server ends the first socket
    provider = make(ws_url, connect=connect_second_one_closed).open()
    provider.warm_up()
    await asyncio.wait_for(warmed.wait(), 5)
    await asyncio.sleep(0)  # the warm-up's task has finished: its socket is the provider's
    assert await collect(provider.stream("One.")) == fake.audio_for("One.")
    await asyncio.wait_for(sockets[0].wait_closed(), 5)
    assert await collect(provider.stream("Two.")) == fake.audio_for("Two.")
    assert len(sockets) == 3
    await provider.aclose()


async def test_a_failed_warm_up_is_logged_and_the_first_stream_tries_afresh(
    ws_url: str, fake: FakeDeepgram, caplog: pytest.LogCaptureFixture
) -> None:
    fake.refuse_ws(503, count=1)
    provider = make(ws_url, max_reconnects=0).open()
    with caplog.at_level(logging.WARNING, logger="callspeak.tts.deepgram_ws"):
        provider.warm_up()
        async with asyncio.timeout(5):
            # waiting for a log line, which no event announces
            while not any("ahead of speech failed" in r.message for r in caplog.records):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert fake.ws_connections == 2  # the refused warm-up, then the stream's own connect
    await provider.aclose()


async def test_warm_ups_of_two_calls_for_the_last_slot_warn_once_about_the_limit(
    ws_url: str, fake: FakeDeepgram, caplog: pytest.LogCaptureFixture
) -> None:
    """Two calls warm up in the same instant for the one slot left. On Python 3.11 a connect's
    first step comes an iteration after warm_up() returns, so both found the slot free, and the
    second connect failed with a warning of its own ("opening the socket ahead of speech
    failed: ... the limit ... is reached") — one per call at capacity, where the limit's own
    warning comes once a minute."""
    service = make(ws_url, max_concurrent=1)
    first, second = service.open(), service.open()
    with caplog.at_level(logging.WARNING, logger="callspeak"):
        first.warm_up()
        second.warm_up()
        async with asyncio.timeout(5):
            while fake.ws_connections < 1:  # noqa: ASYNC110 (the fake's accepts announce nothing)
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # any second connect has ended by now
    assert not [r.message for r in caplog.records if "ahead of speech failed" in r.message]
    # Counted before at_capacity() is asked, which notes the limit itself.
    assert len([r for r in caplog.records if "CALLSPEAK_DEEPGRAM_MAX_CONCURRENT" in r.message]) == 1
    assert second.at_capacity()
    assert fake.ws_connections == 1
    assert await collect(first.stream("Hi.")) == fake.audio_for("Hi.")
    await first.aclose()
    await second.aclose()
    await service.aclose()


def returning_once_the_fake_read_two(
    fake: FakeDeepgram, read: list[list[str]]
) -> Callable[..., Awaitable[ClientConnection]]:
    """A connect() that, once the socket is open, returns only after the fake has read two
    messages (within 5 s), noting in ``read`` the kinds it had read by then."""

    async def slow_to_return(url: str, **kwargs: Any) -> ClientConnection:
        ws = await connect(url, **kwargs)
        async with asyncio.timeout(5):
            while len(fake.ws_messages) < 2:  # noqa: ASYNC110 (the fake's reads announce nothing)
                await asyncio.sleep(0.01)
        read.append([m["type"] for m in fake.ws_messages])
        return ws

    return slow_to_return


async def test_the_first_utterance_is_sent_as_the_socket_opens(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """Speak and Flush leave in the callback that reads the handshake's response: the fake has
    read them while connect() has not yet returned to the provider."""
    read_before_return: list[list[str]] = []
    slow_to_return = returning_once_the_fake_read_two(fake, read_before_return)
    provider = make(ws_url, connect=slow_to_return).open()
    assert await collect(provider.stream("Hello there.")) == fake.audio_for("Hello there.")
    assert read_before_return == [["Speak", "Flush"]]
    assert await collect(provider.stream("Again.")) == fake.audio_for("Again.")  # the usual way
    assert [m["type"] for m in fake.ws_messages] == ["Speak", "Flush"] * 2
    await provider.aclose()


async def test_a_stream_cleared_while_the_socket_opens_sends_nothing_on_it(
    ws_url: str, fake: FakeDeepgram
) -> None:
    held, provider, speaking = await a_stream_waiting_for_the_warm_up(ws_url)
    await provider.clear()
    held.go.set()
    assert await speaking == b""
    assert await collect(provider.stream("Said.")) == fake.audio_for("Said.")
    assert [m.get("text") for m in fake.ws_messages if m["type"] == "Speak"] == ["Said."]
    assert fake.ws_connections == 1
    await provider.aclose()


async def test_after_a_refused_handshake_the_utterance_goes_out_as_the_next_socket_opens(
    ws_url: str, fake: FakeDeepgram
) -> None:
    read_before_return: list[list[str]] = []
    slow_to_return = returning_once_the_fake_read_two(fake, read_before_return)
    fake.refuse_ws(503, count=1)  # the first connect() raises: refused
    provider = make(ws_url, max_reconnects=1, connect=slow_to_return).open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert fake.ws_connections == 2 and read_before_return == [["Speak", "Flush"]]
    assert [m["type"] for m in fake.ws_messages] == ["Speak", "Flush"]  # once, on the second
    await provider.aclose()


async def barge_in_as_the_socket_opens(
    ws_url: str, fake: FakeDeepgram, *, before_the_connect_resumes: bool
) -> DeepgramWebSocketProvider:
    """Warm up, stream LONG, and cancel that stream (a barge-in) once the socket has written it
    on opening: in the step the connect resumes in, or before the connect resumes. Returns the
    provider, whose next stream should hear only its own audio."""
    speaker: list[asyncio.Task[bytes]] = []

    async def connect_then_barge_in(url: str, **kwargs: Any) -> ClientConnection:
        ws = await connect(url, **kwargs)  # the handshake callback has written Speak + Flush
        if before_the_connect_resumes:
            speaker[0].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await speaker[0]
        else:
            asyncio.get_running_loop().call_soon(speaker[0].cancel)
        return ws

    fake.bytes_per_second = 16000  # the old utterance is still streaming when the next starts
    provider = make(ws_url, connect=connect_then_barge_in).open()
    provider.warm_up()
    speaker.append(asyncio.create_task(collect(provider.stream(LONG))))
    with pytest.raises(asyncio.CancelledError):
        await speaker[0]
    return provider


async def test_a_barge_in_just_after_the_socket_opened_clears_the_utterance_it_sent(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """The speaker task is cancelled (as a barge-in does) after the socket has written the
    utterance on opening but before the stream resumed: the utterance is still known to be in
    flight, so it is cleared, and the next one hears only its own audio."""
    provider = await barge_in_as_the_socket_opens(ws_url, fake, before_the_connect_resumes=False)
    await provider.clear()  # what the session does next
    assert await collect(provider.stream("New.")) == fake.audio_for("New.")
    assert [m["type"] for m in fake.ws_messages] == ["Speak", "Flush", "Clear", "Speak", "Flush"]
    await provider.aclose()


async def test_a_stream_ended_before_its_socket_was_ready_has_what_it_wrote_cleared(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """The warm-up's socket wrote the stream's utterance as it opened, and the stream was
    cancelled (a barge-in) before the connect resumed: nobody will read that audio, and no
    clear() need follow (a stream out of time hands its text to the fallback instead). The
    connect clears it, and the next stream hears only its own audio."""
    provider = await barge_in_as_the_socket_opens(ws_url, fake, before_the_connect_resumes=True)
    assert await collect(provider.stream("New.")) == fake.audio_for("New.")
    assert [m["type"] for m in fake.ws_messages] == ["Speak", "Flush", "Clear", "Speak", "Flush"]
    await provider.aclose()


async def test_closing_while_the_streams_own_socket_opens_leaves_no_socket(
    ws_url: str, fake: FakeDeepgram
) -> None:
    async def connect_then_close(url: str, **kwargs: Any) -> ClientConnection:
        ws = await connect(url, **kwargs)
        await provider.aclose()  # a hang-up, in the same window
        return ws

    provider = make(ws_url, connect=connect_then_close).open()
    with pytest.raises(TTSError, match="closed"):
        await collect(provider.stream("Hello after close."))
    async with asyncio.timeout(5):
        while fake.ws_open:  # noqa: ASYNC110 (the fake's close announces nothing)
            await asyncio.sleep(0.01)


async def test_a_socket_that_closed_after_sending_on_open_is_replaced_and_the_text_resent(
    ws_url: str, fake: FakeDeepgram
) -> None:
    sockets: list[ClientConnection] = []

    async def connect_first_one_closed(url: str, **kwargs: Any) -> ClientConnection:
        ws = await connect(url, **kwargs)
        sockets.append(ws)
        if len(sockets) == 1:
            await ws.close()  # dies after its handshake (and after on-open sent the text)
        return ws

    provider = make(ws_url, connect=connect_first_one_closed).open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert len(sockets) == 2
    await provider.aclose()


class CountingResolver:
    """Answers every lookup with the next of ``answers`` (the last one repeats)."""

    def __init__(self, *answers: list[str] | OSError) -> None:
        self.answers, self.asked = list(answers), 0

    async def __call__(self, host: str, port: int) -> list[AddrInfo]:
        self.asked += 1
        await asyncio.sleep(0.01)  # a lookup takes time: sockets opened meanwhile share it
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, OSError):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]


async def address_order(service: DeepgramWebSocketService) -> list[str]:
    """The addresses the next socket of ``service`` will try, in order."""
    assert service.resolved_host is not None
    return [info[4][0] for info in await service.resolved_host.addresses()]


async def hang(open_timeout: float) -> None:
    """A connect to a blackholed address: nothing answers until ``open_timeout``, as websockets'
    ``connect()`` gives up."""
    async with asyncio.timeout(open_timeout):
        await asyncio.Event().wait()


def named(ws_url: str) -> str:
    """``ws_url`` with a host name that only the injected resolver knows."""
    return ws_url.replace("127.0.0.1", "deepgram.callspeak.invalid")


async def test_sockets_opened_together_share_one_lookup_of_the_host(
    ws_url: str, fake: FakeDeepgram
) -> None:
    resolver = CountingResolver(["127.0.0.1"])
    service = make(named(ws_url), resolve=resolver)
    providers = [service.open() for _ in range(20)]
    texts = [f"Caller {n}." for n in range(20)]
    heard = await asyncio.gather(
        *(collect(p.stream(t)) for p, t in zip(providers, texts, strict=True))
    )
    assert heard == [fake.audio_for(t) for t in texts]
    assert resolver.asked == 1 and fake.ws_connections == 20
    port = ws_url.rsplit(":", 1)[1]
    assert {r.headers["host"] for r in fake.requests} == {f"deepgram.callspeak.invalid:{port}"}
    await service.aclose()


async def test_an_address_that_refuses_is_skipped_for_the_next_one(
    ws_url: str, fake: FakeDeepgram
) -> None:
    resolver = CountingResolver(["127.0.0.2", "127.0.0.1"])  # nothing listens on 127.0.0.2
    service = make(named(ws_url), resolve=resolver, max_reconnects=0)
    provider = service.open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert resolver.asked == 1
    assert await address_order(service) == ["127.0.0.1", "127.0.0.2"]  # the refusing one last
    await provider.aclose()


async def test_an_address_that_hangs_is_tried_last_by_the_next_attempt(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """The connect to the first address is never answered (a blackholed IP): the attempt times
    out, and the next one dials the other address rather than the same dead one."""
    resolver = CountingResolver(["192.0.2.1", "127.0.0.1"])  # TEST-NET-1: nothing answers
    dialled: list[str] = []

    async def blackholed_first(url: str, *, host: str, **kwargs: Any) -> ClientConnection:
        dialled.append(host)
        if host == "192.0.2.1":
            await hang(kwargs["open_timeout"])
        return await connect(url, host=host, **kwargs)

    service = make(
        named(ws_url),
        resolve=resolver,
        connect=blackholed_first,
        connect_timeout=0.3,
        max_reconnects=1,
    )
    provider = service.open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert dialled == ["192.0.2.1", "127.0.0.1"]
    assert await address_order(service) == ["127.0.0.1", "192.0.2.1"]
    await provider.aclose()


async def test_a_stream_waits_for_its_socket_twice_connect_timeout_at_most(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """Every address hangs: four attempts would keep the caller silent four times
    ``connect_timeout``; the stream gives up after two (the first attempt and the start of the
    second), with an error the fallback voice acts on at once. The first answer is that
    budget's; a warm-up's connect carries on alone."""
    dialled: list[str] = []

    async def hangs(url: str, *, host: str, **kwargs: Any) -> ClientConnection:
        dialled.append(host)
        await hang(kwargs["open_timeout"])
        raise AssertionError("unreachable")

    service = make(
        named(ws_url),
        resolve=CountingResolver(["192.0.2.1"]),  # TEST-NET-1: nothing answers
        connect=hangs,
        connect_timeout=0.2,
        max_reconnects=3,
        backoff=0.1,  # the second attempt hangs from 0.3 s: the budget (0.4 s) ends it
    )
    provider = service.open()
    with pytest.raises(TTSError, match=r"no connection within 0.4 s") as raised:
        await collect(provider.stream("Hi."))
    assert not raised.value.retryable and raised.value.kind == "connection"
    assert len(dialled) == 2  # four without the budget
    await provider.aclose()


async def test_a_reconnect_while_sending_text_waits_within_the_same_bound(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """The socket turns out closed as the second text is sent, and every address then hangs:
    that reconnect, too, gives up after twice ``connect_timeout``."""
    dials = 0

    async def first_then_hang(url: str, **kwargs: Any) -> ClientConnection:
        nonlocal dials
        dials += 1
        if dials == 1:
            ws = await connect(url, **kwargs)
            send = ws.send

            async def closed_on_the_second_text(message: Any, **kw: Any) -> None:
                if '"Speak"' in message and "Second" in message:
                    raise ConnectionClosedError(Close(1011, "gone"), None)
                await send(message, **kw)

            ws.send = closed_on_the_second_text  # type: ignore[method-assign]
            return ws
        await hang(kwargs["open_timeout"])
        raise AssertionError("unreachable")

    # Attempts hang 0.2 s each, 0.1 s apart: the third is under way when the bound (0.4 s) ends it.
    provider = make(ws_url, connect=first_then_hang, connect_timeout=0.2, backoff=0.1).open()
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    with pytest.raises(TTSError, match="no connection within 0.4 s"):
        await collect(provider.stream("Second."))
    assert dials == 3  # 1 + 4 attempts without the bound
    await provider.aclose()


async def test_a_flush_answered_with_no_audio_is_a_failure_not_silence(
    ws_url: str, fake: FakeDeepgram
) -> None:
    provider = make(ws_url).open()
    fake.ws_silent()
    with pytest.raises(TTSError, match="flushed with no audio") as info:
        await collect(provider.stream("Hi."))
    assert info.value.retryable  # asked again once, then the next voice speaks
    assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    fake.ws_silent()
    assert await collect(provider.stream("—")) == b""  # a dash: nothing to say
    await provider.aclose()


async def test_an_answer_with_no_address_reached_is_looked_up_again(
    ws_url: str, fake: FakeDeepgram, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = CountingResolver(["127.0.0.2"], ["127.0.0.1"])
    provider = make(named(ws_url), resolve=resolver, max_reconnects=1).open()
    with caplog.at_level(logging.WARNING, "callspeak.tts.deepgram_ws"):
        assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
    assert resolver.asked == 2 and "connect attempt 1 failed" in caplog.text
    await provider.aclose()


async def test_a_failed_lookup_is_a_connect_failure_retried_like_any_other(ws_url: str) -> None:
    resolver = CountingResolver(socket.gaierror(-2, "Name or service not known"))
    provider = make(named(ws_url), resolve=resolver, max_reconnects=1).open()
    with pytest.raises(TTSError, match="after 2 attempts: .*Name or service not known") as info:
        await collect(provider.stream("Hi."))
    assert resolver.asked == 2  # not kept: looked up per attempt
    assert not info.value.retryable  # retried here already
    await provider.aclose()


def test_no_lookup_of_an_ip_address_or_through_a_proxy(
    ws_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert make(ws_url).resolved_host is None
    assert make(named(ws_url)).resolved_host is not None
    monkeypatch.setenv("ws_proxy", "http://proxy.invalid:3128")
    assert make(named(ws_url)).resolved_host is None  # the proxy resolves it


async def test_calls_refused_while_retrying_each_raise_their_own_copy_of_the_refusal() -> None:
    """A call whose connect failed, finding the key refused by its next attempt, raised the
    kept refusal itself: each such raise added that call's frames (its text among their
    locals) to the one object's traceback, for good."""
    svc: DeepgramWebSocketService | None = None
    refusal = TTSAuthError("deepgram-ws", "bad key", status=401, request_id="r1")

    async def connect(url: str, **kwargs: Any) -> ClientConnection:
        await asyncio.sleep(0.01)
        raise OSError("connection reset")  # a blip: retried

    async def sleep(delay: float) -> None:
        assert svc is not None
        if svc.refused_key.error is None:
            svc.mark_unhealthy(refusal)  # meanwhile another call's handshake got a 401
        await asyncio.sleep(0.01)

    svc = DeepgramWebSocketService(
        "test-key", ws_url="ws://127.0.0.1:9", connect=connect, sleep=sleep, max_reconnects=3
    )
    raised: list[TTSAuthError] = []

    async def one_call(n: int) -> None:
        assert svc is not None
        provider = svc.open()
        with pytest.raises(TTSAuthError) as info:
            async for _ in provider.stream(f"Hello caller {n}, your PIN is {1000 + n}."):
                pass
        raised.append(info.value)
        await provider.aclose()

    await asyncio.gather(*(one_call(n) for n in range(5)))
    kept = svc.refused_key.error
    assert kept is not None and kept.__traceback__ is None and refusal.__traceback__ is None
    assert len({id(error) for error in raised}) == 5
    assert all(error is not kept and error.status == 401 for error in raised)
    await svc.aclose()


async def test_wss_sockets_share_one_tls_context_rather_than_load_the_ca_store_each(
    self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real Deepgram is wss. A TLS context loads the whole CA store (~145 certificates: tens of
    milliseconds of CPU with OpenSSL 3, on the event loop): made once for the service, not by
    the loop for every socket (``ssl=True``), which blocked the loop for every call arriving."""
    cert, key = self_signed
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    fake = FakeDeepgram(first_byte_delay=0.0)
    opened: list[ClientConnection] = []

    async def recording(url: str, **kwargs: Any) -> ClientConnection:
        ws = await connect(url, **kwargs)
        opened.append(ws)
        return ws

    async with serve_asgi(
        fake.app, ws=fake.ws_protocol, ssl_certfile=str(cert), ssl_keyfile=str(key)
    ) as base:
        service = make(base.replace("https://", "wss://"), connect=recording)
        providers = [service.open() for _ in range(3)]
        for provider in providers:
            assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
        contexts = {id(ws.transport.get_extra_info("sslcontext")) for ws in opened}
        assert len(opened) == 3 and len(contexts) == 1  # one context, not one per socket
        await service.aclose()


@pytest.mark.parametrize("resting", [False, True])
async def test_a_clear_while_the_next_stream_waits_for_cleared_keeps_the_socket(
    ws_url: str, fake: FakeDeepgram, resting: bool
) -> None:
    """A second barge-in while the next stream still drops the first one's audio (waiting for
    its ``Cleared``): that stream ends quietly, as clear() ends any stream, and the socket —
    healthy, its Cleared on the way — is kept; it is not replaced (nor, while no socket may be
    opened, lost with a TTSError)."""
    fake.chunk_size, fake.bytes_per_second = 4000, 8000  # a Cleared comes up to 0.5 s late
    service = make(ws_url)
    provider = service.open()
    stream = provider.stream(LONG)
    assert await anext(stream)
    await provider.clear()  # the first barge-in: a Clear, its Cleared pending
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    nxt = asyncio.ensure_future(collect(provider.stream("Next.")))
    await asyncio.sleep(0.1)  # the next stream waits for the Cleared (up to 0.5 s away)
    assert not nxt.done()
    if resting:
        service.too_many_requests.refused(5.0)  # another call's 429: no socket may be opened
    await provider.clear()  # the second barge-in
    assert await nxt == b""  # ended quietly
    assert fake.ws_connections == 1  # the same socket
    fake.bytes_per_second = None
    if not resting:
        assert await collect(provider.stream("After.")) == fake.audio_for("After.")
    await provider.aclose()


@pytest.mark.parametrize("opened_by", ["stream", "warm-up"])
async def test_a_call_ending_while_its_socket_opens_keeps_its_slot_until_that_socket_is_gone(
    ws_url: str, fake: FakeDeepgram, opened_by: str
) -> None:
    """A call hangs up while its first socket is still opening (its handshake on the way to
    Deepgram), whether a stream or the warm-up opens it: the slot of
    CALLSPEAK_DEEPGRAM_MAX_CONCURRENT stays that socket's until it is closed, with a close
    handshake, so another call cannot open one meanwhile and have Deepgram count one too many
    — a 429, which rests the voice for every call."""
    fake.max_concurrent = 1
    dials = 0
    first_socket: list[ClientConnection] = []

    async def slow_first(url: str, **kwargs: Any) -> ClientConnection:
        nonlocal dials
        dials += 1
        if dials > 1:
            return await connect(url, **kwargs)
        await asyncio.sleep(0.3)  # this handshake reaches Deepgram late (DNS, TCP, TLS…)
        first_socket.append(await connect(url, **kwargs))
        return first_socket[0]

    service = make(ws_url, connect=slow_first, max_concurrent=1)
    first, second = service.open(), service.open()
    if opened_by == "warm-up":
        first.warm_up()
    opening = asyncio.ensure_future(collect(first.stream("Hello.")))
    await until(lambda: dials == 1)
    await first.aclose()  # the caller hung up, its handshake still on the way
    with pytest.raises(TTSError) as raised:  # another call asks meanwhile: no slot yet
        await collect(second.stream("Hi."))
    assert raised.value.code == "CONCURRENCY_LIMIT"  # (its next voice speaks), not a 429
    with pytest.raises(TTSError, match="closed"):
        await opening  # at once: it does not wait for the connect
    await until(lambda: service.slots.in_use == 0)  # the first socket opened, and was closed
    assert first_socket[0].close_code == 1000  # with a handshake: Deepgram has seen it close
    await until(lambda: fake.ws_open == 0)  # (and counted it closed)
    assert await collect(second.stream("Hi.")) == fake.audio_for("Hi.")  # the slot is free
    assert all(r.status != 429 for r in fake.requests), [r.status for r in fake.requests]
    assert not service.too_many_requests.resting()
    await second.aclose()
    assert service.slots.in_use == 0


async def test_a_barge_in_while_a_stream_opens_its_socket_keeps_the_socket_for_the_next(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """A barge-in cancels a stream while its own socket is opening (no warm-up): the handshake
    is not aborted. Its slot stays taken (aborted, the socket was freed at once while Deepgram
    could still count it: another call's socket then met a 429, resting the voice for every
    call), and the socket, once open, serves the call's next utterance without a new
    handshake."""
    fake.max_concurrent = 1
    held = HeldConnect()
    service = make(ws_url, connect=held, max_concurrent=1)
    first, second = service.open(), service.open()
    speaking = asyncio.ensure_future(collect(first.stream(LONG)))
    await until(lambda: held.dials == 1)
    speaking.cancel()  # the barge-in
    with pytest.raises(asyncio.CancelledError):
        await speaking
    await first.clear()  # what the session does next
    with pytest.raises(TTSError) as raised:  # another call asks meanwhile: no slot
        await collect(second.stream("Hi."))
    assert raised.value.code == "CONCURRENCY_LIMIT"
    held.go.set()
    assert await collect(first.stream("Said.")) == fake.audio_for("Said.")  # the reply
    assert held.dials == 1 and fake.ws_connections == 1  # on the socket the barge-in left
    assert [m.get("text") for m in fake.ws_messages if m["type"] == "Speak"] == ["Said."]
    assert all(r.status != 429 for r in fake.requests)
    await first.aclose()
    await until(lambda: fake.ws_open == 0)  # (Deepgram, too, counts a socket for a moment)
    assert await collect(second.stream("Hi.")) == fake.audio_for("Hi.")
    await service.aclose()
    assert service.slots.in_use == 0


async def test_errors_count_in_the_metric_by_what_they_were_not_by_whether_to_retry(
    ws_url: str, fake: FakeDeepgram
) -> None:
    """``callspeak_tts_errors_total``'s ``kind``: a socket no attempt could open is a
    ``connection`` error, as the REST voice's are (it was ``other``, being past retrying: an
    alert on ``kind="connection"`` missed a WebSocket voice that could not reach Deepgram), and a
    close saying the request was at fault is ``request``."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens there once closed
    provider = make(f"ws://127.0.0.1:{port}", max_reconnects=1).open()
    with pytest.raises(TTSError, match="could not connect after 2 attempts") as raised:
        await collect(provider.stream("Hi."))
    assert not raised.value.retryable and raised.value.kind == "connection"
    await provider.aclose()

    fake.ws_close_after(0, 1008, "DATA-0000")
    provider = make(ws_url).open()
    with pytest.raises(TTSError, match="code 1008") as raised:
        await collect(provider.stream("Hi."))
    assert not raised.value.retryable and raised.value.kind == "request"
    fake.ws_close_after(0, 1011, "NET-0001")
    with pytest.raises(TTSError, match="code 1011") as raised:
        await collect(provider.stream("Hi."))
    assert raised.value.retryable and raised.value.kind == "connection"
    await provider.aclose()
