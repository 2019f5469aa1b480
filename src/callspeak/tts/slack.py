"""Whether a job without a deadline can run before jobs with one and every deadline still hold.

Pure scheduling arithmetic, no threads and no clock: the synthesis pool
(:class:`~callspeak.tts.priority_pool.PriorityPool`) asks it each time a worker is free.

Why: speech that continues what a caller is hearing has a deadline — when the caller's audio runs
out — and a new call's first words have none (they are late already). Running every
continuation first keeps speaking calls from running dry, but a continuation due ten seconds from
now then went before a caller who had heard nothing yet (measured: new callers' median first
audio +30 % with one call speaking five sentences while 20 arrived). Running first words first
whenever the continuations can afford it does both: a continuation waits only while it still has
time to spare.

The estimates are learnt (:class:`RenderCost`: seconds per character, from the renders just
done) and padded (:data:`SAFETY`, :data:`MARGIN`): a render under load takes longer than the
last, and a caller who runs dry hears it, while first words that wait one render more do not.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

__all__ = ["MARGIN", "SAFETY", "RenderCost", "fits_first"]

#: Estimates are multiplied by this before they are compared with deadlines.
SAFETY = 1.5
#: A job with a deadline must finish this many seconds before it (the audio still has to reach
#: the event loop and be framed, and the estimate can be wrong).
MARGIN = 0.25


def fits_first(
    cost: float,
    *,
    now: float,
    deadlines: Iterable[tuple[float, float]],
    busy_until: Sequence[float] = (),
    margin: float = MARGIN,
) -> bool:
    """Whether a job of ``cost`` seconds, started ``now`` on a free worker, leaves every job with a
    deadline finishing ``margin`` before it.

    ``deadlines`` are (due, cost) pairs, in order of due (earliest first: the order the pool
    runs them in); ``busy_until`` is when each of the other workers finishes the job it is
    running (a time before ``now`` counts as now). Each deadline job is given to the worker free
    first, as the pool would. False as soon as one would finish late — also when it is late
    already without the new job (the pool then runs the most urgent first).
    """
    free = [now + cost, *(max(now, t) for t in busy_until)]
    heapq.heapify(free)
    for due, job_cost in deadlines:
        end = heapq.heappop(free) + job_cost
        if end > due - margin:
            return False
        heapq.heappush(free, end)
    return True


class RenderCost:
    """Seconds a job of a given size (characters) takes, learnt from jobs done.

    A render costs about ``rate`` x (characters + :attr:`OVERHEAD`): a short sentence costs more
    per character than a long one (the engine's fixed work per call). The rate is a moving
    average of what renders took, so it follows the machine's load. Unknown (None) until one
    was observed: the pool then runs deadline jobs first, as it always did.
    """

    #: Characters' worth of fixed work per render.
    OVERHEAD = 20.0
    #: Weight of the newest observation in the moving average.
    WEIGHT = 0.25

    def __init__(self, rate: float | None = None) -> None:
        """``rate``: seconds per character to start from (None: unknown until observed)."""
        self._rate = rate

    @property
    def rate(self) -> float | None:
        return self._rate

    def observe(self, size: float, seconds: float) -> None:
        """A job of ``size`` characters took ``seconds``."""
        rate = max(0.0, seconds) / (max(0.0, size) + self.OVERHEAD)
        self._rate = rate if self._rate is None else self._rate + self.WEIGHT * (rate - self._rate)

    def estimate(self, size: float) -> float | None:
        """Padded seconds (x :data:`SAFETY`) a job of ``size`` characters will take; None
        while nothing was observed."""
        if self._rate is None:
            return None
        return SAFETY * self._rate * (max(0.0, size) + self.OVERHEAD)
