"""CallSession with an in-memory transport and a scripted provider."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from callspeak.events import CallEventRecord
from callspeak.metrics import Metrics
from callspeak.protocol import (
    AccountSid,
    CallSid,
    Clear,
    Connected,
    Dtmf,
    Mark,
    Media,
    MediaFormat,
    OutboundMark,
    OutboundMedia,
    Start,
    Stop,
    StreamSid,
)
from callspeak.session import (
    CallSession,
    SessionClosed,
    SpeechQueueFull,
    TextTooLong,
    TransportClosed,
)
from callspeak.speech import HeardRecord, SpeechStatus
from callspeak.tasks import EAGER_START
from callspeak.tts.base import TTSError
from callspeak.tts.fallback import FallbackService
from tests.fakes import (
    DirectTransport,
    FakeProvider,
    FakeService,
    FakeTransport,
    InstantClock,
    tone_for,
)

SID = StreamSid("MZtest")


def start_json(**params: str) -> str:
    return Start(
        1,
        SID,
        AccountSid("AC1"),
        CallSid("CAtest"),
        ("inbound",),
        params,
        MediaFormat("audio/x-mulaw", 8000, 1),
    ).to_json()


def protocol_error_counts(metrics: Metrics) -> list[tuple[str, float]]:
    """``callspeak_protocol_errors_total`` as (reason, count) pairs."""
    return [
        (sample.labels["reason"], sample.value)
        for metric in metrics.protocol_errors.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    ]


def echo(name: str, seq: int = 10) -> str:
    return Mark(seq, SID, name).to_json()


def every_voice_fails(apology: bytes) -> FallbackService:
    """Two voices that both refuse any text with an "e" in it, then ``apology``."""
    return FallbackService(
        [FakeService("a", fail_on="e"), FakeService("b", fail_on="e")], apology=apology
    )


@pytest.fixture(autouse=True, params=["queued", "direct"])
def _delivery(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs twice: messages read by the session's reader task (an ASGI WebSocket),
    and handed over as they arrive (the native socket; see session.DirectDelivery)."""
    direct = request.param == "direct"
    monkeypatch.setattr(Harness, "transport_class", DirectTransport if direct else FakeTransport)


class Harness:
    transport_class: type[FakeTransport] = FakeTransport

    def __init__(self, provider: FakeProvider | None = None, **kwargs: object) -> None:
        self.transport = self.transport_class()
        self.provider = provider or FakeProvider()
        self.events: list[CallEventRecord] = []
        self.metrics = Metrics()
        self.session = CallSession(
            self.transport,
            self.provider,
            greeting=kwargs.pop("greeting", "Hello there."),  # type: ignore[arg-type]
            metrics=self.metrics,
            on_event=self.events.append,
            **kwargs,  # type: ignore[arg-type]
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.session.run())
        self.transport.push(Connected("Call", "1.0.0").to_json())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        if not self.task.done():
            self.transport.push(None)
        async with asyncio.timeout(5):
            await self.task

    def audio(self) -> bytes:
        return b"".join(
            m.payload for m in self.transport.messages() if isinstance(m, OutboundMedia)
        )

    def marks(self) -> list[str]:
        return [m.name for m in self.transport.messages() if isinstance(m, OutboundMark)]

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    async def start_idle(self) -> None:
        """Start the call and wait until its speaker waits for speech (make it greeting=None)."""
        self.transport.push(start_json())
        await self.session.wait_started()
        await asyncio.sleep(0.01)


async def test_greeting_is_spoken_as_frames_then_a_mark_and_counts_played_on_echo() -> None:
    async with Harness() as h:
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        media = [m for m in h.transport.messages() if isinstance(m, OutboundMedia)]
        # Whole 20 ms frames, at most five (100 ms) to a message.
        assert all(len(m.payload) % 160 == 0 and 0 < len(m.payload) <= 800 for m in media)
        expected = tone_for("Hello there.")
        assert h.audio()[: len(expected)] == expected  # passthrough, only re-framed
        assert set(h.audio()[len(expected) :]) <= {0xFF}  # last frame padded with silence
        assert h.marks() == ["g0.u1.s0"]
        utterance = h.session.utterances[0]
        assert utterance.status is SpeechStatus.SPEAKING
        h.transport.push(echo("g0.u1.s0"))
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.PLAYED
    assert h.types() == [
        "call.started",
        "speech.started",
        "speech.heard",
        "speech.done",
        "call.stopped",
    ]
    started = h.events[1]
    assert started.call_sid == "CAtest" and started.stream_sid == "MZtest"
    assert h.provider.closed


async def test_say_parameter_overrides_greeting_and_sentences_get_their_own_marks() -> None:
    async with Harness() as h:
        h.transport.push(start_json(say="Your code is 4 7 1 1. Goodbye!"))
        await h.transport.wait_for(lambda ms: sum(isinstance(m, OutboundMark) for m in ms) == 2)
        assert h.provider.texts == ["Your code is 4 7 1 1.", "Goodbye!"]
        assert h.marks() == ["g0.u1.s0", "g0.u1.s1"]


async def test_clear_stops_audio_and_late_echoes_count_as_flushed() -> None:
    provider = FakeProvider(chunk=160, delay=0.01)
    async with Harness(provider, max_lead=0.06) as h:
        h.transport.push(start_json(say="One. Two. Three."))
        await h.transport.wait_for(lambda ms: sum(isinstance(m, OutboundMark) for m in ms) >= 1)
        h.transport.push(echo("g0.u1.s0"))
        await asyncio.sleep(0.05)
        utterance = h.session.utterances[0]
        stopped = await h.session.clear()
        assert stopped == [utterance]
        sent_at_clear = len(h.transport.sent)
        assert isinstance(h.transport.messages()[-1], Clear)
        # Twilio echoes the pending marks after a clear: flushed, not heard.
        for name in [n for n in h.marks() if n != "g0.u1.s0"]:
            h.transport.push(echo(name))
        await asyncio.sleep(0.1)
        assert len(h.transport.sent) == sent_at_clear  # nothing more of that utterance
        assert utterance.status is SpeechStatus.INTERRUPTED
        assert utterance.record is not None
        assert utterance.record.heard == ("One.",)
        assert "Three." in utterance.record.unheard
        assert h.provider.cleared == 1
        interrupted = [e for e in h.events if e.type == "speech.interrupted"]
        assert interrupted and interrupted[0].data["heard"] == ["One."]
        assert [e for e in h.events if e.type == "speech.heard"][0].data["text"] == "One."
        # The call goes on: a new utterance speaks with a new generation of marks.
        h.session.say("After.")
        await h.transport.wait_for(lambda ms: isinstance(ms[-1], OutboundMark))
        assert h.marks()[-1] == "g1.u2.s0"


async def test_pacing_keeps_lead_bounded() -> None:
    provider = FakeProvider(chunk=8000)  # everything at once: 1 s of audio per chunk
    async with Harness(provider, max_lead=0.1, greeting="x" * 60) as h:
        h.transport.push(start_json())
        await asyncio.sleep(0.3)
        frames = sum(
            len(m.payload) // 160 for m in h.transport.messages() if isinstance(m, OutboundMedia)
        )
        # 0.1 s burst + ~0.3 s of real-time pacing = ~20 frames; far below the 0.6 s produced.
        assert 10 <= frames <= 26


@pytest.mark.parametrize(
    "bad",
    [
        b"\x00\x01binary",
        "{not json",
        '{"event":"bogus","streamSid":"MZtest"}',
        Media(3, StreamSid("MZforeign"), "inbound", 1, 0, b"\xff").to_json(),
        '{"event":"media","streamSid":"MZtest","media":{"payload":"@@@"}}',
        "x" * 70_000,
    ],
)
async def test_bad_input_is_counted_and_the_call_goes_on(bad: str | bytes) -> None:
    async with Harness() as h:
        h.transport.push(bad)  # before start too
        h.transport.push(Media(2, SID, "inbound", 1, 0, b"\xff").to_json())  # media before start
        h.transport.push(start_json())
        h.transport.push(bad)
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        assert h.session.rejected == 3
        assert h.metrics.registry.get_sample_value("callspeak_calls_started_total") == 1


