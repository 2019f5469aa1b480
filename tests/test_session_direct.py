"""CallSession's direct delivery (session.DirectDelivery): what the native socket hands over
as it arrives, and what it leaves to the reader task. The rest of test_session.py runs on both."""

from __future__ import annotations

import asyncio

import pytest

from callspeak.call_state import Phase
from callspeak.protocol import (
    AccountSid,
    CallSid,
    Clear,
    Connected,
    Dtmf,
    Media,
    OutboundMark,
    Stop,
)
from callspeak.session import CallSession
from callspeak.speech import SpeechStatus
from tests.fakes import DirectTransport, FakeProvider, FakeTransport
from tests.test_session import (
    SID,
    TASK_STARTS_AFTER,
    Harness,
    MarkerDetector,
    caller_speaks,
    echo,
    loop_iterations_until,
    start_json,
)


class DirectHarness(Harness):
    transport_class: type[FakeTransport] = DirectTransport


def media(seq: int, payload: bytes = b"\xff" * 160) -> str:
    return Media(seq, SID, "inbound", seq, seq * 20, payload).to_json()


async def test_direct_delivery_takes_media_and_marks_and_leaves_the_rest_to_the_reader() -> None:
    async with DirectHarness(FakeProvider(chunk=160)) as h:
        assert isinstance(h.transport, DirectTransport)
        h.transport.push(start_json(say="One."))
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        for seq in range(2, 12):
            h.transport.push(media(seq))
        h.transport.push(echo(h.marks()[0], 12))
        assert h.transport.direct == 11  # handled in push(), before any task ran
        assert "speech.heard" in h.types()
        h.transport.push(media(13, b"\xff" * 10)[:-3])  # broken JSON: left to the reader
        h.transport.push(Dtmf(14, SID, "inbound", "5").to_json())
        h.transport.push(Stop(15, SID, AccountSid("AC1"), CallSid("CAtest")).to_json())
        assert h.transport.direct == 11
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert h.session.rejected == 1
    assert h.types().count("dtmf") == 1 and h.types()[-1] == "call.stopped"


async def test_messages_after_a_direct_barge_in_wait_for_its_clear() -> None:
    """A barge-in found on the direct path clears in a task; an echo arriving meanwhile is
    queued and handled after the clear, so it counts as flushed, not heard — as inline."""
    provider = FakeProvider(chunk=160, delay=0.01)
    async with DirectHarness(provider, greeting=None, barge_in=MarkerDetector(), max_lead=0.1) as h:
        assert isinstance(h.transport, DirectTransport)
        h.transport.push(start_json())
        await h.session.wait_started()
        utterance = h.session.say("One. Two. Three. Four.")
        await h.transport.wait_for(lambda ms: sum(isinstance(m, OutboundMark) for m in ms) >= 2)
        pending = h.marks()
        h.transport.push(caller_speaks())
        assert h.transport.direct == 1
        for name in pending:
            h.transport.push(echo(name))  # Twilio's echoes of the audio the clear dropped
        assert h.transport.direct == 1  # queued behind the clear
        assert await asyncio.wait_for(utterance.wait(), 5) is SpeechStatus.INTERRUPTED
        await h.transport.wait_for(lambda ms: isinstance(ms[-1], Clear))
        for _ in range(20):
            await asyncio.sleep(0)
    assert "speech.heard" not in h.types()
    assert utterance.record is not None and utterance.record.heard == ()


class ClearFails(FakeProvider):
    async def clear(self) -> None:
        raise RuntimeError("a bug in the voice's clear")


async def test_a_barge_in_that_fails_on_the_direct_path_ends_the_call_as_inline() -> None:
    provider = ClearFails(chunk=160, delay=0.01)
    async with DirectHarness(provider, greeting=None, barge_in=MarkerDetector()) as h:
        h.transport.push(start_json())
        await h.session.wait_started()
        h.session.say("One. Two. Three.")
        await h.transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
        h.transport.push(caller_speaks())
        assert h.task is not None
        await asyncio.wait_for(h.task, 5)
    assert h.transport.closed == (1011, "internal error")


