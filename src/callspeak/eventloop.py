"""Which event loop callspeak runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv, in C) does socket reads and writes, timers and callbacks for a fraction of the
CPU of the pure-Python selector loop; a media stream is ~50 small messages a second each way per
call, so that is most of what a busy server does. uvicorn picks uvloop by itself (``loop="auto"``);
:func:`run` gives the emulator, the demo and the benchmarks the same loop. uvloop does not exist
on Windows: there, and wherever it is missing, everything runs on asyncio's loop unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "loop_name", "run"]

_T = TypeVar("_T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``uvloop.new_event_loop`` when uvloop is importable, else ``None`` (asyncio's default)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: the loop :func:`run` would use (for logs and reports)."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """Like :func:`asyncio.run`, on the loop :func:`loop_factory` chooses."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
