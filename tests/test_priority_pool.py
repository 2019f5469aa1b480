"""The synthesis pool runs urgent jobs first and skips abandoned ones."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from callspeak.tts.priority_pool import PriorityPool


async def test_lower_priority_value_runs_first_ties_in_order() -> None:
    pool = PriorityPool(1)
    gate = threading.Event()
    order: list[str] = []
    try:
        blocker = asyncio.ensure_future(pool.run(gate.wait))  # occupies the only worker
        await asyncio.sleep(0.05)
        jobs = [
            asyncio.ensure_future(pool.run(lambda n=name: order.append(n), priority=p))
            for name, p in [("first-a", (1.0, 5.0)), ("cont", (0.0, 9.0)), ("first-b", (1.0, 5.0))]
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, *jobs)
        assert order == ["cont", "first-a", "first-b"]
    finally:
        pool.shutdown()


async def test_cancelled_job_is_skipped_and_errors_propagate() -> None:
    pool = PriorityPool(1)
    gate = threading.Event()
    ran: list[str] = []
    try:
        blocker = asyncio.ensure_future(pool.run(gate.wait))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(pool.run(lambda: ran.append("doomed")))
        await asyncio.sleep(0.01)
        doomed.cancel()
        gate.set()
        await blocker
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
        assert await pool.run(lambda: 42) == 42
        assert ran == []
    finally:
        pool.shutdown()
    with pytest.raises(RuntimeError):
        await pool.run(lambda: 1)


async def test_a_job_raising_stop_iteration_still_answers_its_caller() -> None:
    """A future refuses StopIteration (say, a bare next() on an empty iterator in synthesis):
    it reaches the caller as a RuntimeError rather than leave it waiting forever."""
    pool = PriorityPool(1)
    try:
        async with asyncio.timeout(2):
            with pytest.raises(RuntimeError, match="StopIteration") as info:
                await pool.run(lambda: next(iter(())))
        assert isinstance(info.value.__cause__, StopIteration)
    finally:
        pool.shutdown()


async def test_shutdown_fails_queued_jobs_and_lets_the_running_one_finish() -> None:
    pool = PriorityPool(1)
    gate = threading.Event()
    ran: list[str] = []
    running = asyncio.ensure_future(pool.run(gate.wait))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(pool.run(lambda: ran.append("queued")))
    await asyncio.sleep(0.01)
    threading.Timer(0.1, gate.set).start()  # the running job ends while shutdown() waits
    pool.shutdown()
    assert await running is True
    # an error its caller can report (Piper: a TTSError), not a cancellation nobody asked for
    with pytest.raises(RuntimeError, match="shut down"):
        await queued
    assert ran == []


async def test_a_deferred_job_queued_by_the_job_before_it_runs_before_waiting_ones() -> None:
    """The next piece of a call's speech, queued by the worker that renders the piece before it
    as that one finishes, is the job that worker takes next: asked for by the event loop once
    the first was done, it came a moment after the worker had taken another job."""
    pool = PriorityPool(1)
    gate = threading.Event()
    order: list[str] = []
    try:
        follow = pool.defer(lambda: order.append("next piece"))

        def piece() -> None:
            gate.wait()
            order.append("piece")
            follow.queue((0.0, 9.0))

        running = asyncio.ensure_future(pool.run(piece, priority=(0.0, 1.0)))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(
            pool.run(lambda: order.append("first words"), priority=(1.0, 0.0))
        )
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(running, waiting, follow.future)
        assert order == ["piece", "next piece", "first words"]
        follow.queue((0.0, 0.0))  # once only: nothing runs again
        dropped = pool.defer(lambda: order.append("dropped"))
        dropped.future.cancel()
        await asyncio.sleep(0)
        dropped.queue((0.0, 0.0))  # cancelled before it was queued: never runs
        assert await pool.run(lambda: 42) == 42
        assert order == ["piece", "next piece", "first words"]
        forgotten = pool.defer(lambda: order.append("forgotten"))
    finally:
        pool.shutdown()
    # Never queued when the pool shut down: failed, as the jobs still queued are.
    with pytest.raises(RuntimeError, match="shut down"):
        await forgotten.future
    with pytest.raises(RuntimeError, match="shut down"):
        pool.defer(lambda: None)


async def test_shutdown_waits_once_for_all_busy_workers_not_once_each() -> None:
    """Four workers each stuck in a long render: shutdown is bounded by its timeout, not by four
    times it (on a many-core host Piper's close took workers × 5 s)."""
    pool = PriorityPool(4)
    gate = threading.Event()
    running = [asyncio.ensure_future(pool.run(gate.wait)) for _ in range(4)]
    await asyncio.sleep(0.1)  # all four are busy
    started = time.monotonic()
    await asyncio.to_thread(pool.shutdown, timeout=0.3)
    waited = time.monotonic() - started
    gate.set()
    assert all(await asyncio.gather(*running))
    assert 0.25 <= waited < 0.6, waited


async def test_aclose_waits_for_the_running_job_without_blocking_the_loop() -> None:
    """The calls still in progress at shutdown keep being served while a sentence finishes:
    ``shutdown()`` called on the loop would hold it until the job ended (or 5 s)."""
    pool = PriorityPool(1)
    gate = threading.Event()
    running = asyncio.ensure_future(pool.run(gate.wait))
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(pool.aclose())
    await asyncio.sleep(0.05)  # the loop runs on while the worker is busy
    assert not closing.done()
    gate.set()  # from the loop: only possible because aclose() does not hold it
    assert await running is True
    await asyncio.wait_for(closing, 5)
    with pytest.raises(RuntimeError, match="shut down"):
        await pool.run(lambda: None)


def test_needs_a_worker() -> None:
    with pytest.raises(ValueError):
        PriorityPool(0)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a POSIX feature")
async def test_workers_run_below_the_event_loop_priority() -> None:
    pool = PriorityPool(1, nice=5)
    try:
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        worker = await pool.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        assert worker == min(19, mine + 5)
    finally:
        pool.shutdown()
