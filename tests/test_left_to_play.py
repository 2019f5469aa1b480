"""What a caller has left to play (callspeak.tts.left_to_play): pure, on a settable clock."""

from __future__ import annotations

import pytest

from callspeak.tts.left_to_play import LeftToPlay
from tests.fakes import SettableClock


def test_it_shrinks_with_time_grows_with_audio_and_never_goes_below_nothing() -> None:
    clock = SettableClock()
    left = LeftToPlay(1.0, clock)
    clock.now += 0.3
    assert left.now() == pytest.approx(0.7)
    left.add(0.5)  # audio handed on now, on top of what is left now
    assert left.now() == pytest.approx(1.2)
    clock.now += 2.0
    assert left.now() == 0.0  # the caller ran dry: nothing left, not a debt
    clock.now += 0.2
    left.add(0.4)  # a dry spell is not taken off audio handed on after it
    assert left.now() == pytest.approx(0.4)
