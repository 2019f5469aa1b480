"""RefusedKey: a refused key fails attempts at once, but one an interval is let through."""

from __future__ import annotations

import pytest

from callspeak.tts.base import TTSAuthError
from callspeak.tts.refused_key import RefusedKey
from tests.fakes import SettableClock


def test_a_key_not_refused_lets_every_attempt_through() -> None:
    key = RefusedKey(60, SettableClock())
    for _ in range(3):
        key.admit()
    assert key.error is None and not key.due() and not key.accept()


def test_refused_one_attempt_an_interval_goes_through_until_accepted() -> None:
    clock = SettableClock()
    key = RefusedKey(60, clock)
    refusal = TTSAuthError("deepgram", "Invalid credentials.", status=401)
    key.refuse(refusal)
    with pytest.raises(TTSAuthError) as raised:
        key.admit()
    assert str(raised.value) == str(refusal)  # (a copy of it: see the last test)
    clock.now += 59.9
    assert not key.due()
    clock.now += 0.1
    assert key.due()
    key.admit()  # the re-check
    with pytest.raises(TTSAuthError):
        key.admit()  # one an interval: the others asking meanwhile fail at once
    assert not key.due()
    clock.now += 60  # the re-check never answered (a timeout): the next is due anyway
    key.admit()
    key.refuse(refusal)  # refused again: an interval from now
    clock.now += 30
    with pytest.raises(TTSAuthError):
        key.admit()
    clock.now += 30
    key.admit()
    assert key.accept()  # accepted: every attempt goes through
    assert key.error is None and not key.accept()
    key.admit()


def test_the_refusal_is_raised_as_a_fresh_copy_each_time() -> None:
    """Raising one kept error again adds each raise's frames (and their locals: other calls'
    state) to its traceback for good; and a field one call set on it reached the next."""
    clock = SettableClock()
    key = RefusedKey(60.0, clock)
    refusal = TTSAuthError("deepgram", "bad key", status=401, request_id="r1")
    key.refuse(refusal)
    raised = []
    for _ in range(50):
        with pytest.raises(TTSAuthError) as info:
            key.admit()
        raised.append(info.value)
    assert key.error is not None and key.error is not refusal  # a copy is kept ...
    assert key.error.__traceback__ is None  # ... and never raised
    assert len({id(error) for error in raised}) == 50
    assert all(str(error) == str(refusal) and error.status == 401 for error in raised)
    raised[0].unspoken = "one call's rest"
    with pytest.raises(TTSAuthError) as info:
        key.admit()
    assert info.value.unspoken is None


def test_a_copy_has_its_own_notes_and_only_known_fields() -> None:
    error = TTSAuthError("deepgram", "bad key", status=401)
    error.add_note("refused at 10:00")
    copy = error.copy(unspoken="the rest")
    copy.add_note("call A's text")
    assert error.__notes__ == ["refused at 10:00"] and error.unspoken is None
    assert copy.unspoken == "the rest" and isinstance(copy, TTSAuthError)
    assert error.copy(message="other").args == ("other",)
    with pytest.raises(TypeError, match="unspokn"):
        error.copy(unspokn="typo")


def test_raise_if_refused_raises_a_copy_due_or_not() -> None:
    clock = SettableClock()
    key = RefusedKey(60.0, clock)
    key.raise_if_refused()  # not refused: nothing
    key.refuse(TTSAuthError("deepgram", "bad key", status=401))
    for _ in range(2):
        clock.now += 61  # due, and still raised: the attempt was already let through
        with pytest.raises(TTSAuthError) as info:
            key.raise_if_refused()
        assert info.value is not key.error and key.error is not None
    assert key.error.__traceback__ is None
