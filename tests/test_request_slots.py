"""RequestSlots: our side of Deepgram's concurrency limit (no sockets here)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from callspeak.tts.request_slots import SLOT_AHEAD_MARGIN, SLOT_WAIT, RequestSlots, slot_wait
from tests.fakes import SettableClock


def slots(limit: int | None, clock: SettableClock | None = None) -> RequestSlots:
    return RequestSlots(limit, "deepgram", clock=clock or SettableClock())


async def test_without_a_limit_every_request_takes_a_slot_at_once() -> None:
    unlimited = slots(None)
    assert all([await unlimited.acquire(0.0) for _ in range(500)])
    assert unlimited.try_acquire() and not unlimited.full()
    assert unlimited.in_use == unlimited.peak == 501


async def test_past_the_limit_a_request_waits_and_takes_the_first_slot_freed() -> None:
    two = slots(2)
    assert await two.acquire(0.0) and two.try_acquire()
    assert two.full() and not two.try_acquire()
    third = asyncio.create_task(two.acquire(5.0))
    await asyncio.sleep(0)
    assert not third.done()
    two.release()
    assert await third  # handed the slot freed, not left to race for it
    assert two.in_use == 2 and two.peak == 2


async def test_a_request_given_no_slot_in_time_is_told_so_and_holds_none() -> None:
    one = slots(1)
    assert await one.acquire(0.0)
    assert not await one.acquire(0.02)
    one.release()
    assert one.in_use == 0 and await one.acquire(0.0)  # the late waiter left nothing behind


async def test_waiters_take_slots_first_come_first_served() -> None:
    one = slots(1)
    assert await one.acquire(0.0)
    order: list[int] = []

    async def wait(n: int) -> None:
        assert await one.acquire(5.0)
        order.append(n)

    waiters = [asyncio.create_task(wait(n)) for n in range(4)]
    await asyncio.sleep(0)
    # A newcomer does not jump the queue, even at the moment a slot is freed.
    one.release()
    assert not one.try_acquire()
    for _ in range(4):
        await asyncio.sleep(0)
        one.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3] and one.in_use == 0


async def test_a_cancelled_waiter_holds_no_slot_even_if_handed_one_as_it_was_cancelled() -> None:
    one = slots(1)
    assert await one.acquire(0.0)
    gone, next_one = asyncio.create_task(one.acquire(5.0)), asyncio.create_task(one.acquire(5.0))
    await asyncio.sleep(0)
    one.release()  # handed to `gone`, which is cancelled before it resumes
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await next_one  # passed on, not lost
    assert one.in_use == 1
    quitter = asyncio.create_task(one.acquire(5.0))
    await asyncio.sleep(0)
    quitter.cancel()  # cancelled while waiting: leaves the queue
    with pytest.raises(asyncio.CancelledError):
        await quitter
    one.release()
    assert one.in_use == 0 and one.try_acquire()


def test_a_slot_given_back_twice_is_a_bug_said_at_once() -> None:
    one = slots(1)
    assert one.try_acquire()
    one.release()
    with pytest.raises(RuntimeError, match="released more often"):
        one.release()


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="1 or more"):
        slots(0)


async def test_reaching_the_limit_is_said_once_a_minute_naming_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SettableClock()
    one = slots(1, clock)
    assert one.try_acquire()
    with caplog.at_level(logging.WARNING, "callspeak.tts.request_slots"):
        for _ in range(5):
            assert not one.try_acquire()
            assert not await one.acquire(0.0)
        clock.now += 59
        assert not one.try_acquire()
        assert len(caplog.records) == 1
        clock.now += 1
        assert not one.try_acquire()
    assert len(caplog.records) == 2
    assert "CALLSPEAK_DEEPGRAM_MAX_CONCURRENT" in caplog.records[0].getMessage()
    said = caplog.records[0].getMessage()
    assert said.startswith("deepgram: the 1 request the limit allows is in progress")


def test_the_warning_says_what_is_limited_and_what_happens_then(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sockets = RequestSlots(
        2,
        "deepgram-ws",
        clock=SettableClock(),
        what=("socket", "sockets"),
        state="open",
        then="new calls use the next voice",
    )
    assert sockets.try_acquire() and sockets.try_acquire()
    with caplog.at_level(logging.WARNING):
        assert not sockets.try_acquire()
    said = caplog.records[0].getMessage()
    assert said.startswith("deepgram-ws: all 2 sockets the limit allows are open (")
    assert "): new calls use the next voice; raise it if your plan allows more" in said


def test_a_request_waits_a_second_or_while_the_call_has_more_than_that_to_play() -> None:
    assert slot_wait(0.0) == slot_wait(SLOT_WAIT) == SLOT_WAIT
    assert slot_wait(4.0) == 4.0 - SLOT_AHEAD_MARGIN


async def test_a_waiter_cancelled_as_a_slot_frees_is_cancelled_not_an_error() -> None:
    """A release in the same loop iteration as the cancel, before the waiter resumes, passes
    over it: the waiter must still end cancelled (a barge-in), and hold nothing."""
    one = slots(1)
    assert await one.acquire(0.0)
    waiter = asyncio.create_task(one.acquire(5.0))
    await asyncio.sleep(0)
    waiter.cancel()
    one.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert one.in_use == 0 and one.try_acquire()
