"""Pacing of outbound audio against an estimate of the caller's playback (pure).

Twilio plays what it receives in order, in real time. Audio sent ahead of playback sits in
Twilio's buffer: a little of it absorbs network jitter and event-loop hiccups; a lot of it is
wasted when the caller interrupts and makes ``clear`` cut more. :class:`Pacer` keeps the lead —
how far the end of the audio sent runs ahead of now — under ``max_lead`` seconds, and tells the
sender how long to wait before the next frame. It assumes playback of a frame starts when it is
sent or when the frame before it ends, whichever is later (a buffer that ran dry restarts at once).
"""

from __future__ import annotations

__all__ = ["Pacer"]


class Pacer:
    def __init__(self, max_lead: float) -> None:
        if max_lead <= 0:
            raise ValueError(f"max_lead must be positive, not {max_lead}")
        self.max_lead = max_lead
        self._play_end = float("-inf")

    def lead(self, now: float) -> float:
        """Seconds of sent audio not yet played at ``now``."""
        return max(0.0, self._play_end - now)

    def delay(self, now: float, seconds: float) -> float:
        """How long to wait before sending ``seconds`` more audio so the lead stays bounded."""
        return max(0.0, self.lead(now) + seconds - self.max_lead)

    def sent(self, now: float, seconds: float) -> float:
        """Record ``seconds`` of audio sent at ``now``; returns when it will have played."""
        self._play_end = max(self._play_end, now) + seconds
        return self._play_end

    def reset(self) -> None:
        """Forget queued audio (after ``clear``: Twilio emptied its buffer)."""
        self._play_end = float("-inf")
