"""Deepgram said "too many requests" (429): how long the voice rests. Pure but for the log line
:func:`note_refusal` writes: the clock is given.

Deepgram limits how many requests a project has in progress at once (its concurrency limit,
per project, not per key) and answers 429 past it. Sending the same request again at once, or
every other call's next sentence, would only add to the load it just refused, at the moment it
refused it. So a 429 rests the voice for every call: for the ``Retry-After`` the answer gave,
but at least :data:`DEFAULT_REST` (a ``Retry-After: 0``, or a date already past on a skewed
clock, would otherwise be no rest at all) and at most :data:`LONGEST_REST`. Meanwhile the REST
voice is skipped by a fallback chain (its next voice speaks, no request is sent), which does not
retry the refused request on it either; the WebSocket voice opens no socket (a call with one open
goes on speaking on it). The voice stays healthy: this is load, not a setting to fix.
"""

from __future__ import annotations

import email.utils
import logging
import math
from collections.abc import Callable

__all__ = [
    "DEFAULT_REST",
    "LONGEST_REST",
    "TooManyRequests",
    "note_refusal",
    "parse_retry_after",
    "rest_for",
]

_log = logging.getLogger(__name__)

#: Seconds a voice rests after a 429 that gave no ``Retry-After``, and the shortest rest: about
#: one request's life (a sentence streams in well under a second), so those in progress ended.
DEFAULT_REST = 1.0
#: The longest rest a ``Retry-After`` can ask for here: past it the voice is tried again anyway.
LONGEST_REST = 60.0
#: The warning when a rest starts (with the voice's name and the rest's seconds).
_RESTING_LOG = (
    "%s: Deepgram refused a request as too many at once for the project (429); resting %.1f s"
    " (new requests, or sockets, go to the next voice meanwhile)"
)


def parse_retry_after(value: str | None, now: Callable[[], float]) -> float | None:
    """Seconds from a ``Retry-After`` header's value (delay-seconds, or an HTTP date, RFC 9110
    §10.2.3; ``now`` gives the wall clock's time, for a date), 0 or more; None when absent or
    unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # a date without a zone is not HTTP's form
            return None
        seconds = when.timestamp() - now()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def rest_for(retry_after: float | None) -> float:
    """The seconds a 429 answered with ``retry_after`` (None: not said) rests the voice."""
    if retry_after is None:
        return DEFAULT_REST
    return min(max(retry_after, DEFAULT_REST), LONGEST_REST)


class TooManyRequests:
    """When the voice rests until, after the last 429 (see the module docstring)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._until = -math.inf

    def refused(self, retry_after: float | None) -> bool:
        """Record a 429 answered with ``retry_after`` seconds (None: not said). The rest ends
        at the later of the one under way and this one. True when this starts a rest (none was
        under way): the moment to say so in the log, once."""
        now = self._clock()
        starts = now >= self._until
        self._until = max(self._until, now + rest_for(retry_after))
        return starts

    def resting(self) -> bool:
        """True until the rest of the last 429 is over."""
        return self._clock() < self._until

    def remaining(self) -> float:
        """Seconds left of the rest; 0 when none is under way."""
        return max(0.0, self._until - self._clock())


def note_refusal(rest: TooManyRequests, name: str, retry_after: float | None) -> None:
    """Record a 429 answered to the voice ``name`` (both Deepgram voices call this), with a
    warning when it starts a rest: one line a rest, however many calls are refused in it."""
    if rest.refused(retry_after):
        _log.warning(_RESTING_LOG, name, rest.remaining())