async def test_the_opening_is_handled_as_it_arrives_and_asks_the_voice_at_once() -> None:
    """connected and start are handled in the socket's callback, like media: the greeting is
    asked for one loop iteration later (through the reader task it took four)."""
    transport, provider = DirectTransport(), FakeProvider(chunk=160)
    session = CallSession(transport, provider, greeting="Hello there.")
    task = asyncio.create_task(session.run())
    await asyncio.sleep(0.01)  # the reader waits
    transport.push(Connected("Call", "1.0.0").to_json())
    transport.push(start_json())
    assert transport.direct == 2
    assert session.phase is Phase.STREAMING and session.call_sid == "CAtest"
    assert await loop_iterations_until(lambda: bool(provider.texts)) == TASK_STARTS_AFTER
    await transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
    transport.push(start_json())  # a second start: refused there too, and counted
    assert transport.direct == 3 and session.rejected == 1
    transport.push(None)
    await asyncio.wait_for(task, 5)


async def test_a_start_that_admission_judges_is_left_to_the_reader() -> None:
    transport, provider = DirectTransport(), FakeProvider(chunk=160)
    session = CallSession(transport, provider, greeting="Hi.", admit=lambda start: None)
    task = asyncio.create_task(session.run())
    await asyncio.sleep(0.01)
    transport.push(start_json())
    assert transport.direct == 0
    await transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
    transport.push(None)
    await asyncio.wait_for(task, 5)


async def test_an_opened_session_handles_its_opening_before_run_and_warms_the_voice_up() -> None:
    """open() — as the native socket calls it in the callback that accepted the stream — warms
    the voice and takes delivery at once: a start that arrives before run()'s tasks had a turn
    is handled as it arrives and the voice asked one iteration later; run() then serves on."""
    transport, provider = DirectTransport(), FakeProvider(chunk=160)
    session = CallSession(transport, provider, greeting="Hello there.")
    session.open()
    session.open()  # idempotent
    assert provider.warmed == 1 and transport.handler is not None
    transport.push(Connected("Call", "1.0.0").to_json())
    transport.push(start_json())
    assert transport.direct == 2
    assert session.phase is Phase.STREAMING and [u.text for u in session.utterances] == [
        "Hello there."
    ]
    assert await loop_iterations_until(lambda: bool(provider.texts)) == TASK_STARTS_AFTER
    task = asyncio.create_task(session.run())
    await transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
    assert provider.warmed == 1  # not again in run()
    transport.push(None)
    await asyncio.wait_for(task, 5)
    assert provider.closed


async def test_a_message_left_for_the_reader_before_it_runs_keeps_later_ones_behind_it() -> None:
    """Before the first receive() direct delivery is open; a message it declines (a DTMF, the
    reader's) is queued, media behind it wait in the queue and are handled after it, and once
    the reader waits again media are handed over directly."""
    transport, provider = DirectTransport(), FakeProvider(chunk=160)
    session = CallSession(transport, provider, greeting=None)
    session.open()
    transport.push(start_json())
    transport.push(Dtmf(2, SID, "inbound", "5").to_json())  # declined: queued for the reader
    transport.push(media(3))  # queued behind it, not handed over ahead of it
    assert transport.direct == 1 and transport.inbound.qsize() == 2
    task = asyncio.create_task(session.run())
    events: list[str] = []
    session.add_listener(lambda record: events.append(record.type))
    assert (
        await loop_iterations_until(lambda: transport.inbound.empty() and not transport.busy) < 10
    )
    assert events[:1] == ["dtmf"]
    transport.push(media(4))
    assert transport.direct == 2  # the reader waits again: direct once more
    transport.push(None)
    await asyncio.wait_for(task, 5)


class WarmUpFails(FakeProvider):
    def warm_up(self) -> None:
        raise RuntimeError("a bug in the voice's warm-up")


async def test_a_voice_whose_warm_up_fails_is_logged_and_the_call_still_speaks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport, provider = DirectTransport(), WarmUpFails(chunk=160)
    session = CallSession(transport, provider, greeting="Hello there.")
    session.open()  # raises nothing
    assert "warming up the voice fake failed" in caplog.text
    assert transport.handler is not None  # and takes delivery all the same
    task = asyncio.create_task(session.run())
    transport.push(start_json())
    await transport.wait_for(lambda ms: any(isinstance(m, OutboundMark) for m in ms))
    assert provider.texts == ["Hello there."]
    transport.push(None)
    await asyncio.wait_for(task, 5)
