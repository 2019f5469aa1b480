"""callspeak.tasks: wait_cancelled swallows the task's cancellation, never the waiter's;
start_task runs a task's first steps at once where Python can."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from callspeak.tasks import EAGER_START, start_task, wait_cancelled


async def test_the_cancelled_tasks_own_cancellation_is_swallowed() -> None:
    task = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    task.cancel()
    await wait_cancelled(task)
    assert task.cancelled()


async def test_what_the_task_raised_instead_is_raised() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await wait_cancelled(task)


async def test_a_cancellation_of_the_waiter_is_not_swallowed() -> None:
    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0.05)

    inner = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    inner.cancel()
    carried_on = False

    async def waiter() -> None:
        nonlocal carried_on
        await wait_cancelled(inner)
        carried_on = True

    outer = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)  # waiting for inner to wind down
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert not carried_on


async def test_start_task_runs_the_first_steps_at_once_where_python_can() -> None:
    """Python 3.12+: up to the first suspension before start_task returns, as that task; 3.11:
    from the next loop iteration, as asyncio.create_task."""
    steps: list[str] = []
    current: list[asyncio.Task[Any] | None] = []
    gate = asyncio.Event()

    async def work() -> str:
        current.append(asyncio.current_task())
        steps.append("first")
        await gate.wait()
        steps.append("second")
        return "done"

    task = start_task(work(), name="worker")
    assert task.get_name() == "worker"
    if EAGER_START:
        assert steps == ["first"] and current == [task]
    else:
        assert steps == [] and current == []
        await asyncio.sleep(0)
        assert steps == ["first"] and current == [task]
    gate.set()
    assert await task == "done" and steps == ["first", "second"]


async def test_a_task_with_nothing_to_wait_for_may_be_done_when_start_task_returns() -> None:
    async def quick() -> int:
        return 7

    task = start_task(quick())
    assert task.done() is EAGER_START
    assert await task == 7
