"""callspeak.tasks.wait_cancelled: swallow the task's cancellation, never the waiter's."""

from __future__ import annotations

import asyncio

import pytest

from callspeak.tasks import wait_cancelled


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
