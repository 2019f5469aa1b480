"""CALLSPEAK_DEEPGRAM_MAX_CONCURRENT: Deepgram's per-project concurrency limit kept on our side,
against the fake Deepgram on loopback refusing with 429 past the same limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from callspeak.config import Settings
from callspeak.emulator import DialOptions, dial
from callspeak.server import create_app
from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_deepgram import FakeDeepgram
from callspeak.tts.base import CONCURRENCY_LIMIT, TTSError
from callspeak.tts.deepgram_rest import DeepgramRestService
from callspeak.tts.deepgram_ws import DeepgramWebSocketService
from callspeak.tts.fallback import FallbackService
from callspeak.voices import make_engine
from tests.conftest import serve_app
from tests.fakes import FakeService, tone_for
from tests.test_server_limits import until

KEY = "test-key"


async def heard(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


def settings_for(dg_url: str, **fields: object) -> Settings:
    """`callspeak serve`'s settings with Deepgram (its key, its base URLs) at ``dg_url``."""
    return Settings(
        validate_signatures=False,
        deepgram_api_key=KEY,
        deepgram_url=dg_url,
        deepgram_ws_url=dg_url.replace("http", "ws"),
        **fields,  # type: ignore[arg-type]
    )


def untrimmed(audio: bytes) -> bytes:
    return audio.rstrip(b"\xff")  # (the chain pads its last frame with μ-law silence)


async def test_rest_requests_past_the_limit_wait_for_a_slot_and_none_is_refused() -> None:
    """Eight calls ask at once, the limit is three: Deepgram never has more than three in
    progress, refuses none, and every call hears Deepgram's audio, not the next voice."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.05, bytes_per_second=40_000, max_concurrent=3)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramRestService(KEY, base_url=dg_url, max_concurrent=3)
        backup = FakeService("backup")
        chain = FallbackService([deepgram, backup], apology=b"sorry")
        texts = [f"Caller {n}." for n in range(8)]  # each answer streams in about 0.1 s
        calls = [chain.open() for _ in texts]
        got = await asyncio.gather(*(heard(c.stream(t)) for c, t in zip(calls, texts, strict=True)))
        await chain.aclose()
    for text, audio in zip(texts, got, strict=True):
        assert untrimmed(audio) == untrimmed(fake.audio_for(text))
    assert [r.status for r in fake.requests] == [200] * 8
    assert fake.rest_peak == deepgram.slots.peak == 3
    assert all(p.texts == [] for p in backup.providers)
    assert deepgram.slots.in_use == 0


async def test_without_the_limit_the_same_calls_draw_429s() -> None:
    """The control for the test above: with no limit on our side, Deepgram refuses some."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.05, bytes_per_second=40_000, max_concurrent=3)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramRestService(KEY, base_url=dg_url)
        chain = FallbackService([deepgram, FakeService("backup")], apology=b"sorry")
        texts = [f"Caller {n}." for n in range(8)]
        await asyncio.gather(*(heard(chain.open().stream(t)) for t in texts))
        await chain.aclose()
    assert 429 in [r.status for r in fake.requests]


async def test_a_request_given_no_slot_in_time_goes_to_the_next_voice_unsent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The only slot is held by a call whose answer streams in real time: another call with
    nothing left to play waits a second, then its text goes to the backup voice, no request
    sent; the log names the setting. A call with audio still to play waits longer, unheard,
    and is spoken by Deepgram."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, bytes_per_second=8000)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramRestService(KEY, base_url=dg_url, max_concurrent=1)
        backup = FakeService("backup")
        chain = FallbackService([deepgram, backup], apology=b"sorry")
        failures: list[TTSError] = []
        chain.on_failure(lambda name, error: failures.append(error))
        long_text = "One, two, three, four, five, six."  # about 2 s of the fake's audio
        holder = chain.open().stream(long_text)
        first = await anext(holder)  # streaming: it holds the slot
        holding = asyncio.create_task(heard(holder))  # read as it comes, as a call does
        loop = asyncio.get_running_loop()
        with caplog.at_level(logging.WARNING):
            began = loop.time()
            audio = await heard(chain.open().stream("Two."))
            waited = loop.time() - began
        assert untrimmed(audio) == untrimmed(tone_for("Two."))
        assert waited >= 1.0  # a second's wait (the holder's answer lasts 2 s), then the backup
        assert [r.status for r in fake.requests] == [200]  # nothing sent for "Two."
        assert failures[0].code == CONCURRENCY_LIMIT and failures[0].kind == "busy"
        assert "CALLSPEAK_DEEPGRAM_MAX_CONCURRENT" in caplog.text and "falling back" in caplog.text
        # Three seconds still to play: it may wait 2.5 s, by when the holder's answer is over.
        patient = await heard(chain.open().stream("Three.", ahead=3.0))
        assert untrimmed(patient) == untrimmed(fake.audio_for("Three."))
        assert untrimmed(first + await holding) == untrimmed(fake.audio_for(long_text))
        await chain.aclose()
    assert deepgram.slots.in_use == 0 and fake.rest_peak == 1


