"""The emulator's shared 20 ms clock: each schedule ticks as its own sleep loop would."""

from __future__ import annotations

import asyncio
import gc
import heapq
import itertools
import time
import weakref
from collections.abc import Callable

import pytest

from callspeak.clock import MonotonicClock
from callspeak.emulator.ticker import Ticker, shared_ticker


class ManualClock:
    """Time moves only in :meth:`run_until`, which wakes the sleepers in order of their end."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps = 0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + max(0.0, seconds), next(self._order), future))
        await future

    async def run_until(self, end: float) -> None:
        while True:
            for _ in range(20):  # let every task run until it waits on this clock
                await asyncio.sleep(0)
            if not self._sleepers or self._sleepers[0][0] > end:
                break
            until, _, future = heapq.heappop(self._sleepers)
            self.t = max(self.t, until)
            if not future.done():
                future.set_result(None)
        self.t = end


def recorder(
    clock: ManualClock, log: list[tuple[float, str, int]], name: str, last: int
) -> Callable[[int], bool]:
    def tick(n: int) -> bool:
        log.append((clock.now(), name, n))
        return n < last

    return tick


async def test_each_schedule_ticks_at_its_start_plus_n_periods_in_order_of_due_time() -> None:
    clock = ManualClock()
    ticker = Ticker(clock, 0.02)
    log: list[tuple[float, str, int]] = []
    a = asyncio.create_task(ticker.run(0.0, recorder(clock, log, "a", 4)))
    await clock.run_until(0.007)
    b = asyncio.create_task(ticker.run(0.007, recorder(clock, log, "b", 3)))
    await clock.run_until(1.0)
    assert (await a, await b) == (4, 3)
    assert [(name, n) for _, name, n in log] == [
        ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3), ("a", 4)
    ]  # fmt: skip
    for at, name, n in log:
        assert at == pytest.approx((0.0 if name == "a" else 0.007) + n * 0.02)


async def test_one_wake_up_serves_every_schedule_due_then() -> None:
    clock = ManualClock()
    ticker = Ticker(clock, 0.02)
    log: list[tuple[float, str, int]] = []
    runs = [
        asyncio.create_task(ticker.run(0.0, recorder(clock, log, str(k), 9))) for k in range(50)
    ]
    await clock.run_until(1.0)
    assert [await run for run in runs] == [9] * 50
    assert len(log) == 500
    assert clock.sleeps == 9  # ticks 1 to 9; tick 0 ran at once in each caller


async def test_ticks_missed_in_a_stall_run_back_to_back_then_the_schedule_resumes() -> None:
    clock = ManualClock()
    ticker = Ticker(clock, 0.02)
    times: list[tuple[int, float]] = []

    def tick(n: int) -> bool:
        times.append((n, clock.now()))
        if n == 1:
            clock.t += 0.05  # this tick took 50 ms: ticks 2 and 3 are late
        return n < 5

    run = asyncio.create_task(ticker.run(0.0, tick))
    await clock.run_until(1.0)
    assert await run == 5
    expected = [(0, 0.0), (1, 0.02), (2, 0.07), (3, 0.07), (4, 0.08), (5, 0.1)]
    assert [n for n, _ in times] == [n for n, _ in expected]
    assert [at for _, at in times] == pytest.approx([at for _, at in expected])


async def test_what_arrived_during_a_stall_is_read_before_the_ticks_it_missed() -> None:
    """The loop is held up past several ticks while the server's audio arrives; the ticker's
    timer fires first, then the socket is read. The call's task, woken by that read, must take
    the audio in before the missed ticks play — else they play silence and the report shows a
    gap the server never made."""
    clock = ManualClock()
    ticker = Ticker(clock, 0.02)
    log: list[str] = []
    arrived = asyncio.get_running_loop().create_future()

    def tick(n: int) -> bool:
        log.append(f"tick {n}")
        return n < 12

    async def call_reading_its_socket() -> None:
        await arrived
        log.append("read")

    run = asyncio.create_task(ticker.run(0.0, tick))
    reader = asyncio.create_task(call_reading_its_socket())
    await clock.run_until(0.05)  # ticks 0-2 played; the ticker sleeps until tick 3 (0.06)
    assert log == ["tick 0", "tick 1", "tick 2"]
    clock.t = 0.15  # held up: ticks 3-7 are due now
    _, _, ticker_sleep = heapq.heappop(clock._sleepers)
    ticker_sleep.set_result(None)  # its timer fires...
    asyncio.get_running_loop().call_soon(arrived.set_result, None)  # ...then the data is read
    await clock.run_until(0.3)
    assert await run == 12 and reader.done()
    assert log[3:5] == ["read", "tick 3"], log


async def test_a_schedule_that_joins_while_the_ticker_sleeps_is_not_late() -> None:
    clock = ManualClock()
    ticker = Ticker(clock, 0.02)
    log: list[tuple[float, str, int]] = []
    a = asyncio.create_task(ticker.run(0.0, recorder(clock, log, "a", 3)))
    await clock.run_until(0.005)  # the ticker now sleeps until a's tick 1, at 0.02
    # b's tick 0 is overdue (runs at once) and its tick 1 is due at 0.01, before 0.02
    b = asyncio.create_task(ticker.run(-0.01, recorder(clock, log, "b", 3)))
    await clock.run_until(1.0)
    assert (await a, await b) == (3, 3)
    b_times = [at for at, name, _ in log if name == "b"]
    assert b_times == pytest.approx([0.005, 0.01, 0.03, 0.05])


async def test_a_tick_that_raises_ends_its_own_schedule_only() -> None:
    clock = ManualClock()
    ticker = Ticker(clock, 0.02)
    log: list[tuple[float, str, int]] = []

    def failing(n: int) -> bool:
        if n == 2:
            raise RuntimeError("tick 2 failed")
        return True

    bad = asyncio.create_task(ticker.run(0.0, failing))
    good = asyncio.create_task(ticker.run(0.0, recorder(clock, log, "good", 4)))
    await clock.run_until(1.0)
    with pytest.raises(RuntimeError, match="tick 2 failed"):
        await bad
    assert await good == 4


async def test_cancelling_run_stops_the_schedule() -> None:
    clock = ManualClock()
    ticker = Ticker(clock, 0.02)
    log: list[tuple[float, str, int]] = []
    run = asyncio.create_task(ticker.run(0.0, recorder(clock, log, "a", 1000)))
    await clock.run_until(0.05)
    run.cancel()
    await clock.run_until(1.0)
    assert run.cancelled()
    assert [n for _, _, n in log] == [0, 1, 2]


async def test_the_real_clock_ticker_is_shared_within_a_loop_and_never_early() -> None:
    assert shared_ticker(0.02) is shared_ticker(0.02)
    assert shared_ticker(0.01) is not shared_ticker(0.02)
    start = time.monotonic()
    late: list[float] = []

    def tick(n: int) -> bool:
        late.append(time.monotonic() - (start + n * 0.01))
        return n < 10

    assert await shared_ticker(0.01).run(start, tick) == 10
    assert min(late) >= 0 and len(late) == 11


async def test_a_stopped_ticker_fails_its_schedules_and_a_new_run_starts_it_again() -> None:
    ticker = Ticker(MonotonicClock(), 0.01)
    ticks: list[int] = []
    waiting = asyncio.create_task(ticker.run(time.monotonic(), lambda n: ticks.append(n) or True))
    await asyncio.sleep(0.05)
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "emulator-ticker"]
    task.cancel()  # whatever stops it, nobody must hang on it
    with pytest.raises(RuntimeError, match="stopped"):
        async with asyncio.timeout(1):
            await waiting
    assert await ticker.run(time.monotonic(), lambda n: n < 3) == 3


def test_a_finished_loop_is_not_kept_alive_by_a_pending_schedule() -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        ticker = shared_ticker(0.02)
        asyncio.create_task(ticker.run(time.monotonic(), lambda n: True))  # noqa: RUF006
        await asyncio.sleep(0.05)  # left running: asyncio.run cancels it on the way out

    asyncio.run(main())
    gc.collect()
    assert loops[0]() is None
