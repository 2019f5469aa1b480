"""Task helpers shared by the call and the voices."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

__all__ = ["EAGER_START", "start_task", "wait_cancelled"]

_T = TypeVar("_T")

#: Whether :func:`start_task` runs a task's first steps at once (Python 3.12+).
EAGER_START: Final = sys.version_info >= (3, 12)


def start_task(coro: Coroutine[Any, Any, _T], *, name: str | None = None) -> asyncio.Task[_T]:
    """Run ``coro`` as a task of the running loop, its first steps at once where Python can.

    On Python 3.12 and later the task is *eager* (``eager_start=True``): ``coro`` runs now, as
    that task (``asyncio.current_task()`` is it), up to its first real suspension, and may even
    be done when this returns. On 3.11 it starts in the next loop iteration, as with
    ``asyncio.create_task``. Used where the first steps send something — a request to the voice,
    a connection to open — since on a server busy with hundreds of calls one loop iteration is
    tens of milliseconds, all of it added to the caller's wait.

    The caller's contract: whatever the first steps read is set before this call, and nothing
    after it assumes they have not run yet.
    """
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12):  # spelled out, not EAGER_START: mypy narrows on this form
        return asyncio.Task(coro, loop=loop, name=name, eager_start=True)
    return loop.create_task(coro, name=name)


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