async def test_stop_ends_the_call_cancels_synthesis_and_refuses_more_speech() -> None:
    """Speech being heard when the call ends is interrupted (reason ``call-ended``, with what
    was heard); speech none of whose audio was sent is cancelled."""
    provider = FakeProvider(chunk=160, delay=0.05)
    async with Harness(provider, greeting="a long greeting " * 10) as h:
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: len(ms) >= 2)
        [greeting] = h.session.utterances
        queued = h.session.say("Never reached.")
        h.transport.push(Stop(9, SID, AccountSid("AC1"), CallSid("CAtest")).to_json())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert provider.cancelled == 1 and provider.closed
    assert greeting.status is SpeechStatus.INTERRUPTED
    assert queued.status is SpeechStatus.CANCELLED
    [event] = [e for e in h.events if e.type == "speech.interrupted"]
    assert event.data["reason"] == "call-ended" and event.data["utterance"] == greeting.id
    assert event.data["cut"] == greeting.text.strip() and event.data["cutSeconds"] > 0
    assert h.types()[-2:] == ["speech.interrupted", "call.stopped"]
    with pytest.raises(SessionClosed):
        h.session.say("too late")


async def test_tts_failure_is_reported_and_the_next_utterance_still_speaks() -> None:
    async with Harness(FakeProvider(fail_on="boom"), greeting="boom") as h:
        h.transport.push(start_json())
        await h.session.wait_started()
        [first] = h.session.utterances  # the greeting, said at start (failed ones are forgotten)
        assert await asyncio.wait_for(first.wait(), 5) is SpeechStatus.FAILED
        assert "refused" in (first.error or "")
        second = h.session.say("fine")
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        assert second.status is SpeechStatus.SPEAKING
    assert "speech.failed" in h.types()
    assert (
        h.metrics.registry.get_sample_value(
            "callspeak_tts_errors_total", {"provider": "fake", "kind": "other"}
        )
        == 1
    )


async def test_say_validates_input_and_bounds_the_queue() -> None:
    async with Harness(FakeProvider(first_delay=1.0), greeting=None) as h:
        h.transport.push(start_json())
        await h.session.wait_started()
        with pytest.raises(ValueError):
            h.session.say("   ")
        with pytest.raises(SpeechQueueFull):
            for _ in range(100):
                h.session.say("again")


async def test_hangup_after_speech_waits_for_the_last_mark() -> None:
    async with Harness() as h:
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        hangup = asyncio.create_task(h.session.hangup(after_speech=True, grace=5))
        await asyncio.sleep(0.05)
        assert not hangup.done() and h.transport.closed is None
        h.transport.push(echo("g0.u1.s0"))
        await asyncio.wait_for(hangup, 5)
        assert h.transport.closed == (1000, "hangup")


async def test_hangup_after_speech_waits_for_speech_said_while_it_waits() -> None:
    """A goodbye said while the hang-up waits (a hook answering the greeting's end, say) is
    heard too: the stream closes once no speech is left unfinished."""
    async with Harness() as h:
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        hangup = asyncio.create_task(h.session.hangup(after_speech=True, grace=5))
        await asyncio.sleep(0.01)
        goodbye = h.session.say("Goodbye.")
        h.transport.push(echo("g0.u1.s0"))
        await h.transport.wait_for(lambda ms: h.marks()[-1:] == ["g0.u2.s0"])
        await asyncio.sleep(0.05)
        assert not hangup.done() and h.transport.closed is None
        h.transport.push(echo("g0.u2.s0"))
        await asyncio.wait_for(hangup, 5)
        assert h.transport.closed == (1000, "hangup")
        assert goodbye.status is SpeechStatus.PLAYED


class MarkerDetector:
    """Barge-in stand-in: 'hears' the caller when a payload starts with 0x00."""

    def feed(self, payload: bytes) -> bool:
        return payload[:1] == b"\x00"


def caller_speaks(seq: int = 20) -> str:
    return Media(seq, SID, "inbound", seq, seq * 20, b"\x00" * 160).to_json()


async def test_barge_in_spares_non_interruptible_speech_and_keeps_it_queued() -> None:
    provider = FakeProvider(chunk=160, delay=0.01)
    async with Harness(provider, greeting=None, barge_in=MarkerDetector(), max_lead=0.1) as h:
        h.transport.push(start_json())
        await h.session.wait_started()
        legal = h.session.say("Legal notice. Please listen.", interruptible=False)
        chat = h.session.say("Some chatter.")
        after = h.session.say("More legal text.", interruptible=False)
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMedia) for m in ms))
        h.transport.push(caller_speaks())
        await asyncio.sleep(0.05)
        assert not any(isinstance(m, Clear) for m in h.transport.messages())
        assert legal.status is SpeechStatus.SPEAKING
        # Once the notice has played, the caller may interrupt the chatter, not what follows it.
        await h.transport.wait_for(lambda ms: sum(isinstance(m, OutboundMark) for m in ms) >= 2)
        for name in h.marks():
            h.transport.push(echo(name))
        assert await asyncio.wait_for(legal.wait(), 5) is SpeechStatus.PLAYED
        await h.transport.wait_for(lambda ms: isinstance(ms[-1], OutboundMedia))
        h.transport.push(caller_speaks(21))
        assert await asyncio.wait_for(chat.wait(), 5) is SpeechStatus.INTERRUPTED
        assert after.status in (SpeechStatus.QUEUED, SpeechStatus.SPEAKING)
        await h.transport.wait_for(lambda ms: h.marks()[-1].endswith("u3.s0"))
    interrupted = [e for e in h.events if e.type == "speech.interrupted"]
    # (the notice after it was still playing when the test's call ended)
    assert [(e.data["utterance"], e.data["reason"]) for e in interrupted] == [
        (chat.id, "barge-in"),
        (after.id, "call-ended"),
    ]


def wav_header(data_len: int) -> bytes:
    import struct

    fmt = struct.pack("<HHIIHH", 7, 1, 8000, 8000, 1, 8)  # μ-law, mono, 8 kHz
    return (
        b"RIFF" + struct.pack("<I", 36 + data_len) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", data_len)
    )  # fmt: skip


class WavHeadedProvider(FakeProvider):
    """A provider that forgot container=none: every text starts with a WAV header."""

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        audio = tone_for(text)
        data = wav_header(len(audio)) + audio
        for i in range(0, len(data), 333):  # odd chunks: the header splits across two
            yield data[i : i + 333]


async def test_wav_headed_odd_chunks_become_clean_frames_without_the_header() -> None:
    async with Harness(WavHeadedProvider(), greeting="Hello there.") as h:
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
    media = [m.payload for m in h.transport.messages() if isinstance(m, OutboundMedia)]
    assert all(len(p) % 160 == 0 for p in media)
    audio = b"".join(media)
    assert b"RIFF" not in audio and b"WAVE" not in audio
    assert audio.rstrip(b"\xff") == tone_for("Hello there.").rstrip(b"\xff")


async def test_a_flood_of_bad_messages_is_counted_whole_and_logged_sparingly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "callspeak.call"):
        async with Harness() as h:
            await h.start_idle()
            for _ in range(250):
                h.transport.push("{broken")
            async with asyncio.timeout(5):
                while h.session.rejected < 250:  # noqa: ASYNC110 (a count, no event to wait on)
                    await asyncio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if "ignored inbound message" in r.getMessage()]
    assert len(lines) == 5 + 2  # the first five, then the 100th and the 200th
    assert lines[-1].endswith("(200 ignored in this call so far)")
    errors = h.metrics.registry.get_sample_value(
        "callspeak_protocol_errors_total", {"reason": "malformed"}
    )
    assert errors == 250


async def test_log_lines_carry_the_call_ids(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "callspeak.call"):
        async with Harness() as h:
            h.transport.push(start_json())
            h.transport.push("{broken")
            await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
    records = [r for r in caplog.records if r.name == "callspeak.call"]
    assert any("ignored inbound message" in r.getMessage() for r in records)
    assert all(
        getattr(r, "call_sid", None) == "CAtest"
        for r in records
        if "stream" in r.getMessage() or "ignored" in r.getMessage()
    )
    assert all(
        getattr(r, "stream_sid", None) == "MZtest" for r in records if "ignored" in r.getMessage()
    )


# -- limits and admission (issue 5) -----------------------------------------------------------


async def test_say_refuses_text_over_max_text_chars_whole() -> None:
    async with Harness(max_text_chars=20) as h:
        h.transport.push(start_json())
        await h.session.wait_started()
        assert h.session.say("x" * 20).text == "x" * 20  # at the limit: fine
        with pytest.raises(TextTooLong, match="21 characters is over the 20-character limit"):
            h.session.say("y" * 21)
        assert isinstance(TextTooLong("t"), ValueError)


async def test_overlong_say_parameter_is_not_spoken_and_the_call_stays_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Harness(max_text_chars=50) as h:
        h.transport.push(start_json(say="Too long. " * 10))
        await h.session.wait_started()
        await asyncio.sleep(0.05)
        assert h.session.utterances == [] and h.audio() == b""
        assert "not speaking the opening text" in caplog.text
        assert "100 characters is over the 50-character limit" in caplog.text
        # Still a live call: later speech works.
        h.session.say("Short.")
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        assert h.transport.closed is None


