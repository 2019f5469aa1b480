"""A small thread pool that runs the most urgent CPU job first.

Why not ``ThreadPoolExecutor``: its queue is FIFO. When twenty calls start at once, the second
sentence of a call that is already speaking would wait behind nineteen first sentences and the
caller would hear a gap. Here a job carries a priority; lower runs first, ties in submission order.
A job whose awaiting coroutine was cancelled before a worker took it is skipped, so a hang-up frees
the CPU it had queued.

Priorities of class 0, ``(0.0, due)``, are deadlines: ``due`` is a time on the monotonic clock
by which the job should be done (a caller runs out of audio then). Every other class has none.
A free worker takes the earliest deadline first, except that the first job of the other classes
goes before them when they can all still be done in time after it (:mod:`callspeak.tts.slack`:
costs learnt from the sizes given to :meth:`PriorityPool.run` and how long those jobs took). A
job without a size, or while nothing was learnt, never goes before a deadline.

Worker threads run at a lower CPU priority (nice +10 on Linux): synthesis competes for the CPU
with other synthesis, never with the event loop that paces every call's audio.

Contract: :meth:`PriorityPool.run` is awaited on the event loop; the callable runs on a worker
thread and must not touch the loop. :meth:`PriorityPool.shutdown` stops the workers after the jobs
they are running (queued jobs, and deferred ones not queued yet, fail with a RuntimeError);
:meth:`PriorityPool.aclose` does so without blocking the event loop.

A job can also be made now and queued later (:meth:`PriorityPool.defer`): a caller that knows
what it will need next has the job queued, from the worker thread, by the job before it — so the
worker that finishes one piece of a call's speech finds the next in the queue, rather than
taking a new call's first words in the moment before the event loop could ask for it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from callspeak.tts.slack import RenderCost, fits_first

__all__ = ["Deferred", "Priority", "PriorityPool"]

T = TypeVar("T")


#: Lower runs first; compared element by element.
Priority = tuple[float, float]


@dataclass(order=True)
class _Job(Generic[T]):
    priority: Priority
    seq: int
    fn: Callable[[], T] | None = field(compare=False)
    future: asyncio.Future[T] | None = field(compare=False)
    loop: asyncio.AbstractEventLoop | None = field(compare=False)
    #: Characters (or any unit of work :class:`RenderCost` learns); None: unknown.
    size: float | None = field(default=None, compare=False)

    @property
    def due(self) -> float | None:
        """The deadline of a class-0 job; None for the other classes."""
        return self.priority[1] if self.priority[0] == 0.0 else None

    def dropped(self) -> bool:
        """Cancelled (or failed) before a worker took it: nobody waits for its result."""
        return self.future is not None and self.future.done()


class Deferred(Generic[T]):
    """A job of a :class:`PriorityPool` made but not queued yet (see :meth:`PriorityPool.defer`).

    :attr:`future` gets its result. :meth:`queue` queues it, from any thread, once (later calls
    do nothing). Cancelling the future before a worker takes the job drops it: no worker runs it
    (one already running it finishes, and its result is dropped). A pool that shuts down first
    fails it, as a queued job."""

    def __init__(self, pool: PriorityPool, job: _Job[T]) -> None:
        self._pool = pool
        self._job = job

    @property
    def future(self) -> asyncio.Future[T]:
        assert self._job.future is not None
        return self._job.future

    def queue(self, priority: Priority) -> None:
        """Queue the job at ``priority`` (safe from a worker thread: nothing touches the loop)."""
        self._pool._queue_deferred(self._job, priority)


class PriorityPool:
    """``workers`` threads taking jobs from one priority queue."""

    def __init__(
        self,
        workers: int,
        *,
        name: str = "callspeak-synth",
        nice: int = 10,
        cost: RenderCost | None = None,
    ) -> None:
        """``cost``: what jobs cost, learnt as they run (a new :class:`RenderCost` by default;
        given one that knows a rate, the pool starts from it)."""
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._nice = nice
        self._cost = cost if cost is not None else RenderCost()
        self._seq = itertools.count()
        self._closed = False
        # Guards everything below. run() checks and queues under it, shutdown() closes and
        # empties under it: a job is either refused or queued before the emptying, never left
        # after the workers have gone. Workers wait on it for jobs.
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        #: Queued class-0 jobs (deadlines), and the others: heaps, lowest priority first.
        self._deadlines: list[_Job[Any]] = []
        self._others: list[_Job[Any]] = []
        #: Deferred jobs not queued yet, by id (a job is not hashable).
        self._deferred: dict[int, _Job[Any]] = {}
        #: When each busy worker is expected to finish its job (monotonic), by worker.
        self._busy_until: dict[int, float] = {}
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def queued(self) -> int:
        """Jobs waiting for a worker (cancelled ones included until a worker skips them)."""
        with self._lock:
            return len(self._deadlines) + len(self._others)

    async def run(
        self, fn: Callable[[], T], *, priority: Priority = (0.0, 0.0), size: float | None = None
    ) -> T:
        """Run ``fn`` on a worker, lowest ``priority`` first (see the module docstring for
        deadlines), and return its result. ``size``: how much work it is (for Piper, the
        characters of the sentence), from which the pool learns what jobs cost."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the synthesis pool is shut down")
            self._push(_Job(priority, next(self._seq), fn, future, loop, size))
        return await future

    def defer(self, fn: Callable[[], T], *, size: float | None = None) -> Deferred[T]:
        """A job for ``fn``, made now (on the event loop), that :meth:`Deferred.queue` queues
        later (from any thread: the worker running the job before it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job((0.0, 0.0), 0, fn, future, loop, size)
        with self._lock:
            if self._closed:
                raise RuntimeError("the synthesis pool is shut down")
            self._deferred[id(job)] = job
        # Cancelled before it was queued: forgotten (not held until the pool shuts down).
        future.add_done_callback(lambda _: self._forget_deferred(job))
        return Deferred(self, job)

    def _forget_deferred(self, job: _Job[Any]) -> None:
        with self._lock:
            self._deferred.pop(id(job), None)

    def _queue_deferred(self, job: _Job[Any], priority: Priority) -> None:
        with self._lock:
            if self._deferred.pop(id(job), None) is None:
                return  # queued already, cancelled, or failed by shutdown
            job.priority, job.seq = priority, next(self._seq)
            self._push(job)

    def _push(self, job: _Job[Any]) -> None:
        """Queue ``job`` and wake a worker (under the lock)."""
        heapq.heappush(self._deadlines if job.due is not None else self._others, job)
        self._ready.notify()

    def shutdown(self, *, timeout: float = 5.0) -> None:
        """Fail the queued jobs (their callers get a RuntimeError) and stop the workers; blocks
        up to ``timeout`` in all for the running jobs to end (one deadline for every worker: a
        wait per worker grew with the cores, 5 s each). Workers still busy then end with their
        job, as daemons."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # (Deferred jobs not queued yet fail too: their callers would wait for good.)
            failed = [*self._deferred.values(), *self._deadlines, *self._others]
            self._deferred, self._deadlines, self._others = {}, [], []
            self._ready.notify_all()
        for job in failed:
            if job.future is not None and job.loop is not None:
                # An error, not a cancellation: nobody cancelled the task waiting on it, which
                # would otherwise end as if it had been (no error to report).
                error = RuntimeError("the synthesis pool is shut down")
                try:
                    job.loop.call_soon_threadsafe(_settle, job.future, None, error)
                except RuntimeError:  # the loop is closed: nobody is waiting
                    pass
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    async def aclose(self) -> None:
        """:meth:`shutdown` from the event loop: the wait for running jobs to end happens on
        another thread, so the calls still in progress keep being served meanwhile (a long
        sentence being synthesised can take a second)."""
        await asyncio.to_thread(self.shutdown)

    def _take(self, worker: int) -> _Job[Any] | None:
        """The job ``worker`` runs next, or None when none is queued (under the lock).

        The earliest deadline, unless the first job without one fits before them all."""
        for heap in (self._deadlines, self._others):
            while heap and heap[0].dropped():  # cancelled while queued: skip the work
                heapq.heappop(heap)
        if not self._deadlines or not self._others:
            heap = self._deadlines or self._others
            return heapq.heappop(heap) if heap else None
        if self._fits_first(self._others[0], worker):
            return heapq.heappop(self._others)
        return heapq.heappop(self._deadlines)

    def _fits_first(self, job: _Job[Any], worker: int) -> bool:
        """Whether every queued deadline holds with ``job`` run first (under the lock)."""
        estimate = self._cost.estimate
        cost = None if job.size is None else estimate(job.size)
        if cost is None:
            return False
        deadlines: list[tuple[float, float]] = []
        for queued in sorted(self._deadlines):
            if queued.dropped():
                continue
            queued_cost = None if queued.size is None else estimate(queued.size)
            if queued_cost is None or queued.due is None:
                return False
            deadlines.append((queued.due, queued_cost))
        others = [t for w, t in self._busy_until.items() if w != worker]
        return fits_first(cost, now=time.monotonic(), deadlines=deadlines, busy_until=others)

    def _work(self, worker: int) -> None:
        _lower_priority(self._nice)
        while True:
            with self._lock:
                while (job := self._take(worker)) is None:
                    if self._closed:
                        return
                    self._ready.wait()
                started = time.monotonic()
                cost = None if job.size is None else self._cost.estimate(job.size)
                self._busy_until[worker] = started + (cost or 0.0)
            assert job.fn is not None and job.future is not None and job.loop is not None
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                error = exc
            with self._lock:
                del self._busy_until[worker]
                if job.size is not None and error is None:
                    self._cost.observe(job.size, time.monotonic() - started)
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # the loop closed while the job ran: nobody is waiting
                pass


def _settle(future: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if future.done():  # the awaiting coroutine was cancelled meanwhile
        return
    if exc is not None:
        if isinstance(exc, StopIteration):  # a future refuses it (TypeError): never settled
            wrapped = RuntimeError(f"the job raised {exc!r}")
            wrapped.__cause__ = exc
            exc = wrapped
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def _lower_priority(nice: int) -> None:
    """Make the calling thread (and threads it starts, e.g. ONNX Runtime's) yield the CPU.

    On Linux a thread is a schedulable task with its own nice value, inherited by threads it
    creates. Synthesis at nice 10 gets the CPU only when the event loop (nice 0) does not want
    it, so a busy synthesis pool cannot delay a call's 20 ms frames. Lowering priority needs no
    privilege; where it is not supported it is skipped.
    """
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError:
        pass
