"""What a caller has left to play of the audio already given to it (a voice's ``ahead``).

Pure bookkeeping, no I/O: it shrinks as time passes (never below nothing: a caller who ran dry
has nothing left, not a debt) and grows by the audio handed on. A voice asked for a text is
told how much is left *now*, not when the text was first asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["LeftToPlay"]


class LeftToPlay:
    """Seconds of audio a caller has still to hear, read on ``clock``."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seconds = seconds
        self._at = clock()

    def now(self) -> float:
        """What is left now: the last reading less the time since, or 0."""
        at = self._clock()
        self._seconds, self._at = max(0.0, self._seconds - (at - self._at)), at
        return self._seconds

    def add(self, seconds: float) -> None:
        """``seconds`` more audio handed on now (on top of what is left now)."""
        self._seconds = self.now() + seconds