async def test_idle_timeout_closes_a_stream_that_sends_nothing() -> None:
    h = Harness(idle_timeout=0.2)
    async with h:
        h.transport.push(start_json())
        async with asyncio.timeout(2):
            assert h.task is not None
            await h.task
    assert h.transport.closed == (1000, "idle timeout")
    assert h.session.closed_because == "idle timeout"
    assert h.provider.closed


async def test_a_stream_with_no_start_is_closed_whatever_else_it_sends() -> None:
    """Media alone keeps the idle timeout at bay, but without a start nothing can be served."""
    h = Harness(idle_timeout=5.0, start_timeout=0.3)
    async with h:
        h.transport.push(Connected("Connected", "1.0.0").to_json())
        for seq in range(2, 40):  # media every 20 ms, with no start before it
            h.transport.push(Media(seq, SID, "inbound", 1, 0, b"\xff" * 160).to_json())
            await asyncio.sleep(0.02)
            if h.transport.closed is not None:
                break
        async with asyncio.timeout(2):
            assert h.task is not None
            await h.task
    assert h.transport.closed == (1008, "no start")
    assert h.session.closed_because == "no start"
    assert h.transport.sent == [] and h.types() == []


async def test_a_started_stream_is_not_closed_by_the_start_timeout() -> None:
    async with Harness(start_timeout=0.1) as h:
        await h.start_idle()
        await asyncio.sleep(0.3)
        assert h.transport.closed is None and h.session.closed_because is None


async def test_inbound_media_keeps_a_stream_with_an_idle_timeout_open() -> None:
    async with Harness(idle_timeout=0.2) as h:
        h.transport.push(start_json())
        for n in range(12):  # 0.6 s of media, three idle timeouts' worth
            h.transport.push(Media(n + 2, SID, "inbound", n + 1, n * 50, b"\xff" * 160).to_json())
            await asyncio.sleep(0.05)
        assert h.transport.closed is None and h.task is not None and not h.task.done()


async def test_admission_refused_at_start_closes_with_1008_and_speaks_nothing() -> None:
    seen: list[str] = []

    def admit(start: Start) -> str | None:
        seen.append(start.call_sid)
        return "no token"

    h = Harness(admit=admit)
    async with h:
        h.transport.push(start_json())
        async with asyncio.timeout(2):
            assert h.task is not None
            await h.task
    assert seen == ["CAtest"]
    assert h.transport.closed == (1008, "no token")
    assert h.session.closed_because == "no token"
    assert h.transport.sent == [] and h.types() == []
    assert h.metrics.registry.get_sample_value("callspeak_calls_started_total") == 0


async def test_a_start_that_cannot_be_read_closes_the_stream_with_1008() -> None:
    """Without its start nothing of the stream can be served: it is closed at once, rather than
    kept open logging each media message after it as arriving 'before start'."""
    broken = json.loads(start_json())
    del broken["start"]["mediaFormat"]
    h = Harness()
    async with h:
        h.transport.push(json.dumps(broken))
        h.transport.push(Media(3, SID, "inbound", 1, 0, b"\xff" * 160).to_json())
        async with asyncio.timeout(2):
            assert h.task is not None
            await h.task
    assert h.transport.closed is not None and h.transport.closed[0] == 1008
    assert h.transport.closed[1].startswith("invalid start")
    assert h.session.closed_because == h.transport.closed[1]
    assert h.session.rejected == 1  # the start; the media after it was never read
    assert h.transport.sent == [] and h.types() == []


#: Loop iterations before the first steps of a task made with callspeak.tasks.start_task run.
TASK_STARTS_AFTER = 0 if EAGER_START else 1


async def loop_iterations_until(done: Callable[[], bool], limit: int = 10) -> int:
    """How many event-loop iterations pass before ``done()`` holds (``limit`` if never)."""
    for n in range(limit):
        if done():
            return n
        await asyncio.sleep(0)
    return limit


async def test_speech_for_an_idle_call_is_asked_for_before_the_speaker_runs() -> None:
    """say() on a call with nothing to speak starts synthesis itself: the voice is asked within
    say() (Python 3.12+) or in the next loop iteration, not after the speaker's and the
    utterance's task switches (three iterations, each tens of milliseconds on a server busy with
    hundreds of calls)."""
    provider = FakeProvider(chunk=160)
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Right away.")
        # Python 3.12+: within say() itself (the producer is an eager task); else one later.
        assert await loop_iterations_until(lambda: bool(provider.texts)) == TASK_STARTS_AFTER
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        assert h.audio()[: len(tone_for("Right away."))] == tone_for("Right away.")
        h.transport.push(echo("g0.u1.s0"))
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.PLAYED
    assert provider.texts == ["Right away."]  # asked once: the speaker took over that synthesis


async def test_clear_before_the_speaker_takes_early_speech_stops_it_unheard() -> None:
    provider = FakeProvider(chunk=160)
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Never heard.")
        assert await h.session.clear() == [utterance]
        await asyncio.sleep(0.05)
        assert utterance.status is SpeechStatus.CANCELLED  # stopped before any of it played
        # Its synthesis was cancelled before it began — or, where say() itself asks the voice
        # (Python 3.12+), right after: either way nothing of it went out.
        assert provider.texts == (["Never heard."] if EAGER_START else [])
        assert [type(m) for m in h.transport.messages()] == [Clear]
        h.session.say("Next.")  # the call goes on
        await h.transport.wait_for(lambda ms: isinstance(ms[-1], OutboundMark))
        assert h.marks() == ["g1.u2.s0"]


async def test_kept_speech_whose_early_synthesis_a_clear_dropped_is_spoken_whole() -> None:
    """A barge-in clear spares non-interruptible speech still queued, but the voice's own clear
    may drop what it was synthesising for it (one Deepgram socket per call): such speech is made
    afresh. (Once the speaker has taken it, it is speaking, and a barge-in leaves all alone.)"""
    provider = FakeProvider(chunk=160)
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        legal = h.session.say("Legal notice.", interruptible=False)
        chat = h.session.say("Chatter.")
        # Still queued; where say() itself asks the voice (Python 3.12+), synthesising.
        assert legal.status is SpeechStatus.QUEUED
        assert provider.texts == (["Legal notice."] if EAGER_START else [])
        assert await h.session.clear(only_interruptible=True) == [chat]
        assert provider.cleared == 1
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        assert provider.texts == ["Legal notice."] * (2 if EAGER_START else 1)
        assert h.marks() == ["g1.u1.s0"]
        sent = h.transport.messages()
        assert isinstance(sent[0], Clear)  # nothing of the notice went out before the clear
        assert h.audio()[: len(tone_for("Legal notice."))] == tone_for("Legal notice.")
        h.transport.push(echo("g1.u1.s0"))
        assert await asyncio.wait_for(legal.wait(), 5) is SpeechStatus.PLAYED
    assert chat.status is SpeechStatus.CANCELLED


async def test_a_call_ending_during_early_synthesis_cancels_it_and_closes_the_voice() -> None:
    provider = FakeProvider(first_delay=5.0)
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Too slow.")
        await asyncio.sleep(0.01)
        assert provider.texts == ["Too slow."]
        h.transport.push(Stop(9, SID, AccountSid("AC1"), CallSid("CAtest")).to_json())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert provider.cancelled == 1 and provider.closed
    assert utterance.status is SpeechStatus.CANCELLED


