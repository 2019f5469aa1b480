"""DeepgramRestService / DeepgramRestProvider against the fake Deepgram on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from callspeak.tasks import EAGER_START, start_task
from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_deepgram import FakeDeepgram
from callspeak.tts.base import TTSAuthError, TTSError, TTSProvider, TTSService
from callspeak.tts.deepgram_rest import DeepgramRestService
from callspeak.tts.fallback import FallbackService
from callspeak.tts.sentences import chunk_text
from tests.fakes import FakeService, SettableClock, tone_for


@pytest.fixture
async def service(base: str) -> AsyncIterator[DeepgramRestService]:
    svc = DeepgramRestService("test-key", base_url=base, stall_timeout=0.3, first_byte_timeout=1.0)
    await svc.start()
    yield svc
    await svc.aclose()


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in it])


async def test_streams_exact_bytes_with_phone_format(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    provider = service.open()
    assert isinstance(service, TTSService) and isinstance(provider, TTSProvider)
    assert provider.audio_format.is_twilio_native and provider.audio_format.container == "none"
    assert await collect(provider.stream("Hello, caller.")) == fake.audio_for("Hello, caller.")
    request = fake.requests[-1]
    assert request.query == {
        "model": "aura-2-thalia-en",
        "encoding": "mulaw",
        "sample_rate": "8000",
        "container": "none",
    }
    assert request.headers["authorization"] == "Token test-key"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept-encoding"] == "identity"  # raw audio: no compression
    assert await collect(provider.stream("   ")) == b""  # nothing to say: no request
    assert len(fake.requests) == 1


async def test_first_chunk_arrives_long_before_the_last(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    fake.bytes_per_second = 32000  # 4x real time: 20 chars = 9600 bytes = 0.3 s
    started = time.perf_counter()
    stamps = [time.perf_counter() - started async for _ in service.open().stream("x" * 20)]
    assert stamps[0] < 0.1 and stamps[-1] > 0.25


@pytest.mark.parametrize(
    ("status", "body", "retryable", "code"),
    [
        (
            429,
            {"err_code": "TOO_MANY_REQUESTS", "err_msg": "slow", "request_id": "r429"},
            True,
            "TOO_MANY_REQUESTS",
        ),
        (
            503,
            {"error_code": "UNAVAILABLE", "err_msg": "busy", "request_id": "r503"},
            True,
            "UNAVAILABLE",
        ),
        (500, "plain oops", True, None),
        (
            422,
            {"err_code": "UNPROCESSABLE", "err_msg": "no", "request_id": "r422"},
            False,
            "UNPROCESSABLE",
        ),
    ],
)
async def test_error_statuses(
    service: DeepgramRestService,
    fake: FakeDeepgram,
    status: int,
    body: dict[str, str] | str,
    retryable: bool,
    code: str | None,
) -> None:
    fake.fail_next(status, body)
    with pytest.raises(TTSError) as info:
        await collect(service.open().stream("Hi."))
    error = info.value
    assert type(error) is TTSError
    assert (error.status, error.retryable, error.code) == (status, retryable, code)
    assert error.request_id  # from the body, or the dg-request-id header for plain text
    assert service.healthy


async def test_bad_key_is_auth_error_and_marks_unhealthy(base: str) -> None:
    service = DeepgramRestService("wrong", base_url=base)
    with pytest.raises(TTSAuthError) as info:
        await collect(service.open().stream("Hi."))
    assert info.value.code == "INVALID_AUTH" and info.value.request_id
    assert "DEEPGRAM_API_KEY" in str(info.value)
    assert not service.healthy
    await service.aclose()


async def test_validation_error_not_retryable(base: str) -> None:
    service = DeepgramRestService("test-key", base_url=base, model="nova-3")
    with pytest.raises(TTSError) as info:
        await collect(service.open().stream("Hi."))
    assert (info.value.status, info.value.code, info.value.retryable) == (400, "Bad Request", False)
    await service.aclose()


async def test_stall_timeout(service: DeepgramRestService, fake: FakeDeepgram) -> None:
    fake.stall_after(999)
    received = 0
    with pytest.raises(TTSError, match="stalled after 999 bytes") as info:
        async for chunk in service.open().stream("Hello there."):
            received += len(chunk)
    assert info.value.retryable and received == 999


async def test_an_answer_streaming_longer_than_the_first_byte_timeout_is_never_cut(
    base: str, fake: FakeDeepgram
) -> None:
    """The stall deadline runs afresh from each chunk: an answer paced at real time (1.6 s, a
    chunk every 42 ms) outlasts both the first-byte and the stall timeouts and arrives whole."""
    fake.first_byte_delay, fake.bytes_per_second = 0.05, 8000
    text = "Twenty-seven characters ok."  # 60 ms a character: 1.6 s of audio
    service = DeepgramRestService(
        "test-key", base_url=base, first_byte_timeout=0.5, stall_timeout=0.3
    )
    assert await collect(service.open().stream(text)) == fake.audio_for(text)
    assert len(fake.audio_for(text)) / 8000 > 1.5
    await service.aclose()


async def test_first_byte_timeout(base: str, fake: FakeDeepgram) -> None:
    fake.first_byte_delay = 1.0
    service = DeepgramRestService("test-key", base_url=base, first_byte_timeout=0.2)
    with pytest.raises(TTSError, match="first byte") as info:
        await collect(service.open().stream("Hi."))
    assert info.value.retryable
    await service.aclose()


async def test_cut_mid_stream(service: DeepgramRestService, fake: FakeDeepgram) -> None:
    fake.cut_after(1000)
    with pytest.raises(TTSError, match="connection cut after 1000 bytes") as info:
        await collect(service.open().stream("Hello there."))
    assert info.value.retryable


async def test_unreachable_server_is_retryable() -> None:
    service = DeepgramRestService("k", base_url="http://127.0.0.1:9", connect_timeout=1.0)
    with pytest.raises(TTSError, match="cannot reach") as info:
        await collect(service.open().stream("Hi."))
    assert info.value.retryable
    await service.aclose()


async def test_long_text_is_split_into_limited_requests(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    text = " ".join(f"This is sentence {i}." for i in range(250))  # ~5000 chars
    audio = await collect(service.open().stream(text))
    texts = [r.text or "" for r in fake.requests]
    assert len(texts) == 3 and all(len(t) <= 2000 for t in texts)
    assert texts == chunk_text(text)
    assert audio == b"".join(fake.audio_for(t) for t in texts)


async def test_wav_headers_deepgram_sends_anyway_are_dropped_from_every_answer(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    """A Deepgram ignoring ``container=none``: each request of a long text answers with a
    header, declaring its length. Dropped from each answer, not only the first: one left in the
    middle would be heard as a click, and the first's declared length would cut the rest."""
    fake.answer_in_wav(count=None)
    text = " ".join(f"This is sentence {i}." for i in range(250))  # three requests
    audio = await collect(service.open().stream(text))
    texts = [r.text or "" for r in fake.requests]
    assert len(texts) == 3
    assert audio == b"".join(fake.audio_for(t) for t in texts)  # raw μ-law, headers gone
    assert fake.audio_for(texts[0], container="wav")[:4] == b"RIFF"


