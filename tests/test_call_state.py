"""The call state machine: inbound messages in, domain events out (no sockets)."""

from __future__ import annotations

import pytest

from callspeak.call_state import (
    CallState,
    DigitPressed,
    MarkFlushed,
    MarkPlayed,
    MediaReceived,
    Phase,
    Rejected,
    Started,
    Stopped,
    StreamConnected,
)
from callspeak.protocol import (
    AccountSid,
    CallSid,
    Connected,
    Dtmf,
    Mark,
    Media,
    MediaFormat,
    Start,
    Stop,
    StreamSid,
)

SID = StreamSid("MZ1")
START = Start(
    1,
    SID,
    AccountSid("AC1"),
    CallSid("CA1"),
    ("inbound",),
    {},
    MediaFormat("audio/x-mulaw", 8000, 1),
)


def started() -> CallState:
    state = CallState()
    assert isinstance(state.receive(Connected("Call", "1.0.0")), StreamConnected)
    assert state.receive(START) == Started(START)
    return state


def test_happy_path_phases() -> None:
    state = started()
    assert state.phase is Phase.STREAMING
    media = Media(2, SID, "inbound", 1, 0, b"\xff" * 160)
    assert state.receive(media) == MediaReceived(media)
    dtmf = Dtmf(3, SID, "inbound_track", "5")
    assert state.receive(dtmf) == DigitPressed(dtmf)
    stop = Stop(4, SID, AccountSid("AC1"), CallSid("CA1"))
    assert state.receive(stop) == Stopped(stop)
    assert state.phase is Phase.STOPPED


@pytest.mark.parametrize(
    "message, reason",
    [
        (Media(2, SID, "inbound", 1, 0, b"x"), "'media' before 'start'"),
        (Mark(2, SID, "m"), "'mark' before 'start'"),
        (Dtmf(2, SID, "inbound_track", "1"), "'dtmf' before 'start'"),
        (Stop(2, SID, AccountSid("AC1"), CallSid("CA1")), "'stop' before 'start'"),
    ],
)
def test_messages_before_start_are_rejected(message: object, reason: str) -> None:
    state = CallState()
    event = state.receive(message)  # type: ignore[arg-type]
    assert isinstance(event, Rejected) and event.reason == reason
    assert state.phase is Phase.CONNECTING


def test_duplicates_foreign_sids_and_after_stop_are_rejected_without_state_change() -> None:
    state = started()
    assert state.receive(Connected("Call", "1.0.0")) == Rejected(
        "duplicate 'connected'", "connected"
    )
    assert state.receive(START) == Rejected("duplicate 'start'", "start")
    foreign = state.receive(Media(5, StreamSid("MZother"), "inbound", 1, 0, b"x"))
    assert isinstance(foreign, Rejected) and "MZother" in foreign.reason
    assert state.phase is Phase.STREAMING
    state.receive(Stop(6, SID, AccountSid("AC1"), CallSid("CA1")))
    after = state.receive(Media(7, SID, "inbound", 2, 20, b"x"))
    assert after == Rejected("'media' after stop", "media")


def test_bad_text_becomes_rejected() -> None:
    state = started()
    event = state.receive_text("{not json")
    assert isinstance(event, Rejected) and event.reason
    assert state.phase is Phase.STREAMING


def test_marks_played_in_order_and_unknown_marks_rejected() -> None:
    state = started()
    state.mark_sent("a")
    state.mark_sent("b")
    assert state.pending_marks == ("a", "b")
    assert state.receive(Mark(5, SID, "a")) == MarkPlayed("a")
    assert state.pending_marks == ("b",)
    assert isinstance(state.receive(Mark(6, SID, "zzz")), Rejected)
    with pytest.raises(ValueError):
        state.mark_sent("b")


def test_echoes_after_clear_are_flushed_not_played() -> None:
    state = started()
    state.mark_sent("a")
    state.mark_sent("b")
    assert state.receive(Mark(5, SID, "a")) == MarkPlayed("a")
    assert state.cleared() == ("b",)
    state.mark_sent("c")
    assert state.receive(Mark(6, SID, "b")) == MarkFlushed("b")
    assert state.receive(Mark(7, SID, "c")) == MarkPlayed("c")
    # A second echo of a flushed mark is not a thing Twilio does: rejected.
    assert isinstance(state.receive(Mark(8, SID, "b")), Rejected)


def test_a_mark_name_whose_flushed_echo_is_still_due_cannot_be_reused() -> None:
    """After a clear, Twilio still echoes the dropped marks. Reusing a name before its echo came
    back would make that echo pass for the new mark being played: refused."""
    state = started()
    state.mark_sent("a")
    assert state.cleared() == ("a",)
    with pytest.raises(ValueError, match="'a'"):
        state.mark_sent("a")
    assert state.receive(Mark(5, SID, "a")) == MarkFlushed("a")
    state.mark_sent("a")  # the echo is in: the name is free again
    assert state.pending_marks == ("a",)


def test_a_first_connected_after_start_is_not_called_a_duplicate() -> None:
    """Nothing was duplicated: the reason must say what happened (a log reader would look for
    a second 'connected' that never came)."""
    state = CallState()
    assert state.receive(START) == Started(START)
    assert state.receive(Connected("Call", "1.0.0")) == Rejected(
        "'connected' after 'start'", "connected"
    )
    assert state.receive(Connected("Call", "1.0.0")) == Rejected(
        "'connected' after 'start'", "connected"
    )


def test_reusing_a_name_whose_flushed_echo_is_due_says_so_not_pending() -> None:
    state = started()
    state.mark_sent("a")
    state.cleared()
    assert state.pending_marks == ()
    with pytest.raises(ValueError) as raised:
        state.mark_sent("a")
    assert "pending" not in str(raised.value)
    assert "clear" in str(raised.value)


def test_rejections_do_not_dump_what_the_peer_sent_into_the_reason() -> None:
    """Reasons are logged: a long name or SID from the peer is cut, as the parser cuts its own
    (test_protocol: "a huge value is truncated, not dumped into logs")."""
    state = started()
    unknown = state.receive(Mark(5, SID, "m" * 60_000))
    foreign = state.receive(Media(6, StreamSid("MZ" + "x" * 60_000), "inbound", 1, 0, b""))
    for event in (unknown, foreign):
        assert isinstance(event, Rejected)
        assert len(event.reason) < 200