class GatedProvider(FakeProvider):
    """Yields its audio (in ``chunk``-byte pieces) only once ``gate`` is set; with
    ``later_only``, an utterance's first sentence at once and only the later ones then."""

    def __init__(self, *, later_only: bool = False, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.later_only = later_only

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        self.texts.append(text)
        if continuation or not self.later_only:
            await self.gate.wait()
        audio = tone_for(text, self.seconds_per_char)
        for i in range(0, len(audio), self.chunk):
            yield audio[i : i + self.chunk]


def media_sizes(h: Harness) -> list[int]:
    """Frames in each media message sent so far."""
    return [len(m.payload) // 160 for m in h.transport.messages() if isinstance(m, OutboundMedia)]


async def test_first_audio_goes_out_in_the_step_that_received_it() -> None:
    """The sender waits for the first audio; the producer sends it itself instead of waking
    the sender, which would take one more loop iteration."""
    provider = GatedProvider(chunk=333)
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Hello there, caller.")
        await asyncio.sleep(0.01)  # asked, and the sender waits
        assert provider.texts == ["Hello there, caller."] and media_sizes(h) == []
        provider.gate.set()
        # One iteration: the producer's own wake-up; the sender's would be a second.
        assert await loop_iterations_until(lambda: bool(media_sizes(h))) == 1
        # 333-byte chunks: two whole frames each (odd bytes carried over), until the caller
        # has 100 ms to play; the rest waits for the sender.
        assert media_sizes(h) == [2, 2, 2]
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        audio = tone_for("Hello there, caller.")
        assert h.audio()[: len(audio)] == audio  # in order, nothing lost or doubled
        assert utterance.first_audio_at is not None


async def test_a_whole_sentence_ready_at_once_goes_out_up_to_the_lead_in_that_step() -> None:
    """A voice that renders a sentence whole (Piper): all the lead allows (1 s) leaves in the
    step that received it, not one message now and one per loop iteration after — a caller
    with 100 ms to play heard a gap when twenty calls arriving together slowed iterations."""
    provider = GatedProvider(chunk=100_000, seconds_per_char=0.03)  # 1.7 s, in one chunk
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        h.session.say("A sentence of well over a second of audio, rendered whole.")
        await asyncio.sleep(0.01)
        provider.gate.set()
        assert await loop_iterations_until(lambda: bool(media_sizes(h))) == 1
        sizes = media_sizes(h)
        assert sizes == [5] * 10  # 1 s ahead (max_lead), in full messages, in that one step
        assert h.transport.writes[:1] == [10]  # and in one write (see _send_audio)


class StallingClock(InstantClock):
    """An :class:`InstantClock` whose every sleep overruns by ``stall`` seconds: a loop held up."""

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + self.stall)


async def test_a_sender_woken_late_sends_all_it_has_room_for_in_one_write() -> None:
    """The sender waiting for room wakes (a held-up loop) with room for several messages: they
    go in one write, as the first audio does, not one by one (see _send_audio)."""
    clock = StallingClock(0.4)
    provider = FakeProvider(chunk=80_000)  # 2 s of greeting at once
    async with Harness(provider, greeting="x" * 200, max_lead=1.0, clock=clock) as h:
        h.transport.clock = clock
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
    assert h.transport.writes[0] == 10  # the first second, at once (the sender was waiting)
    # Then each wake finds 0.4 s more played than it waited for: room for five messages.
    assert h.transport.writes[1:3] == [5, 5]
    assert media_sizes(h)[:20] == [5] * 20
    # Nothing sent past max_lead for all that: each write's audio fits in what had played.
    play_end = 0.0
    for at, m in zip(h.transport.sent_at, h.transport.messages(), strict=True):
        if isinstance(m, OutboundMedia):
            play_end = max(play_end, at) + len(m.payload) / 8000
            assert play_end - at <= 1.0 + 1e-9


async def test_a_late_wake_at_a_sentences_end_sends_no_empty_message_before_its_mark() -> None:
    """Woken late with room for more, the sender finds the sentence's last frames fill a
    message exactly and its end comes next: the burst ends there, then the mark — no message
    begun for frames that belong to the next sentence (it went out empty)."""
    clock = StallingClock(0.6)
    provider = FakeProvider(chunk=80_000)
    greeting = "x" * 149 + ". " + "y" * 99 + "."  # 1.5 s, then 1 s: whole messages each
    async with Harness(provider, greeting=greeting, max_lead=1.0, clock=clock) as h:
        h.transport.clock = clock
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: len(h.marks()) == 2)
    kinds = []
    for m in h.transport.messages():
        if isinstance(m, OutboundMedia):
            assert len(m.payload) == 800
            kinds.append("media")
        elif isinstance(m, OutboundMark):
            kinds.append(m.name)
    assert kinds == ["media"] * 15 + ["g0.u1.s0"] + ["media"] * 10 + ["g0.u1.s1"]


async def test_audio_sent_straight_away_stops_once_the_caller_has_a_message_to_play() -> None:
    provider = GatedProvider(chunk=320)  # two frames a chunk, all at once
    async with Harness(provider, greeting="x" * 150) as h:  # 1.5 s of audio
        h.transport.push(start_json())
        await asyncio.sleep(0.01)
        provider.gate.set()
        await h.transport.wait_for(lambda ms: len(ms) >= 8)
        sizes = media_sizes(h)
        # 40, 80, 120 ms ahead: then the lead holds a message's worth (100 ms), and the
        # sender takes over with full messages of five frames.
        assert sizes[:3] == [2, 2, 2]
        assert sizes[3:7] == [5, 5, 5, 5]


async def test_the_voice_warms_up_as_the_stream_opens_before_start() -> None:
    provider = FakeProvider()
    async with Harness(provider) as h:
        await asyncio.sleep(0)  # run() has begun; connected is not even read yet
        assert provider.warmed == 1 and h.session.start is None
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
    assert provider.warmed == 1


async def test_a_socket_closed_under_the_producers_own_send_ends_the_call_cleanly() -> None:
    """The producer sends the first audio itself (the sender is idle): if the socket has
    closed by then, the utterance ends as "the call ended" and the call shuts down as usual."""
    provider = GatedProvider(chunk=333)
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Hello there, caller.")
        await asyncio.sleep(0.01)  # asked; the sender waits
        await h.session.hangup()  # the application hangs up while the voice synthesises...
        provider.gate.set()  # ...and the first audio arrives
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)  # run() ends without raising
    assert utterance.status is SpeechStatus.CANCELLED and utterance.error == "the call ended"
    assert provider.closed and h.types()[-1] == "call.stopped"


class SlowToStop(FakeProvider):
    """Never yields; when cancelled it takes a while to wind down (like a socket's Clear)."""

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        self.texts.append(text)
        try:
            await asyncio.sleep(10)
            yield b""
        finally:
            await asyncio.sleep(0.2)


async def test_a_call_ending_while_a_task_waits_in_clear_still_ends() -> None:
    """The call's end cancels a task that is inside clear(), waiting for synthesis to wind
    down: that cancellation reaches it (not swallowed), and run() returns."""
    async with Harness(SlowToStop(), greeting=None) as h:
        await h.start_idle()
        h.session.say("Welcome.")  # an early synthesis starts
        await asyncio.sleep(0.01)
        clearing = asyncio.Event()

        async def clear_it() -> None:
            clearing.set()
            await h.session.clear()
            await asyncio.Event().wait()  # reached only if clear() swallowed the cancellation

        h.session.spawn(clear_it(), name="app-clear")
        await asyncio.wait_for(clearing.wait(), 5)
        await asyncio.sleep(0.01)  # inside clear(), waiting for the synthesis to end
        h.transport.push(Stop(9, SID, AccountSid("AC1"), CallSid("CAtest")).to_json())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)


class NoWarmUpProvider(FakeProvider):
    """A voice written before warm_up existed (the method is optional)."""

    warm_up = None  # type: ignore[assignment]


async def test_a_voice_without_warm_up_still_speaks() -> None:
    async with Harness(NoWarmUpProvider(chunk=160)) as h:
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))


async def test_a_stream_that_admission_judges_warms_up_only_once_admitted() -> None:
    refused = FakeProvider()
    async with Harness(refused, admit=lambda start: "no token") as h:
        await asyncio.sleep(0.01)
        assert refused.warmed == 0  # not before admission
        h.transport.push(start_json())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert refused.warmed == 0 and h.transport.closed == (1008, "no token")
    admitted = FakeProvider()
    async with Harness(admitted, admit=lambda start: None) as h:
        await asyncio.sleep(0.01)
        assert admitted.warmed == 0
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        assert admitted.warmed == 1


