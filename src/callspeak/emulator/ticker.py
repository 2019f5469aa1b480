"""One task that runs many fixed-period schedules: the emulator's 20 ms clock for every call.

Each emulated call ticks on its own drift-free schedule, tick ``n`` at ``start + n × period``.
With a task per call sleeping between ticks, 200 calls make 10,000 task wake-ups a second, each
with its timer, future and task step: a fifth of the emulator's CPU in that benchmark, once the
ticks themselves were synchronous. A :class:`Ticker` keeps the schedules in one heap and, each
time it wakes, runs every tick that is due: the event loop's timers have millisecond
granularity (epoll, libuv), so one wake-up serves all the calls due within that millisecond.

What a schedule gets is what a loop of ``sleep``-until-due then tick gives it: tick ``n`` runs
at or after ``start + n × period``, never before; the ticks of one schedule run in order, one at
a time; ticks missed in a stall run back to back, at once — after two turns of the loop, so that
tasks woken by what arrived during the stall (a call reading its socket) run before them. Ticks
of different schedules run in order of due time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from callspeak.clock import Clock, MonotonicClock

__all__ = ["Ticker", "shared_ticker"]

#: A tick: called with its number, returns whether the schedule goes on.
Tick = Callable[[int], bool]


@dataclass(eq=False, slots=True)
class _Schedule:
    start: float
    tick: Tick
    next: int  # the number of the next tick to run
    future: asyncio.Future[int] = field(repr=False)  # run()'s result


class Ticker:
    """Runs schedules of ticks ``period`` seconds apart on ``clock``, from one task per loop."""

    def __init__(self, clock: Clock, period: float) -> None:
        self._clock = clock
        self._period = period
        # (due, order, schedule): the order breaks ties, so schedules are never compared
        self._heap: list[tuple[float, int, _Schedule]] = []
        self._order = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._sleeping_until: float | None = None  # when the task's sleep ends; None: awake

    async def run(self, start: float, tick: Tick, first: int = 0) -> int:
        """Call ``tick(n)`` for n = ``first``, ``first + 1``, … each at ``start + n × period``
        until it returns False (or raises, which ``run`` raises); returns that last ``n``.

        Ticks already due run at once, in the calling task; then the ticker's task runs them.
        Cancelling ``run`` ends the schedule: no tick of it runs after that.
        """
        period, clock = self._period, self._clock
        n = first
        while True:
            now = clock.now()
            while start + n * period <= now:
                if not tick(n):
                    return n
                n += 1
            due = start + n * period
            if self._sleeping_until is None or due >= self._sleeping_until:
                break
            # The task sleeps past this tick (it went to sleep before this schedule came): wait
            # for it here rather than be late, for about one period at most.
            await clock.sleep(due - now)
        schedule = _Schedule(start, tick, n, asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, (due, next(self._order), schedule))
        if self._task is None or self._task.done():  # (a task cancelled before it ever ran)
            self._task = asyncio.create_task(self._run(), name="emulator-ticker")
        try:
            return await schedule.future
        except asyncio.CancelledError:
            # Dropped now rather than when due: a loop that ends meanwhile must not stay
            # referenced from the heap (through the future) after it is gone.
            self._drop(schedule)
            raise

    def _drop(self, schedule: _Schedule) -> None:
        heap = self._heap
        heap[:] = [entry for entry in heap if entry[2] is not schedule]  # in place: _run holds it
        heapq.heapify(heap)

    async def _run(self) -> None:
        heap, clock = self._heap, self._clock
        try:
            while heap:
                now = clock.now()
                delay = heap[0][0] - now
                if delay > 0:
                    # At least a millisecond, the granularity of the loop's timers anyway:
                    # uvloop runs a timer under 0.5 ms at once, and with ticks due every 0.1 ms
                    # (200 calls) the task would spin instead of sleeping.
                    delay = max(delay, 0.001)
                    self._sleeping_until = now + delay
                    try:
                        await clock.sleep(delay)
                    finally:
                        self._sleeping_until = None
                now = clock.now()
                if heap and heap[0][0] < now - self._period:
                    # Woken more than a period late: the loop was held up (this process, not
                    # the server). What the calls received meanwhile is read before the ticks
                    # missed are played back to back — as Twilio, not held up, would have
                    # played it — rather than after them, a gap the server did not make. Two
                    # turns: the socket's data may only be read in the first, after this task
                    # ran in it, and the call's task woken by it runs in the next.
                    for _ in range(2):
                        await asyncio.sleep(0)
                    now = clock.now()
                self._run_due(now)
        finally:
            self._task = None
            # Cancelled (e.g. its loop is shutting down): the schedules still waiting must not
            # hang on a task that is gone.
            for _, _, schedule in heap:
                if not schedule.future.done():
                    schedule.future.set_exception(RuntimeError("the ticker was stopped"))
            heap.clear()

    def _run_due(self, now: float) -> None:
        """Run every tick due by ``now`` (read once: a wake-up's work is bounded even when
        ticks take longer than a period), in order of due time."""
        heap, period, order = self._heap, self._period, self._order
        while heap and heap[0][0] <= now:
            # Nothing else touches the heap meanwhile: ticks are synchronous, run() is async.
            schedule = heap[0][2]
            if schedule.future.done():  # cancelled
                heapq.heappop(heap)
                continue
            n = schedule.next
            try:
                going_on = schedule.tick(n)
            except Exception as exc:
                heapq.heappop(heap)
                schedule.future.set_exception(exc)
                continue
            if not going_on:
                heapq.heappop(heap)
                schedule.future.set_result(n)
                continue
            schedule.next = n + 1
            heapq.heapreplace(heap, (schedule.start + (n + 1) * period, next(order), schedule))


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Ticker]] = (
    weakref.WeakKeyDictionary()
)


def shared_ticker(period: float) -> Ticker:
    """The running loop's ticker for ``period`` on the real clock (:class:`MonotonicClock`),
    shared by everyone who asks for it in that loop."""
    tickers = _shared.setdefault(asyncio.get_running_loop(), {})
    ticker = tickers.get(period)
    if ticker is None:
        ticker = tickers[period] = Ticker(MonotonicClock(), period)
    return ticker
