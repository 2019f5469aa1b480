"""Task helpers shared by the call and the voices."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["wait_cancelled"]


async def wait_cancelled(task: asyncio.Future[Any]) -> None:
    """Wait for ``task``, just cancelled, to end; raises what it raised, if not cancellation.

    Its own ``CancelledError`` is swallowed, but a cancellation of the task waiting here is
    re-raised: ``contextlib.suppress(CancelledError)`` around the ``await`` cannot tell the two
    apart, and would let a task that is being cancelled carry on (and whoever waits for it hang).
    """
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