async def test_a_slot_is_given_back_however_the_request_ends() -> None:
    """A failed request, and an answer abandoned mid-stream (a barge-in), free their slot."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, bytes_per_second=8000)
    fake.fail_next(503, count=1)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramRestService(KEY, base_url=dg_url, max_concurrent=1)
        call = deepgram.open()
        with pytest.raises(TTSError, match="status=503"):
            await heard(call.stream("Hi."))
        assert deepgram.slots.in_use == 0
        stream = call.stream("One, two, three, four, five.")
        await anext(stream)
        assert deepgram.slots.in_use == 1
        await stream.aclose()  # type: ignore[attr-defined]
        assert deepgram.slots.in_use == 0
        await call.aclose()
        await deepgram.aclose()


async def test_a_websocket_call_finding_every_socket_taken_uses_the_next_voice_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A socket lives as long as its call: with the one slot taken, another call opens none (not
    even to warm up), its texts go to the backup with one warning in all rather than one each,
    and once the first call ends its next text is Deepgram's again."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, max_concurrent=1)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramWebSocketService(
            KEY, ws_url=dg_url.replace("http", "ws"), max_concurrent=1
        )
        backup = FakeService("backup")
        chain = FallbackService([deepgram, backup], apology=b"sorry")
        counted: list[str] = []  # what callspeak_tts_errors_total counts
        chain.on_failure(lambda name, error: counted.append(f"{name} {error.kind}"))
        first, second = chain.open(), chain.open()
        assert untrimmed(await heard(first.stream("One."))) == untrimmed(fake.audio_for("One."))
        with caplog.at_level(logging.WARNING):
            second.warm_up()  # type: ignore[attr-defined]
            for text in ("Two.", "Three.", "Four."):
                assert untrimmed(await heard(second.stream(text))) == untrimmed(tone_for(text))
        assert fake.ws_connections == 1  # no handshake refused, none tried
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "CALLSPEAK_DEEPGRAM_MAX_CONCURRENT" in warnings[0].message
        assert warnings[0].message.startswith("deepgram-ws: the 1 socket the limit allows is open")
        assert counted == ["deepgram-ws busy"] * 3  # each text the limit kept from the voice
        await first.aclose()
        assert deepgram.slots.in_use == 0
        await until(lambda: not fake.ws_open)  # the fake's count follows the close a moment later
        five = await heard(second.stream("Five."))
        assert untrimmed(five) == untrimmed(fake.audio_for("Five."))
        await chain.aclose()
    assert fake.ws_peak == 1 and deepgram.slots.in_use == 0


async def test_a_websocket_slot_is_freed_by_a_failed_connect_and_kept_across_a_reconnect() -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    fake.refuse_ws(503, count=None)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramWebSocketService(
            KEY, ws_url=dg_url.replace("http", "ws"), max_concurrent=1, backoff=0.01
        )
        call = deepgram.open()
        with pytest.raises(TTSError, match="could not connect"):
            await heard(call.stream("Hi."))
        assert deepgram.slots.in_use == 0
        fake.clear_faults()
        assert untrimmed(await heard(call.stream("Hi."))) == untrimmed(fake.audio_for("Hi."))
        assert deepgram.slots.in_use == 1
        fake.ws_close_after_flushed(count=1)  # Deepgram closes the socket between utterances
        await heard(call.stream("Again."))
        assert untrimmed(await heard(call.stream("Bye."))) == untrimmed(fake.audio_for("Bye."))
        assert deepgram.slots.in_use == 1
        await call.aclose()
        assert deepgram.slots.in_use == 0
        await deepgram.aclose()


def test_the_setting_defaults_to_deepgrams_published_limit_and_0_means_none() -> None:
    settings = Settings(deepgram_api_key=KEY, validate_signatures=False)
    assert settings.deepgram_max_concurrent == 15
    rest = make_engine(settings, "deepgram")
    ws = make_engine(settings, "deepgram-ws")
    assert isinstance(rest, DeepgramRestService) and isinstance(ws, DeepgramWebSocketService)
    assert rest.slots.limit == ws.slots.limit == 15
    unlimited = make_engine(settings.model_copy(update={"deepgram_max_concurrent": 0}), "deepgram")
    assert isinstance(unlimited, DeepgramRestService) and unlimited.slots.limit is None
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings(deepgram_max_concurrent=-1)


@pytest.mark.parametrize(
    ("limit", "said"),
    [
        (15, "voice: deepgram > piper (at once: deepgram at most 15; CALLSPEAK_DEEPGRAM_MAX_"),
        (0, "voice: deepgram > piper (at once: deepgram any number; CALLSPEAK_DEEPGRAM_MAX_"),
    ],
)
async def test_the_start_up_line_says_the_limit_the_voice_keeps(
    limit: int, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A plan allowing more than 15 would otherwise find out only from its calls' voices."""
    # (never asked: no call is placed)
    settings = settings_for("http://127.0.0.1:9", deepgram_max_concurrent=limit)
    chain = FallbackService([make_engine(settings, "deepgram"), FakeService("piper")])
    with caplog.at_level(logging.INFO, "callspeak.server"):
        async with serve_app(create_app(settings, tts=chain)):
            pass
    await chain.aclose()  # (an injected voice is its owner's to close)
    assert said in caplog.text


