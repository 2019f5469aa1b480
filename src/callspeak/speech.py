"""What a call was asked to say, and what the caller heard of it (pure bookkeeping).

An :class:`Utterance` is one ``say``: its text split into sentences. Each sentence's audio is
followed by a mark; the mark's echo is the only evidence that the sentence was *heard*. The
record below is built from those echoes and from ``clear``: sentences fully heard, the sentence
cut (with roughly how many seconds of it played, estimated from when its audio started playing),
and sentences never played.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HeardRecord", "SpeechStatus", "Utterance", "mark_name", "parse_mark_name"]


class SpeechStatus(enum.Enum):
    QUEUED = "queued"
    SPEAKING = "speaking"
    PLAYED = "played"
    INTERRUPTED = "interrupted"  # cleared, or the call ended, after some of its audio was sent
    CANCELLED = "cancelled"  # cleared, or the call ended, before any of its audio was sent
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self not in (SpeechStatus.QUEUED, SpeechStatus.SPEAKING)


def mark_name(generation: int, utterance_id: int, sentence: int) -> str:
    """``g{generation}.u{utterance}.s{sentence}``: unique within a call, readable in logs."""
    return f"g{generation}.u{utterance_id}.s{sentence}"


def parse_mark_name(name: str) -> tuple[int, int, int] | None:
    """Inverse of :func:`mark_name`; None for a name this module did not make."""
    parts = name.split(".")
    if len(parts) != 3 or [p[:1] for p in parts] != ["g", "u", "s"]:
        return None
    try:
        return int(parts[0][1:]), int(parts[1][1:]), int(parts[2][1:])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class HeardRecord:
    heard: tuple[str, ...]
    cut: str | None
    cut_seconds: float | None
    unheard: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "heard": list(self.heard),
            "cut": self.cut,
            "cutSeconds": None if self.cut_seconds is None else round(self.cut_seconds, 3),
            "unheard": list(self.unheard),
        }


@dataclass(eq=False)
class Utterance:
    """One ``say``. ``id`` is unique within the call; ``sentences`` are spoken in order."""

    id: int
    text: str
    sentences: tuple[str, ...]
    interruptible: bool
    requested_at: float
    status: SpeechStatus = SpeechStatus.QUEUED
    #: When its turn came: the speaker took it from the queue (the speech before it done).
    speaking_at: float | None = None
    first_audio_at: float | None = None
    #: Per sentence: seconds of audio sent, and when its playback is estimated to start.
    sent_seconds: list[float] = field(default_factory=list)
    play_starts: list[float | None] = field(default_factory=list)
    heard_count: int = 0
    record: HeardRecord | None = None
    error: str | None = None
    #: The sentence whose audio was an apology (every voice failed it): never reported cut.
    apology_at: int | None = None
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.sent_seconds = [0.0] * len(self.sentences)
        self.play_starts = [None] * len(self.sentences)

    async def wait(self) -> SpeechStatus:
        """Wait until the utterance is played, interrupted, cancelled or failed."""
        await self._done.wait()
        return self.status

    def sentence_heard(self, index: int) -> bool:
        """Record a played mark; True when that completes the utterance."""
        self.heard_count = max(self.heard_count, index + 1)
        if self.heard_count >= len(self.sentences) and not self.status.final:
            self.finish(SpeechStatus.PLAYED)
            return True
        return False

    def heard_after_failing(self, index: int) -> bool:
        """Sentence ``index`` of this failed utterance was heard: its mark echoed, played, after
        the failure (its audio was still in Twilio's buffer then). Updates the record; False if
        that was known already."""
        if index < self.heard_count:
            return False
        self.heard_count = index + 1
        self.record = self._heard_so_far()
        return True

    def interrupt(self, now: float) -> HeardRecord:
        """Close the record at a ``clear`` sent at ``now``: ``interrupted``, or ``cancelled``
        when none of its audio was sent, or ``failed`` (its ``error`` kept) when its voice had
        already failed — what was stopped then is what it sent before failing, or the apology.
        An utterance already ended keeps its status and record (returned)."""
        if self.status.final:
            assert self.record is not None  # finish() made it
            return self.record
        heard = self.sentences[: self.heard_count]
        rest = self.sentences[self.heard_count :]
        cut: str | None = None
        cut_seconds: float | None = None
        if rest and self.status is SpeechStatus.SPEAKING and self.heard_count != self.apology_at:
            start = self.play_starts[self.heard_count]
            sent = self.sent_seconds[self.heard_count]
            # None of it sent, or less than a frame of it played: the caller heard none of it.
            if start is not None and sent > 0 and now - start >= 0.02:
                cut = rest[0]
                cut_seconds = min(now - start, sent)
                rest = rest[1:]
        self.record = HeardRecord(heard, cut, cut_seconds, rest)
        if self.error is not None:
            self.finish(SpeechStatus.FAILED, error=self.error)
            return self.record
        # Speaking with no audio sent yet is still "cancelled": the caller heard none of it.
        started = self.first_audio_at is not None
        self.finish(SpeechStatus.INTERRUPTED if started else SpeechStatus.CANCELLED)
        return self.record

    def finish(self, status: SpeechStatus, error: str | None = None) -> None:
        if self.status.final:
            return
        self.status = status
        self.error = error
        if self.record is None:
            self.record = self._heard_so_far()
        self._done.set()

    def _heard_so_far(self) -> HeardRecord:
        """The sentences whose marks echoed played as heard, none cut, the rest unheard."""
        count = self.heard_count
        return HeardRecord(self.sentences[:count], None, None, self.sentences[count:])

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "status": self.status.value,
            "interruptible": self.interruptible,
            "sentences": list(self.sentences),
            **({"record": self.record.to_dict()} if self.record else {}),
            **({"error": self.error} if self.error else {}),
        }