class SlowClearTransport(FakeTransport):
    """A socket whose ``clear`` message waits (a paused write) until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def send(self, text: str) -> None:
        if '"event":"clear"' in text.replace(" ", ""):
            await self.release.wait()
        await super().send(text)


async def test_speech_queued_during_a_clear_is_not_synthesised_until_it_ends() -> None:
    """The voice's own clear comes last in clear(); an early synthesis started before it would
    be cut short by it, and its sentence reported heard with no audio."""
    provider = FakeProvider(chunk=160, delay=0.01)
    async with Harness(provider, greeting=None) as h:
        slow = SlowClearTransport()
        h.transport = slow
        h.session._transport = slow  # the harness's run() has not read anything yet
        await h.start_idle()
        first = h.session.say("First words.")
        await slow.wait_for(lambda ms: any(isinstance(m, OutboundMedia) for m in ms))
        clearing = asyncio.create_task(h.session.clear())
        await asyncio.sleep(0.01)  # clear() waits for its message to go out
        second = h.session.say("Second words.")
        await asyncio.sleep(0.01)
        assert provider.texts == ["First words."]  # not asked yet
        slow.release.set()
        assert await asyncio.wait_for(clearing, 5) == [first]
        await slow.wait_for(lambda ms: isinstance(ms[-1], OutboundMark))
        assert provider.texts == ["First words.", "Second words."]
        audio = tone_for("Second words.")
        assert h.audio()[-len(audio) - 160 :].find(audio) >= 0  # its audio, whole, before its mark
        slow.push(echo(h.marks()[-1]))
        assert await asyncio.wait_for(second.wait(), 5) is SpeechStatus.PLAYED


async def test_speech_said_while_a_clear_is_under_way_follows_the_speech_it_kept() -> None:
    """Kept (non-interruptible) speech stays ahead in the queue: text said while the clear
    waits for the stopped speech to end is spoken after it, as it was said after it."""
    provider = FakeProvider(chunk=160, delay=0.01)
    async with Harness(provider, greeting=None, max_lead=0.1) as h:
        await h.start_idle()
        chat = h.session.say("Some chatter that goes on.")
        legal = h.session.say("Legal notice.", interruptible=False)
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMedia) for m in ms))
        clearing = asyncio.create_task(h.session.clear(only_interruptible=True))
        await asyncio.sleep(0)  # the clear now waits for the chatter's synthesis to end
        assert chat.status is SpeechStatus.SPEAKING
        later = h.session.say("Said during the clear.")
        assert await clearing == [chat]
        await h.transport.wait_for(lambda ms: sum(isinstance(m, OutboundMark) for m in ms) >= 2)
        assert provider.texts[1:] == ["Legal notice.", "Said during the clear."]
        assert [m.rpartition(".")[0] for m in h.marks()] == ["g1.u2", "g1.u3"]
        sent = h.transport.messages()
        clear_at = next(i for i, m in enumerate(sent) if isinstance(m, Clear))
        legal_audio = tone_for("Legal notice.")
        after_clear = b"".join(m.payload for m in sent[clear_at:] if isinstance(m, OutboundMedia))
        assert after_clear.startswith(legal_audio)  # none of it went out before the clear
        assert legal.status is SpeechStatus.SPEAKING and later.status is SpeechStatus.SPEAKING


class StallingProvider(FakeProvider):
    """A FakeProvider whose synthesis of a text containing ``stall_on`` never gets going, and
    whose streams, abandoned, take ``wind_down`` seconds to end (as Deepgram's, which sends a
    Clear then)."""

    def __init__(self, *, stall_on: str = "", wind_down: float = 0.0, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.stall_on = stall_on
        self.wind_down = wind_down

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        try:
            if self.stall_on and self.stall_on in text:
                self.texts.append(text)
                await asyncio.Event().wait()
            async for chunk in super().stream(text, continuation=continuation, ahead=ahead):
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            await asyncio.sleep(self.wind_down)
            raise


async def test_speech_heard_whole_while_a_clear_waits_ends_played_and_is_not_stopped() -> None:
    """clear() first waits for the synthesis it cancels to wind down; the last mark of earlier
    speech may echo meanwhile. That speech was heard whole: it ends once, as played — not also
    reported interrupted, nor among the utterances the clear stopped."""
    provider = StallingProvider(stall_on="Second", wind_down=0.05)
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        first = h.session.say("First.")
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        second = h.session.say("Second.")
        await asyncio.sleep(0.01)
        assert h.session.speaking is second  # its synthesis stalls; "First." is still playing
        clearing = asyncio.create_task(h.session.clear())
        await asyncio.sleep(0.01)  # clear() waits for that synthesis to wind down
        h.transport.push(echo("g0.u1.s0"))  # meanwhile Twilio: "First." has played
        assert await asyncio.wait_for(clearing, 5) == [second]
    assert first.status is SpeechStatus.PLAYED
    assert first.record == HeardRecord(("First.",), None, None, ())
    assert [e.type for e in h.events if e.data.get("utterance") == first.id] == [
        "speech.started",
        "speech.heard",
        "speech.done",
    ]
    assert second.status is SpeechStatus.CANCELLED  # none of its audio had been sent


async def test_a_synthesis_failure_a_clear_reaches_first_ends_the_speech_once() -> None:
    """Synthesis fails and a clear() comes before the speaker has woken to the failure: the
    clear ends the utterance — failed, with its voice's error, as the speaker would have — and
    the speaker does not report it a second time."""
    async with Harness(FakeProvider(fail_on="boom"), greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("boom")

        def sender_gave_up() -> bool:  # on the failure; the speaker is not woken to it yet
            task = h.session._current_task
            return task is not None and task.done()

        assert await loop_iterations_until(sender_gave_up, 100) < 100
        assert await h.session.clear() == [utterance]
        await asyncio.sleep(0.01)  # the speaker wakes to the failure
        assert utterance.status is SpeechStatus.FAILED and "refused" in (utterance.error or "")
    assert [e.type for e in h.events if e.data.get("utterance") == utterance.id] == [
        "speech.failed"
    ]


@pytest.mark.parametrize("drop_after", [2, 4, 6])
async def test_a_socket_drop_while_the_voice_winds_down_still_ends_the_call_cleanly(
    drop_after: int,
) -> None:
    """The socket drops under a send while the voice is still synthesising, and the abandoned
    stream takes a moment to end; the call's end cancels the speaker in that moment. The call
    still ends as any other: run() returns, the speech ends, the voice is closed and
    call.stopped is reported."""
    provider = StallingProvider(chunk=800, delay=0.005, wind_down=0.02)
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        h.transport.drop_after = drop_after
        utterance = h.session.say("A long greeting that goes on. " * 5)
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)  # run() ends without raising
    # some of it was sent before the drop: cut short by the call's end
    assert utterance.first_audio_at is not None
    assert utterance.status is SpeechStatus.INTERRUPTED
    assert h.types()[-2:] == ["speech.interrupted", "call.stopped"]
    assert provider.closed


@pytest.mark.parametrize("drop_after", [1, 3])
async def test_a_socket_drop_within_a_burst_counts_the_audio_written_before_it(
    drop_after: int,
) -> None:
    """A whole sentence goes out at first audio as one burst (send_all); a socket that drops
    within it (a transport writing the burst one message at a time, as through ASGI) wrote the
    messages before the drop: that audio counts as sent and the speech as started, then
    interrupted — as when each message was sent on its own."""
    provider = FakeProvider(chunk=80_000)  # 2 s at once: a burst of 10 messages
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        h.transport.drop_after = drop_after
        utterance = h.session.say("x" * 200)
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert media_sizes(h) == [5] * drop_after
    assert utterance.sent_seconds[0] == pytest.approx(0.1 * drop_after)
    assert h.session.frames_sent == 5 * drop_after
    assert utterance.first_audio_at is not None
    assert utterance.status is SpeechStatus.INTERRUPTED
    assert h.types()[-3:] == ["speech.started", "speech.interrupted", "call.stopped"]


async def test_the_asgi_transport_reports_how_many_of_a_burst_it_wrote_before_a_drop() -> None:
    """Through ASGI a burst is sent one message at a time: the TransportClosed it raises says
    how many went out, for the session to count (see the test above)."""
    from starlette.websockets import WebSocketDisconnect

    from callspeak.server import StarletteTransport

    class DroppingSocket:
        def __init__(self) -> None:
            self.sent: list[str] = []

        async def send_text(self, text: str) -> None:
            if len(self.sent) == 2:
                raise WebSocketDisconnect(1006)
            self.sent.append(text)

    socket = DroppingSocket()
    transport = StarletteTransport(socket)  # type: ignore[arg-type]
    with pytest.raises(TransportClosed) as raised:
        await transport.send_all(["a", "b", "c", "d"])
    assert raised.value.sent == 2 and socket.sent == ["a", "b"]
    with pytest.raises(TransportClosed) as again:
        await transport.send_all(["e"])
    assert again.value.sent == 0


@pytest.mark.parametrize("max_lead", [0.04, 0.06, 0.08, 1.0])
async def test_audio_ready_in_time_plays_without_gaps_at_any_lead_allowed(
    max_lead: float,
) -> None:
    """The sender waits for room for a whole message (100 ms) only if max_lead can hold one:
    under it (max_lead_ms may be as low as 40) room for five frames never comes, and waiting
    for it let the caller's buffer run dry before every message."""
    clock = InstantClock()
    provider = FakeProvider(chunk=80_000)  # all 2 s of audio at once
    async with Harness(provider, greeting="x" * 200, max_lead=max_lead, clock=clock) as h:
        h.transport.clock = clock
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
    sent = [
        (at, len(m.payload) / 8000)
        for m, at in zip(h.transport.messages(), h.transport.sent_at, strict=True)
        if isinstance(m, OutboundMedia)
    ]
    play_end, silence = sent[0][0], 0.0
    for at, seconds in sent:
        silence += max(0.0, at - play_end)
        play_end = max(play_end, at) + seconds
        assert play_end - at <= max_lead + 1e-9  # and never further ahead than max_lead
    assert silence < 1e-9
    assert play_end - sent[0][0] >= 2.0