async def test_an_answer_in_other_audio_than_asked_fails_for_the_fallback(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    fake.answer_in_wav("linear16", 24000)
    with pytest.raises(TTSError, match="not the μ-law 8 kHz asked for") as info:
        await collect(service.open().stream("Hi."))
    assert not info.value.retryable  # asking again would get the same: the next voice speaks


async def test_an_answer_with_no_audio_is_a_failure_not_silence(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    """200 with an empty body: retryable, so it is asked again, then the next voice speaks."""
    fake.fail_next(200, b"")
    with pytest.raises(TTSError, match="answered 200 with no audio") as info:
        await collect(service.open().stream("Hi."))
    assert info.value.retryable
    assert await collect(service.open().stream("Hi.")) == fake.audio_for("Hi.")
    fake.fail_next(200, b"")
    assert await collect(service.open().stream("...")) == b""  # nothing to say, rightly silent


async def test_abandoned_streams_release_connections(base: str, fake: FakeDeepgram) -> None:
    fake.bytes_per_second = 8000  # real time: bodies would take seconds to finish
    service = DeepgramRestService("test-key", base_url=base, max_connections=2, connect_timeout=1.0)
    provider = service.open()
    for _ in range(8):
        stream = provider.stream("A sentence long enough to take a few seconds to say out loud.")
        assert await anext(stream)
        await stream.aclose()
    fake.bytes_per_second = None
    async with asyncio.timeout(2):
        assert await collect(provider.stream("Still works.")) == fake.audio_for("Still works.")
    await service.aclose()


async def test_provider_aclose_cancels_in_flight_stream(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    fake.bytes_per_second = 8000
    provider = service.open()
    stream = provider.stream("A long sentence for cancelling.")
    assert await anext(stream)

    async def close_soon() -> None:
        await asyncio.sleep(0.05)
        await provider.aclose()

    closer = asyncio.create_task(close_soon())
    with pytest.raises(TTSError, match="closed") as info:
        async with asyncio.timeout(2):
            async for _ in stream:
                pass
    await closer
    assert not info.value.retryable
    await provider.aclose()  # idempotent
    with pytest.raises(TTSError, match="closed"):
        await collect(provider.stream("Again."))
    await provider.clear()  # no-op
    assert await collect(service.open().stream("Hi.")) == fake.audio_for("Hi.")


async def test_injected_session_is_not_closed(base: str, fake: FakeDeepgram) -> None:
    async with aiohttp.ClientSession() as session:  # default settings: it would ask for gzip
        service = DeepgramRestService("test-key", base_url=base, http_session=session)
        assert await collect(service.open().stream("Hi.")) == fake.audio_for("Hi.")
        assert fake.requests[-1].headers["accept-encoding"] == "identity"
        await service.aclose()
        await service.aclose()
        assert not session.closed
        with pytest.raises(RuntimeError):
            service.open()


async def test_with_a_connection_idle_in_the_pool_the_request_leaves_in_the_first_step(
    base: str, fake: FakeDeepgram
) -> None:
    """A stream run by start_task, as a call's producer is: on Python 3.12+ its request is
    written before start_task returns (no loop iteration between the caller's say() and
    Deepgram being asked), when the pool holds an idle connection; on 3.11, a loop iteration
    or two later (the task's start, then aiohttp's body writer)."""
    sent: list[bytes] = []

    async def on_chunk(
        session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestChunkSentParams
    ) -> None:
        sent.append(bytes(params.chunk))

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(on_chunk)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        service = DeepgramRestService("test-key", base_url=base, http_session=session)
        provider = service.open()
        assert await collect(provider.stream("Warm.")) == fake.audio_for("Warm.")  # keep-alive
        sent.clear()
        stream = provider.stream("Now.")

        async def first_audio() -> bytes:
            return await anext(stream)

        first = start_task(first_audio())
        if EAGER_START:
            assert sent == [b'{"text": "Now."}']
        else:
            assert sent == []
        assert fake.audio_for("Now.").startswith(await first)
        assert sent == [b'{"text": "Now."}'] and len(fake.requests) == 2
        await stream.aclose()
        await service.aclose()


async def test_waiting_for_a_pooled_connection_is_bounded_by_connect_timeout(
    base: str, fake: FakeDeepgram
) -> None:
    fake.bytes_per_second = 8000  # the first stream holds the only connection for seconds
    service = DeepgramRestService(
        "test-key", base_url=base, max_connections=1, connect_timeout=0.2, first_byte_timeout=2.0
    )
    busy = service.open().stream("A sentence long enough to hold the connection for a while.")
    assert await anext(busy)
    with pytest.raises(TTSError, match="timed out connecting") as info:
        await collect(service.open().stream("Hi."))
    assert info.value.retryable
    await busy.aclose()
    fake.bytes_per_second = None
    assert await collect(service.open().stream("Hi.")) == fake.audio_for("Hi.")
    await service.aclose()


async def test_huge_error_body_is_read_only_in_part(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    fake.fail_next(502, "x" * 1_000_000)
    with pytest.raises(TTSError) as info:
        await collect(service.open().stream("Hi."))
    assert info.value.status == 502 and info.value.retryable
    assert len(info.value.message) <= 300
    assert await collect(service.open().stream("Hi.")) == fake.audio_for("Hi.")


async def test_an_error_body_is_read_no_further_than_64_kib(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    """A misbehaving server's error body is read only up to 64 KiB (the rest is dropped with
    the connection), not held whole in memory. Here its first 64 KiB are a JSON error padded
    with spaces, followed by a megabyte that would make it unreadable if it were read too."""
    head = b'{"err_code": "BUSY", "err_msg": "Overloaded,\\n try later."}'
    fake.fail_next(503, head.ljust(64 * 1024) + b"x" * 1_000_000)
    with pytest.raises(TTSError) as info:
        await collect(service.open().stream("Hi."))
    assert (info.value.status, info.value.code) == (503, "BUSY")
    assert info.value.message == "Overloaded, try later."  # one line


async def test_closing_the_service_ends_streams_without_retry(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    fake.bytes_per_second = 8000
    provider = service.open()
    stream = provider.stream("A long sentence for shutting down.")
    assert await anext(stream)
    await service.aclose()
    with pytest.raises(TTSError, match="closed") as info:
        async with asyncio.timeout(2):
            async for _ in stream:
                pass
    assert not info.value.retryable
    with pytest.raises(TTSError, match="service is closed"):
        await collect(provider.stream("Again."))


async def test_https_trusts_the_ca_in_ssl_cert_file_and_nothing_else(
    self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real Deepgram is https: the client verifies the server, trusting certifi's bundle, or the
    CA file named by SSL_CERT_FILE (a private CA, e.g. a regional proxy's)."""
    cert, key = self_signed
    fake = FakeDeepgram(first_byte_delay=0.0)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with serve_asgi(
        fake.app, ws=fake.ws_protocol, ssl_certfile=str(cert), ssl_keyfile=str(key)
    ) as base:
        assert base.startswith("https://")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusting = DeepgramRestService("test-key", base_url=base)
        await trusting.start()
        assert await collect(trusting.open().stream("Hi.")) == fake.audio_for("Hi.")
        await trusting.aclose()

        monkeypatch.delenv("SSL_CERT_FILE")
        doubting = DeepgramRestService("test-key", base_url=base)
        await doubting.start()
        with pytest.raises(TTSError, match="cannot reach Deepgram.*certificate"):
            await collect(doubting.open().stream("Hi."))
        await doubting.aclose()
    assert len(fake.requests) == 1  # the untrusted server never saw the second request


async def test_closing_the_service_ends_a_wait_for_a_pooled_connection(
    base: str, fake: FakeDeepgram
) -> None:
    """aiohttp cancels requests queued for a connection when its pool closes: the stream must end
    with the service's non-retryable error, not a bare CancelledError its task never received."""
    fake.bytes_per_second = 8000
    service = DeepgramRestService("test-key", base_url=base, max_connections=1)
    await service.start()
    holder = service.open().stream("A sentence long enough to hold the only connection.")
    assert await anext(holder)
    waiting = asyncio.create_task(collect(service.open().stream("Waiting for a socket.")))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await service.aclose()
    with pytest.raises(TTSError, match="closed") as info:
        async with asyncio.timeout(2):
            await waiting
    assert not info.value.retryable
    await holder.aclose()


async def test_an_abandoned_stream_cannot_stop_the_provider_closing_the_next(
    base: str, fake: FakeDeepgram
) -> None:
    """The first stream's cleanup runs when it is closed, not later: it must not erase the next
    stream's deadline, which is how ``provider.aclose()`` interrupts a wait for the first byte."""
    fake.bytes_per_second = 8000
    service = DeepgramRestService("test-key", base_url=base, first_byte_timeout=10.0)
    await service.start()
    provider = service.open()
    first = provider.stream("A sentence to abandon after its first chunk.")
    assert await anext(first)
    await first.aclose()
    fake.first_byte_delay = 5.0
    second = asyncio.create_task(collect(provider.stream("A slow one.")))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await provider.aclose()
    with pytest.raises(TTSError, match="closed"):
        await second
    assert time.monotonic() - started < 1.0
    await service.aclose()


class CountingRelay:
    """A TCP relay in front of the fake that counts the connections clients open to it — what a
    warm-up does shows here even though it sends no request."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self._target = (host, int(port))
        self.connections = 0
        self._relayed = 0  # connections whose pipes to the fake are set up
        self._relaying = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # a pipe cancelled before it ran never closes its own
            writer.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def drop_all(self, relayed: int) -> None:
        """Once ``relayed`` connections are relayed, close every one, both ways, as a server
        closing idle keep-alive connections."""
        async with self._relaying:
            await self._relaying.wait_for(lambda: self._relayed >= relayed)
        for writer in self._writers:
            writer.close()
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += (writer, up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pipe = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)
        async with self._relaying:
            self._relayed += 1
            self._relaying.notify_all()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()


def warm_up_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "deepgram-rest-connect"]


@contextlib.asynccontextmanager
async def relayed_service(
    base: str, **kwargs: Any
) -> AsyncIterator[tuple[CountingRelay, DeepgramRestService]]:
    """A service reaching the fake through a :class:`CountingRelay`; closed on the way out,
    once the connections its calls keep are taken."""
    relay = CountingRelay(base)
    async with relay as relayed:
        service = DeepgramRestService("test-key", base_url=relayed, **kwargs)
        try:
            yield relay, service
        finally:
            await kept()
            await service.aclose()


async def test_warm_up_opens_the_connection_the_first_request_then_uses(
    base: str, fake: FakeDeepgram
) -> None:
    async with relayed_service(base) as (relay, service):
        provider = service.open()
        provider.warm_up()
        provider.warm_up()  # once per call
        (warming,) = warm_up_tasks()
        await asyncio.wait({warming}, timeout=2)
        assert warming.done() and warming.exception() is None
        assert (relay.connections, fake.requests) == (1, [])  # a connection, and no request
        assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
        assert relay.connections == 1  # the request found it idle in the pool


async def test_a_stream_started_during_warm_up_waits_for_its_connection(
    base: str, fake: FakeDeepgram
) -> None:
    async with relayed_service(base) as (relay, service):
        provider = service.open()
        provider.warm_up()
        assert warm_up_tasks()
        assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")
        assert relay.connections == 1  # not a second connection of its own


async def kept() -> None:
    """Until the connections each provider keeps for its next text are taken."""
    if tasks := warm_up_tasks():
        await asyncio.wait(tasks, timeout=2)


async def test_each_call_keeps_a_connection_so_replies_asked_at_once_open_none(
    base: str, fake: FakeDeepgram
) -> None:
    """Calls greeted one after another need one connection between them; if each did not keep
    one for its next text, their replies asked for in the same instant would each open one
    (TCP and TLS, at the moment the caller waits)."""
    async with relayed_service(base) as (relay, service):
        providers = [service.open() for _ in range(4)]
        for provider in providers:
            provider.warm_up()
            assert await collect(provider.stream("Hello.")) == fake.audio_for("Hello.")
            await kept()
        assert relay.connections == 4  # one kept per call
        texts = [f"Reply number {n}." for n in range(4)]
        replies = await asyncio.gather(
            *(collect(p.stream(t)) for p, t in zip(providers, texts, strict=True))
        )
        assert replies == [fake.audio_for(t) for t in texts]
        assert relay.connections == 4  # none opened for the replies


async def test_a_kept_connection_the_server_closed_is_replaced_by_the_request(
    base: str, fake: FakeDeepgram
) -> None:
    async with relayed_service(base) as (relay, service):
        provider = service.open()
        provider.warm_up()
        await kept()
        await relay.drop_all(relayed=1)  # e.g. Deepgram's idle timeout while the call was quiet
        await asyncio.sleep(0.05)
        assert await collect(provider.stream("Still here.")) == fake.audio_for("Still here.")
        assert relay.connections == 2


async def test_a_closed_call_gives_its_kept_connection_back_to_the_pool(
    base: str, fake: FakeDeepgram
) -> None:
    async with relayed_service(base, max_connections=1) as (relay, service):
        first = service.open()
        first.warm_up()
        await kept()
        await first.aclose()
        second = service.open()  # the pool's only connection: it must not be held any more
        assert await collect(second.stream("Next call.")) == fake.audio_for("Next call.")
        assert relay.connections == 1


async def test_a_connection_kept_half_the_keepalive_or_longer_is_not_reused(
    base: str, fake: FakeDeepgram
) -> None:
    """The pool would take a kept connection given back as freshly idle, however long the call
    kept it: past Deepgram's idle close, a request on it fails (aiohttp does not resend a POST).
    Kept half ``keepalive`` or longer, it is closed and the request opens another."""
    async with relayed_service(base, keepalive=0.4) as (relay, service):
        provider = service.open()
        provider.warm_up()
        assert await collect(provider.stream("One.")) == fake.audio_for("One.")
        await kept()
        await asyncio.sleep(0.1)  # a short pause: the kept connection serves the next text
        assert await collect(provider.stream("Two.")) == fake.audio_for("Two.")
        assert relay.connections == 1
        await kept()
        await asyncio.sleep(0.3)  # the caller talked a while: kept longer than 0.2 s
        assert await collect(provider.stream("Three.")) == fake.audio_for("Three.")
        assert relay.connections == 2


async def test_the_next_text_does_not_wait_for_its_connection_to_be_kept(
    base: str, fake: FakeDeepgram, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sentence asked for right after the last one ended (as the call's producer does) goes
    out in that step: on 3.11 the task keeping a connection has not even started then, and
    waiting for it cost two loop iterations per sentence."""
    loop = asyncio.get_running_loop()
    ticks, running = [0], [True]

    def tick() -> None:
        ticks[0] += 1
        if running[0]:
            loop.call_soon(tick)

    posted: list[int] = []
    real_post = aiohttp.ClientSession.post

    def post(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> Any:
        posted.append(ticks[0])  # observed only: the request itself is aiohttp's
        return real_post(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "post", post)
    service = DeepgramRestService("test-key", base_url=base)
    provider = service.open()
    provider.warm_up()
    await kept()
    assert await collect(provider.stream("One.")) == fake.audio_for("One.")
    loop.call_soon(tick)
    before = ticks[0]
    assert await collect(provider.stream("Two.")) == fake.audio_for("Two.")
    running[0] = False
    assert posted[-1] - before == 0
    await kept()
    await service.aclose()


async def test_calls_begun_while_the_key_was_refused_keep_connections_once_accepted(
    base: str, fake: FakeDeepgram
) -> None:
    clock = SettableClock()
    async with relayed_service(base, clock=clock) as (relay, service):
        chain = FallbackService([service, FakeService("backup")], apology=b"sorry")
        service.mark_unhealthy()
        providers = [chain.open() for _ in range(3)]
        for provider in providers:
            provider.warm_up()  # the backup's: Deepgram is refused
        clock.now += 60
        for n, provider in enumerate(providers):  # one after another: one connection would do
            await collect(provider.stream(f"Accepted again, {n}."))
            await kept()
        assert service.healthy and relay.connections == 3  # each call keeps one
        await asyncio.gather(*(collect(p.stream(f"Reply {n}.")) for n, p in enumerate(providers)))
        assert relay.connections == 3
        await chain.aclose()


async def test_a_due_recheck_sends_one_request_however_many_calls_ask(
    base: str, fake: FakeDeepgram
) -> None:
    """One refused request a minute, not one per call asking in that moment (each would also
    wait its round trip before the fallback voice speaks)."""
    clock = SettableClock()
    fake.api_key = "another-key"
    service = DeepgramRestService("test-key", base_url=base, auth_recheck=60, clock=clock)
    with pytest.raises(TTSAuthError):
        await collect(service.open().stream("Hi."))
    clock.now += 60
    chain = FallbackService([service, FakeService("backup")], apology=b"sorry")
    texts = [f"Caller {n}." for n in range(20)]
    heard = await asyncio.gather(*(collect(chain.open().stream(t)) for t in texts))
    assert [h.rstrip(b"\xff") for h in heard] == [tone_for(t).rstrip(b"\xff") for t in texts]
    assert len(fake.requests) == 2
    await chain.aclose()


async def test_calls_keeping_every_connection_the_pool_allows_still_speak(
    base: str, fake: FakeDeepgram
) -> None:
    """A kept connection counts against ``max_connections`` (one per call): a call gives its
    own back before its request takes one, so none waits for another's."""
    service = DeepgramRestService("test-key", base_url=base, max_connections=2)
    providers = [service.open(), service.open()]
    for provider in providers:
        provider.warm_up()
    await kept()
    async with asyncio.timeout(3):
        audio = await asyncio.gather(*(collect(p.stream("Both at once.")) for p in providers))
    assert audio == [fake.audio_for("Both at once.")] * 2
    await kept()
    await service.aclose()


async def test_no_warm_up_on_an_injected_session(base: str, fake: FakeDeepgram) -> None:
    """Its proxy settings (not public in aiohttp) decide which connection a request takes."""
    async with aiohttp.ClientSession() as session:
        service = DeepgramRestService("test-key", base_url=base, http_session=session)
        provider = service.open()
        provider.warm_up()
        assert not warm_up_tasks()
        assert await collect(provider.stream("Hi.")) == fake.audio_for("Hi.")


async def test_a_failed_warm_up_is_logged_and_the_request_reports_its_own_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = DeepgramRestService("k", base_url="http://127.0.0.1:9", connect_timeout=1.0)
    provider = service.open()
    provider.warm_up()
    with pytest.raises(TTSError, match="cannot reach") as info:
        await collect(provider.stream("Hi."))
    assert info.value.retryable
    assert "opening a connection ahead of speech failed" in caplog.text
    await service.aclose()


@pytest.fixture
async def silent_tls() -> AsyncIterator[str]:
    """An https:// base URL whose server accepts and never answers the TLS handshake: a warm-up
    against it stays in flight."""
    accepted: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield f"https://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    for writer in accepted:
        writer.close()
    silent.close()
    await silent.wait_closed()


async def test_closing_the_provider_cancels_a_warm_up_in_flight(silent_tls: str) -> None:
    service = DeepgramRestService("k", base_url=silent_tls, connect_timeout=30)
    provider = service.open()
    provider.warm_up()
    await asyncio.sleep(0.1)
    (task,) = warm_up_tasks()
    assert not task.done()
    await provider.aclose()
    assert task.cancelled() and not warm_up_tasks()
    await service.aclose()


async def test_closing_the_provider_ends_a_stream_waiting_for_the_warm_up(
    silent_tls: str,
) -> None:
    service = DeepgramRestService(
        "k", base_url=silent_tls, connect_timeout=30, first_byte_timeout=30
    )
    provider = service.open()
    provider.warm_up()
    waiting = asyncio.create_task(collect(provider.stream("Hi.")))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await provider.aclose()
    with pytest.raises(TTSError, match="closed") as info:
        async with asyncio.timeout(2):
            await waiting
    assert not info.value.retryable
    await service.aclose()


async def test_shutting_down_during_a_warm_up_is_not_reported_as_a_failure(
    silent_tls: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server is stopping while a call's warm-up still connects: when that connect then
    fails (here it times out), it is not a fault worth a warning."""
    service = DeepgramRestService("k", base_url=silent_tls, connect_timeout=0.5)
    provider = service.open()
    provider.warm_up()
    await asyncio.sleep(0.1)
    (task,) = warm_up_tasks()
    await service.aclose()
    await asyncio.wait({task}, timeout=2)
    assert task.done() and task.exception() is not None
    assert "ahead of speech failed" not in caplog.text
    await provider.aclose()


async def test_no_warm_up_once_the_credentials_were_refused_or_the_provider_closed(
    base: str,
) -> None:
    service = DeepgramRestService("test-key", base_url=base)
    service.mark_unhealthy()
    service.open().warm_up()
    closed = DeepgramRestService("test-key", base_url=base).open()
    await closed.aclose()
    closed.warm_up()
    assert not warm_up_tasks()
    await service.aclose()


class ClosesOnSecondRequest:
    """An HTTP/1.1 server answering each connection's first request (keeping it alive) and
    closing it, unanswered, on its second: Deepgram closing an idle keep-alive connection just
    as a request goes out on it."""

    def __init__(self, audio: bytes) -> None:
        self.audio, self.connections, self.requests = audio, 0, 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for answered in (True, False):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                await reader.readexactly(length)
                self.requests += 1
                if answered:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: audio/basic\r\n"
                        + b"content-length: %d\r\n\r\n" % len(self.audio)
                        + self.audio
                    )
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed it
        finally:
            writer.close()


async def test_a_request_whose_connection_closes_under_it_is_sent_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp resends only idempotent requests on a kept connection the server closed; the
    voice resends its POST once, on a new connection, so the next sentence of the utterance
    is not handed to the fallback voice for it."""
    audio = bytes(range(256)) * 7
    server = ClosesOnSecondRequest(audio)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    service = DeepgramRestService("test-key", base_url=f"http://127.0.0.1:{port}")
    provider = service.open()
    try:
        assert await collect(provider.stream("One.")) == audio
        with caplog.at_level(logging.INFO, "callspeak.tts.deepgram_rest"):
            assert await collect(provider.stream("Two.", continuation=True)) == audio
        assert (server.connections, server.requests) == (2, 3)
        assert "closed under the request" in caplog.text
    finally:
        await provider.aclose()
        await service.aclose()
        listener.close()
        await listener.wait_closed()


async def test_a_request_cut_by_the_service_closing_is_not_sent_again() -> None:
    """Closing the service cuts the request in flight: reported as the service closing (a
    TTSError), not sent again on the closed session."""
    got = asyncio.Event()

    async def holds(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            got.set()
            await reader.read()  # never answers
        writer.close()

    listener = await asyncio.start_server(holds, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    service = DeepgramRestService("test-key", base_url=f"http://127.0.0.1:{port}")
    provider = service.open()
    try:
        streaming = asyncio.create_task(collect(provider.stream("One.")))
        await asyncio.wait_for(got.wait(), 5)
        await service.aclose()
        with pytest.raises(TTSError, match="closed"):
            await asyncio.wait_for(streaming, 5)
    finally:
        await provider.aclose()
        listener.close()
        await listener.wait_closed()


async def test_an_answer_with_a_wav_header_it_cannot_read_fails_as_a_tts_error(
    service: DeepgramRestService, fake: FakeDeepgram
) -> None:
    """A header of audio the stripper refuses outright (A-law here, stereo, 8-bit PCM…) is the
    same case as other audio than asked: a TTSError that is not retryable — not a bare
    ValueError — and after parts already heard, the fallback voice is told only the rest."""
    fake.answer_in_wav("alaw", 8000)
    with pytest.raises(TTSError, match="WAV") as info:
        await collect(service.open().stream("Hi."))
    assert not info.value.retryable

    text = " ".join(f"This is sentence {i}." for i in range(250))  # three requests
    fake.requests.clear()
    provider = service.open()
    injected = False
    with pytest.raises(TTSError) as info:
        async for _ in provider.stream(text):
            if not injected:
                fake.answer_in_wav("alaw", 8000)  # the second part's answer
                injected = True
    parts = chunk_text(text)
    assert info.value.unspoken == " ".join(parts[1:])  # the first was heard whole
