"""How many requests a Deepgram voice keeps in progress at once: the project's concurrency limit,
kept on our side so that Deepgram never has to refuse one (429).

Deepgram limits requests in progress per project — for Aura over REST, and again for Aura's
streaming sockets, 15 each on its Pay as You Go and Growth plans (its "API Rate Limits" page) —
and answers 429 past the limit. A 429 then rests the voice for every call
(:mod:`~callspeak.tts.too_many_requests`), so one request too many sends all new speech to the
fallback voice for a second or more. With the limit known (``CALLSPEAK_DEEPGRAM_MAX_CONCURRENT``)
only the request that finds every slot taken waits, and only it goes to the next voice if none
frees in time.

:class:`RequestSlots` is a bounded semaphore with a bounded wait, first come first served, and
no limit at all when ``limit`` is None. Every waiter is a call's one stream in progress, so the
waiters are bounded by the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable

__all__ = ["SLOT_AHEAD_MARGIN", "SLOT_WAIT", "RequestSlots", "slot_wait"]

_log = logging.getLogger(__name__)

#: The shortest a request waits for a slot before the next voice speaks: Deepgram renders a
#: sentence in well under a second, so with every slot taken one usually frees within it.
SLOT_WAIT = 1.0
#: Seconds of a call's audio still to play (``ahead``) kept free when waiting longer than
#: :data:`SLOT_WAIT`: room for Deepgram's first byte once a slot is taken.
SLOT_AHEAD_MARGIN = 0.5
#: Seconds between two warnings that the limit was reached.
_WARN_EVERY = 60.0


def slot_wait(ahead: float) -> float:
    """How long a request may wait for a slot: :data:`SLOT_WAIT`, or longer while the call has
    more than that still to play (``ahead`` seconds, less :data:`SLOT_AHEAD_MARGIN`): a wait the
    caller does not hear."""
    return max(SLOT_WAIT, ahead - SLOT_AHEAD_MARGIN)


class RequestSlots:
    """At most ``limit`` holders at once (None: any number).

    When the limit is first reached (then at most once a minute, on ``clock``) a warning says
    so: "``name``: all N ``what`` the limit allows are ``state``…: ``then``", e.g. "deepgram:
    all 15 requests the limit allows are in progress (…): more speech waits…".
    """

    def __init__(
        self,
        limit: int | None,
        name: str,
        *,
        clock: Callable[[], float],
        what: tuple[str, str] = ("request", "requests"),
        state: str = "in progress",
        then: str = "more speech waits for one to end",
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"a limit of requests in progress must be 1 or more, not {limit}")
        self.limit = limit
        self._name = name
        self._what, self._state, self._then = what, state, then
        self._clock = clock
        self._warned_at = -math.inf
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Holders now.
        self.in_use = 0
        #: The most holders there ever were at once.
        self.peak = 0

    def full(self) -> bool:
        """Every slot is taken: one more holder would have to wait (never, without a limit)."""
        return self.limit is not None and self.in_use >= self.limit

    def try_acquire(self) -> bool:
        """Take a slot if one is free now and nobody waits for one; never waits."""
        if self.full() or self._waiters:
            self.note_full()
            return False
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)
        return True

    async def acquire(self, wait: float) -> bool:
        """Take a slot, waiting at most ``wait`` seconds, first come first served. False when
        none freed in time; cancelled while waiting, it holds none."""
        if self.try_acquire():
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as it gave up: on to the next
            else:
                waiter.cancel()
                # Still queued, unless a release() passed over it: cancelled before this task
                # resumed (a barge-in, or its wait's end), in the iteration a slot freed.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True  # handed over by release(): counted in in_use already

    def release(self) -> None:
        """Give a slot back (exactly once per slot taken): to the first waiter, if any."""
        if self.in_use <= 0:
            raise RuntimeError("RequestSlots released more often than acquired")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: in_use stays
                return
        self.in_use -= 1

    def note_full(self) -> None:
        """Warn that the limit was reached: at most once a minute (see the class docstring)."""
        now = self._clock()
        if now - self._warned_at < _WARN_EVERY:
            return
        self._warned_at = now
        one, many = self._what
        _log.warning(
            "%s: %s %d %s the limit allows %s %s (CALLSPEAK_DEEPGRAM_MAX_CONCURRENT; "
            "Deepgram's own, per project, is 15 on Pay as You Go and Growth): %s; raise it if "
            "your plan allows more",
            self._name,
            "the" if self.in_use == 1 else "all",
            self.in_use,
            one if self.in_use == 1 else many,
            "is" if self.in_use == 1 else "are",
            self._state,
            self._then,
        )
