"""The event loop chooser: uvloop where installed (a dependency off Windows), else asyncio's."""

from __future__ import annotations

import asyncio
import os
import sys

from callspeak import eventloop
from tests.conftest import SLOW_STEP_SECONDS


def test_run_returns_the_result_on_the_chosen_loop() -> None:
    async def loop_module() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(loop_module()).split(".")[0] == eventloop.loop_name()


def test_uvloop_is_chosen_where_it_is_a_dependency() -> None:
    expected = "asyncio" if sys.platform == "win32" else "uvloop"
    assert eventloop.loop_name() == expected


async def test_the_tests_run_on_the_loop_asked_for() -> None:
    """``TEST_EVENT_LOOP=uvloop`` (conftest) puts the async tests on uvloop, as served."""
    expected = "uvloop" if os.environ.get("TEST_EVENT_LOOP") == "uvloop" else "asyncio"
    assert type(asyncio.get_running_loop()).__module__.split(".")[0] == expected


async def test_the_suite_runs_its_loops_in_debug_mode() -> None:
    """As the README says of `make test`: pytest-asyncio's loops ignore PYTHONASYNCIODEBUG, so
    pyproject.toml asks for it (asyncio_debug)."""
    loop = asyncio.get_running_loop()
    assert loop.get_debug() and loop.slow_callback_duration == SLOW_STEP_SECONDS
