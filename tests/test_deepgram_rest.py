"""DeepgramRestService / DeepgramRestProvider against the fake Deepgram on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_deepgram import FakeDeepgram
from callspeak.tts.base import TTSAuthError, TTSError, TTSProvider, TTSService
from callspeak.tts.deepgram_rest import DeepgramRestService
from callspeak.tts.sentences import chunk_text


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
    async with serve_asgi(fake.app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as base:
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