async def test_a_sentence_none_of_whose_audio_was_sent_is_unheard_not_cut() -> None:
    """The echo of a sentence's mark is when the next starts playing — if some of its audio has
    been sent; one still being synthesised starts when its audio goes out. A clear before then
    leaves it unheard, not cut with nothing of it heard."""
    provider = StallingProvider(stall_on="Two")
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("One. Two.")
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        h.transport.push(echo("g0.u1.s0"))
        await asyncio.sleep(0.05)
        assert isinstance(h.transport.messages()[-1], OutboundMark)  # nothing of "Two." sent
        assert await h.session.clear() == [utterance]
    assert utterance.status is SpeechStatus.INTERRUPTED
    assert utterance.record == HeardRecord(("One.",), None, None, ("Two.",))
    interrupted = next(e for e in h.events if e.type == "speech.interrupted")
    assert interrupted.data["cut"] is None and interrupted.data["unheard"] == ["Two."]


class CuttingVoice(FakeProvider):
    """One socket per call, like Deepgram: its clear() drops the rest of what it synthesises."""

    def __init__(self) -> None:
        super().__init__(chunk=160)
        self.clears = 0
        self.cut: list[str] = []

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        self.texts.append(text)
        clears = self.clears
        audio = tone_for(text)
        for i in range(0, len(audio), self.chunk):
            await asyncio.sleep(0.001)
            if self.clears != clears:
                self.cut.append(text)
                return
            yield audio[i : i + self.chunk]

    async def clear(self) -> None:
        await asyncio.sleep(0.005)  # a round trip
        self.clears += 1


async def test_a_barge_in_as_the_speaker_takes_kept_speech_leaves_it_whole() -> None:
    """Non-interruptible speech counts as speaking from when the speaker takes it, not from its
    task's first step: a barge-in in between leaves all speech alone, as it would a moment
    later, rather than clear the voice while the kept speech begins synthesising."""
    provider = CuttingVoice()
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        chat = h.session.say("Chat.")
        legal = h.session.say("Legal notice that must be heard.", interruptible=False)
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        assert await loop_iterations_until(lambda: h.session.speaking is legal) < 10
        assert provider.texts == ["Chat."]  # the notice's synthesis has not begun
        stopped = await h.session.clear(only_interruptible=True, reason="barge-in")
        await h.transport.wait_for(lambda ms: sum(isinstance(m, OutboundMark) for m in ms) == 2)
        assert provider.cut == [] and tone_for(legal.text) in h.audio()
        assert stopped == [] and provider.clears == 0
        assert h.marks() == ["g0.u1.s0", "g0.u2.s0"]
        assert chat.status is SpeechStatus.SPEAKING  # still playing: its mark has not echoed


async def test_failed_speech_is_forgotten_like_finished_speech() -> None:
    """The call keeps only unfinished utterances: a long call must not grow with failures."""
    async with Harness(FakeProvider(fail_on="boom"), greeting=None) as h:
        await h.start_idle()
        for _ in range(3):
            utterance = h.session.say("boom")
            assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.FAILED
        assert h.session.utterances == []


class UndecodableFirstVoice(FakeProvider):
    """Its first stream is a WAV header the converter refuses (two channels): a WavError, not a
    TTSError, raised inside the session's producer."""

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        self.texts.append(text)
        if len(self.texts) == 1:
            fmt = struct.pack("<HHIIHH", 1, 2, 8000, 32000, 4, 16)  # PCM, 2 channels
            header = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt "
            header += struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF)
            yield header + b"\x00" * 640
            return
        yield tone_for(text)


async def test_a_voice_failing_with_an_unexpected_error_fails_that_speech_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any error in synthesis or conversion, not only a TTSError, ends its utterance as failed
    and the call goes on: the sender must not wait forever for frames that will not come."""
    async with Harness(UndecodableFirstVoice(), greeting="Hello there.") as h:
        h.transport.push(start_json())
        await h.session.wait_started()
        greeting = next(iter(h.session.utterances))
        assert await asyncio.wait_for(greeting.wait(), 3) is SpeechStatus.FAILED
        assert "internal error: WavError" in (greeting.error or "")
        after = h.session.say("Second utterance.")
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        assert h.marks() == [f"g0.u{after.id}.s0"]
    assert "speech.failed" in h.types()
    assert "synthesising utterance 1 failed" in caplog.text


async def test_protocol_error_labels_never_carry_text_from_the_message() -> None:
    """Each distinct label is a time series kept for good: an event name or size a caller
    invents must not make a new one."""
    async with Harness(greeting=None, max_message_bytes=2000) as h:
        await h.start_idle()
        for n in range(20):
            h.transport.push(f'{{"event": "made-up-{n}", "streamSid": "MZtest"}}')
            h.transport.push("x" * (2001 + n))
        h.transport.push("{not json")
        h.transport.push(Mark(30, SID, "never-sent").to_json())
        await asyncio.sleep(0.05)
        assert h.session.rejected == 42
    samples = protocol_error_counts(h.metrics)
    assert sorted(samples) == [
        ("malformed", 1.0),
        ("mark", 1.0),
        ("too_large", 20.0),
        ("unknown_event", 20.0),
    ]


async def test_one_sentence_every_voice_failed_ends_failed_not_heard() -> None:
    """The caller heard the apology, not the sentence: it must not be reported heard (an
    application would believe "Your appointment is confirmed." was), and it ends failed."""
    chain = every_voice_fails(b"\x01" * 1600)
    async with Harness(chain.open(), greeting=None) as h:  # type: ignore[arg-type]
        await h.start_idle()
        utterance = h.session.say("One sentence.")
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.FAILED
        assert "heard the apology" in (utterance.error or "")
        assert h.audio() == b"\x01" * 1600 and h.marks() == ["g0.u1.s0"]
        h.transport.push(echo("g0.u1.s0"))  # the apology has played
        await asyncio.sleep(0.05)
        assert utterance.record is not None and utterance.record.heard == ()
    assert "speech.heard" not in h.types() and "speech.done" not in h.types()
    assert "speech.failed" in h.types()


async def test_an_utterance_every_voice_failed_hears_the_apology_once_and_ends_failed() -> None:
    """Its later sentences are not spoken — and not reported heard either."""
    chain = every_voice_fails(b"\x01" * 1600)
    async with Harness(chain.open(), greeting=None) as h:  # type: ignore[arg-type]
        await h.start_idle()
        utterance = h.session.say("One sentence. Another one. The last sentence.")
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.FAILED
        assert h.audio() == b"\x01" * 1600 and h.marks() == ["g0.u1.s0"]
    assert "speech.heard" not in h.types() and "speech.failed" in h.types()


class YieldingClear(FakeProvider):
    """A voice whose clear() yields to the loop, as Deepgram's WebSocket (it writes a Clear)."""

    async def clear(self) -> None:
        await asyncio.sleep(0)
        await super().clear()


async def test_text_said_right_after_a_clear_that_kept_speech_is_not_synthesised_early() -> None:
    """The speaker holds the kept speech while the clear finishes: text said then comes after
    it, so asking the voice for it early would only be thrown away (a wasted request; with
    Deepgram's WebSocket, one of its 20 flushes a minute)."""
    provider = YieldingClear(chunk=160, delay=0.01)
    async with Harness(provider, greeting=None, max_lead=0.1) as h:
        await h.start_idle()
        h.session.say("Some chatter that goes on.")
        legal = h.session.say("Legal notice.", interruptible=False)
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMedia) for m in ms))
        await h.session.clear(only_interruptible=True)
        answer = h.session.say("How can I help?")  # a hook answering the barge-in at once
        await h.transport.wait_for(lambda ms: sum(isinstance(m, OutboundMark) for m in ms) >= 2)
        assert provider.texts == ["Some chatter that goes on.", "Legal notice.", "How can I help?"]
        assert provider.cancelled == 1  # the chatter's only
        assert legal.status is SpeechStatus.SPEAKING and answer.status is SpeechStatus.SPEAKING


async def test_a_task_that_ignores_its_cancellation_does_not_keep_the_call_from_ending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hook swallowing CancelledError: the call still ends, closes its voice and says so."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # a bug in an application's handler

    async with Harness(greeting=None) as h:
        await h.start_idle()
        h.session.task_grace = 0.1
        h.session.spawn(stubborn(), name="stubborn-hook")
        h.transport.push(Stop(9, SID, AccountSid("AC1"), CallSid("CAtest")).to_json())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert h.provider.closed and h.types()[-1] == "call.stopped"
    assert "task stubborn-hook of the call did not end within 0.1 s" in caplog.text
    release.set()


