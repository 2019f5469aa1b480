"""Pacing against the caller's playback clock (pure)."""

from __future__ import annotations

import pytest

from callspeak.pacing import Pacer


def test_burst_up_to_the_lead_then_real_time() -> None:
    pacer = Pacer(max_lead=0.1)
    now = 0.0
    sent_without_wait = 0
    while pacer.delay(now, 0.02) == 0:
        pacer.sent(now, 0.02)
        sent_without_wait += 1
    assert sent_without_wait == 5  # 5 × 20 ms = the 100 ms lead
    assert pacer.delay(now, 0.02) == pytest.approx(0.02)
    now += 0.02
    assert pacer.delay(now, 0.02) == pytest.approx(0.0)


def test_a_dry_buffer_restarts_playback_at_send_time() -> None:
    pacer = Pacer(max_lead=1.0)
    assert pacer.sent(0.0, 0.5) == 0.5
    assert pacer.lead(0.25) == pytest.approx(0.25)
    # Nothing sent for a while: the buffer ran dry; new audio plays from when it is sent.
    assert pacer.sent(3.0, 0.02) == pytest.approx(3.02)
    assert pacer.lead(10.0) == 0.0


def test_reset_forgets_queued_audio() -> None:
    pacer = Pacer(max_lead=0.5)
    pacer.sent(0.0, 0.5)
    assert pacer.delay(0.0, 0.02) > 0
    pacer.reset()
    assert pacer.lead(0.0) == 0.0 and pacer.delay(0.0, 0.02) == 0.0


def test_rejects_non_positive_lead() -> None:
    with pytest.raises(ValueError):
        Pacer(0)
