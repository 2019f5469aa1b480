"""The event loop chooser: uvloop where installed (a dependency off Windows), else asyncio's."""

from __future__ import annotations

import asyncio
import sys

from callspeak import eventloop


def test_run_returns_the_result_on_the_chosen_loop() -> None:
    async def loop_module() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(loop_module()).split(".")[0] == eventloop.loop_name()


def test_uvloop_is_chosen_where_it_is_a_dependency() -> None:
    expected = "asyncio" if sys.platform == "win32" else "uvloop"
    assert eventloop.loop_name() == expected
