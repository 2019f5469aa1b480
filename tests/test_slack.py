"""First words go before deadlines only when every deadline still holds (pure arithmetic)."""

from __future__ import annotations

import pytest

from callspeak.tts.slack import MARGIN, SAFETY, RenderCost, fits_first


def test_with_no_deadline_queued_anything_fits() -> None:
    assert fits_first(100.0, now=0.0, deadlines=[])


@pytest.mark.parametrize(
    ("due", "fits"),
    [(3.0, True), (2.0 + MARGIN, True), (2.0 + MARGIN - 0.01, False), (1.0, False)],
)
def test_one_worker_fits_the_job_only_if_the_deadline_job_still_ends_a_margin_early(
    due: float, fits: bool
) -> None:
    """1 s of first words, then the 1 s deadline job: it ends at 2 s."""
    assert fits_first(1.0, now=0.0, deadlines=[(due, 1.0)]) is fits


def test_a_deadline_already_missed_without_the_job_does_not_fit_it() -> None:
    """Late anyway: the pool runs the most urgent first, not the new job."""
    assert not fits_first(0.0, now=10.0, deadlines=[(10.1, 1.0)])


def test_deadline_jobs_go_to_the_worker_free_first() -> None:
    """A long first-words job on this worker; the other worker is free (its job ended before
    now counts as now) and takes the deadline job at once."""
    assert fits_first(10.0, now=5.0, deadlines=[(7.0, 1.0)], busy_until=[4.0])
    # ... but not when that worker is busy past the deadline's room.
    assert not fits_first(10.0, now=5.0, deadlines=[(7.0, 1.0)], busy_until=[6.5])


def test_every_deadline_is_checked_in_turn_on_the_workers() -> None:
    """Two workers, three deadline jobs of 1 s: with the new 1 s job on one worker, they end at
    1, 2 and 2 s on the other and this one (ties to either)."""
    deadlines = [(1.5, 1.0), (2.5, 1.0), (2.5, 1.0)]
    assert fits_first(1.0, now=0.0, deadlines=deadlines, busy_until=[0.0], margin=0.25)
    tight = [(1.5, 1.0), (2.5, 1.0), (2.2, 1.0)]
    assert not fits_first(1.0, now=0.0, deadlines=tight, busy_until=[0.0], margin=0.25)


def test_render_cost_is_unknown_until_a_render_was_seen() -> None:
    cost = RenderCost()
    assert cost.rate is None and cost.estimate(50) is None
    cost.observe(80, 1.0)  # 1 s for 80 characters + the fixed overhead of 20
    assert cost.rate == pytest.approx(0.01)
    assert cost.estimate(30) == pytest.approx(SAFETY * 0.01 * 50)


def test_render_cost_follows_the_load_as_a_moving_average() -> None:
    cost = RenderCost(rate=0.01)
    cost.observe(80, 3.0)  # 0.03 s per character: three times slower
    assert cost.rate == pytest.approx(0.01 + RenderCost.WEIGHT * 0.02)
    for _ in range(30):
        cost.observe(80, 3.0)
    assert cost.rate == pytest.approx(0.03, rel=1e-3)
