"""A small thread pool that runs the most urgent CPU job first.

Why not ``ThreadPoolExecutor``: its queue is FIFO. When twenty calls start at once, the second
sentence of a call that is already speaking would wait behind nineteen first sentences and the
caller would hear a gap. Here a job carries a priority; lower runs first, ties in submission order.
A job whose awaiting coroutine was cancelled before a worker took it is skipped, so a hang-up frees
the CPU it had queued.

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
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

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

    def __init__(self, workers: int, *, name: str = "callspeak-synth", nice: int = 10) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._nice = nice
        self._queue: queue.PriorityQueue[_Job[Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._closed = False
        # run() checks and queues under it, shutdown() closes and empties under it: a job is
        # either refused or queued before the emptying, never left after the workers have gone.
        self._closing = threading.Lock()
        #: Deferred jobs not queued yet, by id (a job is not hashable); under ``_closing``.
        self._deferred: dict[int, _Job[Any]] = {}
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def queued(self) -> int:
        """Jobs waiting for a worker (an estimate, as with any concurrent queue)."""
        return self._queue.qsize()

    async def run(self, fn: Callable[[], T], *, priority: Priority = (0.0, 0.0)) -> T:
        """Run ``fn`` on a worker, lowest ``priority`` first, and return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._closing:
            if self._closed:
                raise RuntimeError("the synthesis pool is shut down")
            self._queue.put(_Job(priority, next(self._seq), fn, future, loop))
        return await future

    def defer(self, fn: Callable[[], T]) -> Deferred[T]:
        """A job for ``fn``, made now (on the event loop), that :meth:`Deferred.queue` queues
        later (from any thread: the worker running the job before it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job((0.0, 0.0), 0, fn, future, loop)
        with self._closing:
            if self._closed:
                raise RuntimeError("the synthesis pool is shut down")
            self._deferred[id(job)] = job
        # Cancelled before it was queued: forgotten (not held until the pool shuts down).
        future.add_done_callback(lambda _: self._forget_deferred(job))
        return Deferred(self, job)

    def _forget_deferred(self, job: _Job[Any]) -> None:
        with self._closing:
            self._deferred.pop(id(job), None)

    def _queue_deferred(self, job: _Job[Any], priority: Priority) -> None:
        with self._closing:
            if self._deferred.pop(id(job), None) is None:
                return  # queued already, cancelled, or failed by shutdown
            job.priority, job.seq = priority, next(self._seq)
            self._queue.put(job)

    def shutdown(self, *, timeout: float = 5.0) -> None:
        """Fail the queued jobs (their callers get a RuntimeError) and stop the workers; blocks
        up to ``timeout`` in all for the running jobs to end (one deadline for every worker: a
        wait per worker grew with the cores, 5 s each). Workers still busy then end with their
        job, as daemons."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            # (Deferred jobs not queued yet fail too: their callers would wait for good.)
            failed, self._deferred = list(self._deferred.values()), {}
            while True:  # emptied first: the sentinels sort after them, and workers would run them
                try:
                    failed.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for job in failed:
                if job.future is not None and job.loop is not None:
                    # An error, not a cancellation: nobody cancelled the task waiting on it,
                    # which would otherwise end as if it had been (no error to report).
                    error = RuntimeError("the synthesis pool is shut down")
                    try:
                        job.loop.call_soon_threadsafe(_settle, job.future, None, error)
                    except RuntimeError:  # the loop is closed: nobody is waiting
                        pass
        for _ in self._threads:
            # Sentinels sort after every real job priority.
            self._queue.put(_Job((float("inf"), 0.0), next(self._seq), None, None, None))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    async def aclose(self) -> None:
        """:meth:`shutdown` from the event loop: the wait for running jobs to end happens on
        another thread, so the calls still in progress keep being served meanwhile (a long
        sentence being synthesised can take a second)."""
        await asyncio.to_thread(self.shutdown)

    def _work(self) -> None:
        _lower_priority(self._nice)
        while True:
            job = self._queue.get()
            if job.fn is None or job.future is None or job.loop is None:
                return
            if job.future.done():  # cancelled while queued: skip the work
                continue
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                error = exc
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