async def test_a_server_at_its_deepgram_limit_speaks_every_call_with_deepgram() -> None:
    """As deployed: `callspeak serve`'s settings, six emulated calls at once, a project limit
    of two. No 429, every caller hears Deepgram's greeting."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.05, bytes_per_second=40_000, max_concurrent=2)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        settings = settings_for(dg_url, tts="deepgram", deepgram_max_concurrent=2, fallback="none")
        async with serve_app(create_app(settings)) as url:
            ws_url = url.replace("http", "ws") + "/twilio"
            texts = [f"Hello caller {n}." for n in range(6)]
            reports = await asyncio.gather(
                *(
                    dial(DialOptions(url=ws_url, parameters={"say": t}, quiet_seconds=0.7))
                    for t in texts
                )
            )
    assert [r.status for r in fake.requests] == [200] * 6 and fake.rest_peak == 2
    for text, report in zip(texts, reports, strict=True):
        assert untrimmed(fake.audio_for(text)) in bytes(report.played)


async def test_with_every_socket_taken_the_rest_voice_speaks_in_the_same_aura_voice() -> None:
    """`--tts deepgram-ws` with `CALLSPEAK_FALLBACK=deepgram,piper`: a call past the streaming
    limit is spoken over REST, whose limit Deepgram counts apart — the same voice, not Piper."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, max_concurrent=1)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        settings = settings_for(
            dg_url, tts="deepgram-ws", deepgram_max_concurrent=1, fallback="deepgram"
        )
        streaming, rest = make_engine(settings, "deepgram-ws"), make_engine(settings, "deepgram")
        chain = FallbackService([streaming, rest], apology=b"sorry")
        first, second = chain.open(), chain.open()
        one, two = await heard(first.stream("One.")), await heard(second.stream("Two."))
        await chain.aclose()
    assert untrimmed(one) == untrimmed(fake.audio_for("One."))
    assert untrimmed(two) == untrimmed(fake.audio_for("Two."))
    # One socket (the first call's), one REST request (the second call's text), no 429.
    assert [(r.method, r.status) for r in fake.requests] == [("GET", 101), ("POST", 200)]


