"""Twilio's playback buffer for one stream, as a pure data structure.

Audio is played in order, at 8000 bytes a second, a frame per :meth:`PlaybackBuffer.play` (one
call per 20 ms tick: the frame it returns plays until the next tick). A mark is queued at the
position of the audio received before it and echoed once that audio has *finished* playing — at
the first tick after its last frame, never while that frame is still playing; a mark received
while nothing is queued or playing is echoed at once. ``clear`` drops every queued byte and
echoes every pending mark.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

from callspeak.audio.mulaw import MULAW_SILENCE

__all__ = ["MAX_BUFFER_BYTES", "PlaybackBuffer"]

#: Twilio keeps at most 10 minutes of outbound audio (error 31931 beyond that).
MAX_BUFFER_BYTES = 10 * 60 * 8000


@lru_cache(maxsize=8)
def _silence(nbytes: int) -> bytes:
    """``nbytes`` of μ-law silence, made once per length (a frame of it is played 50 times a
    second per idle call)."""
    return bytes([MULAW_SILENCE]) * nbytes


class PlaybackBuffer:
    def __init__(self, max_bytes: int = MAX_BUFFER_BYTES) -> None:
        self._max_bytes = max_bytes
        self._audio = bytearray()
        self._head = 0  # read position in _audio
        self._queued = 0  # bytes ever queued (positions of marks are in this scale)
        self._played = 0  # bytes ever played
        self._marks: deque[tuple[int, str]] = deque()
        self._playing = False  # the frame the last play() returned holds audio, still playing
        self.overflowed_bytes = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet played."""
        return self._queued - self._played

    @property
    def idle(self) -> bool:
        """Nothing received is left to play, and no frame of it is still playing."""
        return self.buffered == 0 and not self._playing

    @property
    def pending_marks(self) -> tuple[str, ...]:
        return tuple(name for _, name in self._marks)

    def add_audio(self, payload: bytes) -> bool:
        """Queue audio; False (and nothing queued) when it would overflow the buffer."""
        if self.buffered + len(payload) > self._max_bytes:
            self.overflowed_bytes += len(payload)
            return False
        self._audio += payload
        self._queued += len(payload)
        return True

    def add_mark(self, name: str) -> list[str]:
        """Queue a mark; returns it at once (to echo) when no audio is queued or playing."""
        if self.idle and not self._marks:
            return [name]
        self._marks.append((self._queued, name))
        return []

    def play(self, nbytes: int) -> tuple[bytes, int, list[str]]:
        """Start playing the next ``nbytes``: (``nbytes`` of audio padded with silence, bytes of
        real audio taken, marks whose audio finished playing by now — with the frames of
        earlier calls, not this one, which plays until the next call)."""
        echoed: list[str] = []
        marks = self._marks
        while marks and marks[0][0] <= self._played:
            echoed.append(marks.popleft()[1])
        take = min(nbytes, self._queued - self._played)
        self._playing = take > 0
        if take:
            chunk = bytes(self._audio[self._head : self._head + take])
            self._head += take
            self._played += take
            if self._head > 64 * 1024:  # compact now and then, not on every frame
                del self._audio[: self._head]
                self._head = 0
            if take < nbytes:
                chunk += _silence(nbytes - take)
        else:  # nothing queued: most ticks of most calls
            chunk = _silence(nbytes)
        return chunk, take, echoed

    def clear(self) -> list[str]:
        """Drop all queued audio; returns every pending mark (Twilio echoes them all)."""
        echoed = [name for _, name in self._marks]
        self._marks.clear()
        self._audio.clear()
        self._head = 0
        self._played = self._queued
        self._playing = False  # playback stops with the buffer
        return echoed
