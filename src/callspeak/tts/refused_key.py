"""Refused credentials, and when to try them again: the state both Deepgram voices keep.

Deepgram refusing the key (401/403) is for an operator to fix, not a network blip: retrying it
on every call would be a request loop. Yet a balance topped up or a permission granted should
not need a restart. So, once refused, every attempt fails at once with the refusal, except that
``interval`` seconds after the last refusal one attempt is let through: accepted, the key is
good again; refused again, the next is let through an interval later. Pure: the clock is given.
"""

from __future__ import annotations

from collections.abc import Callable

from callspeak.tts.base import TTSAuthError

__all__ = ["RefusedKey"]


class RefusedKey:
    """Whether the key stands refused (``error``), and the one attempt per ``interval``."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self._clock = clock
        #: The last refusal; None while the key is not known to be refused.
        self.error: TTSAuthError | None = None
        self._since = 0.0  # when the refusal was recorded, or an attempt last let through

    def due(self) -> bool:
        """Refused, and ``interval`` seconds have passed: worth trying the key again."""
        return self.error is not None and self._clock() - self._since >= self.interval

    def admit(self) -> None:
        """Let an attempt through: always unless refused; when refused, the first once due
        (the next then an interval later, unless this one is accepted); else raise the refusal."""
        error = self.error
        if error is None:
            return
        if not self.due():
            raise error.copy()  # a copy: the kept one is never raised (see TTSError.copy)
        self._since = self._clock()

    def raise_if_refused(self) -> None:
        """Raise the refusal (a copy of it) if the key stands refused, due or not: for an
        attempt already let through that finds the key refused meanwhile."""
        if self.error is not None:
            raise self.error.copy()

    def refuse(self, error: TTSAuthError) -> None:
        """Deepgram refused the key: attempts fail with ``error`` for an interval. A copy of
        it is kept, and copies of that are raised: ``error`` itself is the caller's to raise,
        and a kept error must never be raised (see :meth:`~callspeak.tts.base.TTSError.copy`)."""
        self.error, self._since = error.copy(), self._clock()

    def accept(self) -> bool:
        """Deepgram accepted the key; True when it stood refused until now."""
        was_refused, self.error = self.error is not None, None
        return was_refused