async def test_the_wait_for_a_slot_is_not_counted_in_the_first_byte_deadline() -> None:
    """A first-byte deadline of 0.5 s, a wait of over a second for the slot: the answer is
    still taken (the deadline starts when the request is sent)."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, bytes_per_second=8000)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramRestService(
            KEY, base_url=dg_url, max_concurrent=1, first_byte_timeout=0.5
        )
        holder = deepgram.open().stream("One, two, three.")  # about 1 s of the fake's audio
        first = await anext(holder)
        holding = asyncio.create_task(heard(holder))
        loop = asyncio.get_running_loop()
        began = loop.time()
        audio = await heard(deepgram.open().stream("Two.", ahead=5.0))
        assert loop.time() - began > 0.7 and audio == fake.audio_for("Two.")
        assert first + await holding == fake.audio_for("One, two, three.")
        await deepgram.aclose()


async def test_closing_a_call_ends_its_wait_for_a_slot_at_once() -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, bytes_per_second=8000)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramRestService(KEY, base_url=dg_url, max_concurrent=1)
        holder = deepgram.open().stream("One, two, three, four, five, six.")
        await anext(holder)
        call = deepgram.open()
        waiting = asyncio.create_task(heard(call.stream("Two.", ahead=6.0)))
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        closed_at = loop.time()
        await call.aclose()
        with pytest.raises(TTSError, match="closed"):
            await waiting
        assert loop.time() - closed_at < 0.5  # not the 5.5 s it could have waited
        assert deepgram.slots.in_use == 1  # the holder's, only
        await holder.aclose()  # type: ignore[attr-defined]
        assert deepgram.slots.in_use == 0
        await deepgram.aclose()


async def test_a_websocket_call_closed_mid_close_gives_its_slot_back() -> None:
    """The call's end cut short (cancelled) while its socket closes: the slot is not kept for
    good (after 15 of these, no call could open a socket until a restart)."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramWebSocketService(
            KEY, ws_url=dg_url.replace("http", "ws"), max_concurrent=1
        )
        call = deepgram.open()
        await heard(call.stream("Hi."))
        assert deepgram.slots.in_use == 1
        closing = asyncio.create_task(call.aclose())
        await asyncio.sleep(0)  # into its Close
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await call.aclose()
        assert deepgram.slots.in_use == 0
        await until(lambda: not fake.ws_open)  # and no socket is left open (as the fake sees)
        other = deepgram.open()
        assert untrimmed(await heard(other.stream("Bye."))) == untrimmed(fake.audio_for("Bye."))
        await deepgram.aclose()


async def test_a_socket_deepgram_closed_while_its_call_was_idle_frees_its_slot() -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, max_concurrent=1)
    fake.ws_close_after_flushed(count=1)  # Deepgram closes the first call's socket, idle
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramWebSocketService(
            KEY, ws_url=dg_url.replace("http", "ws"), max_concurrent=1
        )
        idle, other = deepgram.open(), deepgram.open()
        await heard(idle.stream("Hi."))
        assert other.at_capacity()  # the idle call's socket is open: its slot is taken
        await until(lambda: not other.at_capacity())  # once the close reaches our side
        assert untrimmed(await heard(other.stream("Two."))) == untrimmed(fake.audio_for("Two."))
        assert idle.at_capacity()  # its slot went to the other call
        await deepgram.aclose()
    assert [r.status for r in fake.requests] == [101, 101]  # no 429: two sockets, one at a time


async def test_a_last_voice_with_every_socket_taken_is_not_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`CALLSPEAK_FALLBACK=none`: past the limit the apology plays at once, naming the limit,
    with no connect attempt and no warning for each text (each is counted as busy)."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramWebSocketService(
            KEY, ws_url=dg_url.replace("http", "ws"), max_concurrent=1
        )
        chain = FallbackService([deepgram], apology=b"\x55" * 160)
        failures: list[TTSError] = []
        chain.on_failure(lambda name, error: failures.append(error))
        first, second = chain.open(), chain.open()
        await heard(first.stream("One."))
        with caplog.at_level(logging.WARNING):
            for text in ("Two.", "Three."):
                with pytest.raises(TTSError, match="CALLSPEAK_DEEPGRAM_MAX_CONCURRENT"):
                    assert await heard(second.stream(text)) == b"\x55" * 160
        await chain.aclose()
    assert fake.ws_connections == 1 and "failed before any audio" not in caplog.text
    assert [failure.kind for failure in failures] == ["busy", "busy"]  # counted in the metric