class FailsToClose(FakeProvider):
    async def aclose(self) -> None:
        raise RuntimeError("a bug in a voice")


async def test_a_voice_failing_to_close_still_lets_the_call_end_and_say_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Harness(FailsToClose(), greeting=None) as h:
        await h.start_idle()
        h.transport.push(Stop(9, SID, AccountSid("AC1"), CallSid("CAtest")).to_json())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert h.types()[-1] == "call.stopped"
    assert "closing the voice failed" in caplog.text


class FailsMidSentence(FakeProvider):
    """Sentences with "cut" in them yield 60 ms of audio, then fail (every voice down)."""

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        if "cut" not in text:
            async for chunk in super().stream(text, continuation=continuation, ahead=ahead):
                yield chunk
            return
        self.texts.append(text)
        yield tone_for(text)[:480]
        raise TTSError("fake", "cut mid-sentence", retryable=False)


async def test_hangup_after_speech_waits_for_what_failed_speech_sent() -> None:
    """Speech fails at once, but what it sent before failing is still in Twilio's buffer: the
    audio cut short gets a mark of its own, and hangup(after_speech) waits for it to play."""
    async with Harness(FailsMidSentence(chunk=160), greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Hello there. Then cut short.")
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.FAILED
        assert h.marks() == ["g0.u1.s0", "g0.u1.s1"]  # the second after the cut audio
        hanging = asyncio.create_task(h.session.hangup(after_speech=True, grace=5))
        h.transport.push(echo("g0.u1.s0"))
        await asyncio.sleep(0.05)
        assert h.transport.closed is None  # the cut sentence is still playing
        h.transport.push(echo("g0.u1.s1", 11))
        await asyncio.wait_for(hanging, 5)
        assert h.transport.closed == (1000, "hangup")


async def test_sentences_of_failed_speech_heard_after_the_failure_are_reported_heard() -> None:
    """A sentence sent whole before the voice failed still plays after the failure: its mark's
    echo reports it heard, in the events and the record; the sentence cut is not."""
    async with Harness(FailsMidSentence(chunk=160), greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Hello there. Then cut short.")
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.FAILED
        assert utterance.record == HeardRecord((), None, None, ("Hello there.", "Then cut short."))
        h.transport.push(echo("g0.u1.s0"))
        h.transport.push(echo("g0.u1.s1", 11))  # the cut sentence's audio, played
        await h.session.hangup(after_speech=True, grace=5)  # returns once both have echoed
    assert utterance.record == HeardRecord(("Hello there.",), None, None, ("Then cut short.",))
    heard = [e.data for e in h.events if e.type == "speech.heard"]
    assert heard == [{"utterance": 1, "sentence": 0, "text": "Hello there."}]


async def test_hangup_after_speech_lets_the_apology_play() -> None:
    chain = every_voice_fails(b"\x01" * 1600)
    async with Harness(chain.open(), greeting=None) as h:  # type: ignore[arg-type]
        await h.start_idle()
        utterance = h.session.say("One sentence. Another one.")
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.FAILED
        assert h.marks() == ["g0.u1.s0"]  # after the apology
        hanging = asyncio.create_task(h.session.hangup(after_speech=True, grace=5))
        await asyncio.sleep(0.05)
        assert h.transport.closed is None
        h.transport.push(echo("g0.u1.s0"))
        await asyncio.wait_for(hanging, 5)
        assert h.transport.closed == (1000, "hangup")


async def test_clear_stops_what_failed_speech_sent() -> None:
    async with Harness(FailsMidSentence(chunk=160), greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Hello there. Then cut short.")
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.FAILED
        assert await h.session.clear() == []  # nothing unfinished to report stopped...
        assert isinstance(h.transport.messages()[-1], Clear)  # ...but its audio is
        assert utterance.status is SpeechStatus.FAILED
        await asyncio.wait_for(h.session.hangup(after_speech=True, grace=5), 1)  # (dropped)


async def test_barge_in_spares_what_failed_non_interruptible_speech_sent() -> None:
    """A notice that may not be interrupted fails after sending some of itself; the chatter
    after it starts. The caller speaking while the notice's audio still plays cuts neither;
    once it has played, the chatter may be interrupted."""
    provider = FailsMidSentence(chunk=160)
    async with Harness(provider, greeting=None, barge_in=MarkerDetector(), max_lead=1.0) as h:
        await h.start_idle()
        notice = h.session.say("Legal notice. Then cut short.", interruptible=False)
        chat = h.session.say("Some chatter.")
        assert await asyncio.wait_for(notice.wait(), 5) is SpeechStatus.FAILED
        await h.transport.wait_for(lambda ms: h.marks()[-1] == f"g0.u{chat.id}.s0")
        h.transport.push(caller_speaks())
        await asyncio.sleep(0.05)
        assert not any(isinstance(m, Clear) for m in h.transport.messages())
        assert chat.status is SpeechStatus.SPEAKING
        for seq, name in enumerate(h.marks()[:2]):  # the notice has played
            h.transport.push(echo(name, 10 + seq))
        h.transport.push(caller_speaks(21))
        assert await asyncio.wait_for(chat.wait(), 5) is SpeechStatus.INTERRUPTED
        assert isinstance(h.transport.messages()[-1], Clear)


async def test_hangup_after_speech_returns_when_the_call_ends_while_failed_speech_plays() -> None:
    """hangup(after_speech) waits for what failed speech sent; the call ending meanwhile (the
    caller hung up) ends that wait at once, not after the grace."""
    async with Harness(FailsMidSentence(chunk=160), greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Hello there. Then cut short.")
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.FAILED
        hanging = asyncio.create_task(h.session.hangup(after_speech=True, grace=30))
        await asyncio.sleep(0.05)
        h.transport.push(Stop(9, SID, AccountSid("AC1"), CallSid("CAtest")).to_json())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
        await asyncio.wait_for(hanging, 1)


async def test_speech_whose_mark_after_the_apology_meets_a_closed_socket_still_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class MarkMeetsClosedSocket(Harness.transport_class):  # type: ignore[name-defined,misc]
        async def send(self, text: str) -> None:
            if '"mark"' in text:
                await self.close(1006, "dropped")
            await super().send(text)

    monkeypatch.setattr(Harness, "transport_class", MarkMeetsClosedSocket)
    chain = every_voice_fails(b"\x01" * 1600)
    async with Harness(chain.open(), greeting=None) as h:  # type: ignore[arg-type]
        await h.start_idle()
        utterance = h.session.say("One sentence.")
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert utterance.status is SpeechStatus.FAILED and "apology" in (utterance.error or "")
    assert utterance.record == HeardRecord((), None, None, ("One sentence.",))
    assert "speech.failed" in h.types() and "speech.interrupted" not in h.types()


async def test_the_call_ending_while_the_apology_plays_reports_the_speech_failed() -> None:
    """The caller heard (part of) the apology, not the text: nothing of it is reported cut."""
    chain = every_voice_fails(b"\x01" * 24000)
    async with Harness(chain.open(), greeting=None, max_lead=0.1) as h:  # type: ignore[arg-type]
        await h.start_idle()
        utterance = h.session.say("Your appointment is confirmed.")
        await h.transport.wait_for(lambda ms: len(h.audio()) >= 1600)  # the apology plays
        h.transport.push(Stop(9, SID, AccountSid("AC1"), CallSid("CAtest")).to_json())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert utterance.status is SpeechStatus.FAILED
    assert utterance.record == HeardRecord((), None, None, ("Your appointment is confirmed.",))
    assert "speech.failed" in h.types() and "speech.interrupted" not in h.types()


async def test_a_clear_during_the_apology_leaves_the_speech_failed_with_no_sentence_cut() -> None:
    """The caller heard part of the apology, not the text: the speech failed (its voices' error
    kept), whether the clear or the end of the apology comes first."""
    chain = every_voice_fails(b"\x01" * 24000)
    async with Harness(chain.open(), greeting=None, max_lead=0.1) as h:  # type: ignore[arg-type]
        await h.start_idle()
        utterance = h.session.say("Your appointment is confirmed.")
        await h.transport.wait_for(lambda ms: len(h.audio()) >= 1600)
        assert await h.session.clear() == [utterance]
        assert isinstance(h.transport.messages()[-1], Clear)
    assert utterance.status is SpeechStatus.FAILED and "apology" in (utterance.error or "")
    assert utterance.record == HeardRecord((), None, None, ("Your appointment is confirmed.",))
    [failed] = [e for e in h.events if e.type == "speech.failed"]
    assert failed.data == {"utterance": utterance.id, "error": utterance.error}
    assert "speech.interrupted" not in h.types()


async def test_a_clear_that_finds_the_call_closed_ends_heard_speech_as_the_call_end_does() -> None:
    provider = FakeProvider(chunk=160, delay=0.02)
    async with Harness(provider, greeting=None, max_lead=0.2) as h:
        await h.start_idle()
        utterance = h.session.say("A long sentence that keeps going for a good while now.")
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMedia) for m in ms))
        await h.session.hangup()  # the API's hangup...
        assert await h.session.clear() == [utterance]  # ...and a clear arriving meanwhile
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert utterance.status is SpeechStatus.INTERRUPTED
    [event] = [e for e in h.events if e.type == "speech.interrupted"]
    assert event.data["reason"] == "call-ended"


class RefusesFirstAtOnce(FakeProvider):
    """Refuses its first text at once, before any await (refused credentials not yet due for a
    re-check, say), then speaks."""

    refused = False

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        if not self.refused:
            self.refused = True
            raise TTSError("fake", "refused once", retryable=True)
        async for chunk in super().stream(text, continuation=continuation, ahead=ahead):
            yield chunk


async def test_speech_made_afresh_after_its_early_synthesis_failed_is_not_reported_failed() -> None:
    """On 3.12 the early synthesis starts inside say() and may fail at once; a clear that keeps
    the (non-interruptible) speech drops it, and the speech is made afresh and plays. That old
    failure must not make it end failed when the call ends while it plays."""
    if not EAGER_START:
        pytest.skip("the early synthesis starts inside say() on Python 3.12+ only")
    provider = RefusesFirstAtOnce(chunk=160, delay=0.02)
    async with Harness(provider, greeting=None, max_lead=0.2) as h:
        await h.start_idle()
        notice = h.session.say("A notice that goes on for quite a while.", interruptible=False)
        chat = h.session.say("Chatter.")
        assert await h.session.clear(only_interruptible=True) == [chat]
        await h.transport.wait_for(lambda ms: len(h.audio()) >= 1600)  # the notice plays
        assert notice.error is None and notice.to_dict().get("error") is None
        h.transport.push(Stop(9, SID, AccountSid("AC1"), CallSid("CAtest")).to_json())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert notice.status is SpeechStatus.INTERRUPTED and "speech.failed" not in h.types()


class LimitedVoice(FakeProvider):
    """A voice that asks for texts of at least 20 characters (as the WebSocket voice asks for
    48: its 20 flushes a minute)."""

    stream_min_chars = 20


async def test_a_voice_limited_in_texts_a_minute_is_given_short_sentences_grouped() -> None:
    provider = LimitedVoice()
    async with Harness(provider, greeting=None) as h:
        await h.start_idle()
        utterance = h.session.say("Yes. Okay. Let me check that. One moment, please. Bye.")
        assert utterance.sentences == ("Yes. Okay. Let me check that.", "One moment, please. Bye.")
        await h.transport.wait_for(lambda ms: len(h.marks()) == 2)
        for seq, name in enumerate(h.marks()):
            h.transport.push(echo(name, 10 + seq))
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.PLAYED
    assert provider.texts == ["Yes. Okay. Let me check that.", "One moment, please. Bye."]
    heard = [e.data["text"] for e in h.events if e.type == "speech.heard"]
    assert heard == ["Yes. Okay. Let me check that.", "One moment, please. Bye."]


async def test_speech_after_a_clear_goes_out_at_once_not_after_the_audio_it_dropped() -> None:
    """A clear empties Twilio's buffer: the next utterance's first audio goes out at once, not
    after waiting for the second of cleared audio the pacer would otherwise still count."""
    clock = InstantClock()  # moves only when the sender waits for the pacer
    provider = FakeProvider(chunk=80_000)  # 2 s of greeting at once
    async with Harness(provider, greeting="x" * 200, max_lead=1.0, clock=clock) as h:
        h.transport.clock = clock
        h.transport.push(start_json())
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        cleared_at = clock.now()
        assert h.transport.sent_at[0] <= cleared_at - 0.9  # a second of it still unplayed
        await h.session.clear()
        after = h.session.say("Next.")
        await h.transport.wait_for(lambda ms: isinstance(ms[-1], OutboundMark))
    sent = h.transport.messages()
    first = next(
        i for i in range(sent.index(Clear(SID)), len(sent)) if isinstance(sent[i], OutboundMedia)
    )
    assert h.transport.sent_at[first] == cleared_at
    assert after.play_starts == [cleared_at]


async def test_an_interrupt_digit_spares_speech_that_is_not_interruptible() -> None:
    """A key in interrupt_digits stops speech as barge-in does: only interruptible speech.
    A legal notice said with interruptible=False plays on, and no clear is sent."""
    async with Harness(greeting=None, interrupt_digits="#") as h:
        await h.start_idle()
        notice = h.session.say("Legal notice.", interruptible=False)
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        h.transport.push(Dtmf(5, SID, "inbound_track", "#").to_json())
        h.transport.push(echo("g0.u1.s0"))
        assert await asyncio.wait_for(notice.wait(), 5) is SpeechStatus.PLAYED
    assert not any(isinstance(m, Clear) for m in h.transport.messages())
    assert "dtmf" in h.types() and "speech.interrupted" not in h.types()


async def test_a_sentence_whose_audio_came_late_is_cut_at_what_played_of_it() -> None:
    """The previous mark's echo starts the next sentence only if some of its audio was sent:
    audio that comes 2 s later starts playing then, and a clear 0.5 s after that reports
    0.5 s of it heard, not 2.5 s (all of it)."""
    clock = InstantClock()
    provider = GatedProvider(later_only=True, seconds_per_char=0.2)  # 0.8 s a sentence
    async with Harness(provider, greeting=None, clock=clock) as h:
        await h.start_idle()
        utterance = h.session.say("One. Two.")
        await h.transport.wait_for(lambda ms: len(h.marks()) == 1)
        h.transport.push(echo("g0.u1.s0"))
        await asyncio.sleep(0.01)
        assert utterance.heard_count == 1
        clock.t += 2.0
        provider.gate.set()  # "Two." arrives, and goes out
        await h.transport.wait_for(lambda ms: len(h.marks()) == 2)
        clock.t += 0.5
        assert await h.session.clear() == [utterance]
    assert utterance.record == HeardRecord(("One.",), "Two.", pytest.approx(0.5), ())
    interrupted = next(e for e in h.events if e.type == "speech.interrupted")
    assert interrupted.data["cutSeconds"] == pytest.approx(0.5)


async def test_the_message_size_limit_counts_bytes_not_characters() -> None:
    """``max_message_bytes`` is a limit in bytes (the socket's own limit is too): a message of
    non-ASCII text is over it with fewer characters than that."""
    async with Harness(greeting=None, max_message_bytes=2000) as h:
        await h.start_idle()
        message = Mark(30, SID, "é" * 1000).to_json().replace("\\u00e9", "é")
        assert len(message) < 2000 < len(message.encode())
        h.transport.push(message)
        await asyncio.sleep(0.05)
        assert h.session.rejected == 1
    samples = protocol_error_counts(h.metrics)
    assert samples == [("too_large", 1.0)]


async def test_a_clear_just_after_the_socket_dropped_under_a_send_does_not_raise() -> None:
    """The speaker's send failed (TransportClosed) and its task is closing the voice's stream
    when a clear() cancels it: the task swallows that cancellation in its `finally` and ends
    with TransportClosed. clear() raised it — to POST /calls/{sid}/clear as a 500, to barge-in
    and DTMF as a failure of the call's reader. The speaker handles that error itself (the
    call ended), and clear() returns what it stopped."""
    transport = FakeTransport()
    transport.drop_after = 10  # the peer is gone mid-utterance, under one of the sender's sends
    session = CallSession(transport, FakeProvider(delay=0.01), greeting="A long greeting. " * 20)
    ended: list[tuple[str, object]] = []
    session.add_listener(
        lambda e: (
            ended.append((e.type, e.data.get("reason")))
            if e.type.startswith("speech.") and e.type not in ("speech.queued", "speech.started")
            else None
        )
    )
    transport.push(Connected("Call", "1.0.0").to_json())
    transport.push(start_json())
    run = asyncio.create_task(session.run())
    async with asyncio.timeout(5):
        while transport.closed is None:  # noqa: ASYNC110 - the drop is the fake's, not an event
            await asyncio.sleep(0)
        stopped = await session.clear()
        await run
    # The call's end stopped the greeting (its audio was partly sent), not the clear
    assert stopped == []
    assert ended == [("speech.interrupted", "call-ended")]
