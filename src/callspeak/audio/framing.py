"""Cutting a byte stream with arbitrary chunk boundaries into fixed units.

* :class:`Framer` cuts μ-law into Twilio's 20 ms frames (160 bytes), carrying any remainder to the
  next push. Only :meth:`Framer.flush` emits a short frame, padded with μ-law silence.
* :class:`SampleAligner` keeps multi-byte PCM samples whole when a chunk ends mid-sample (a TTS
  engine may split a 16-bit sample across two network chunks; decoding the halves separately would
  shift every later sample by one byte and turn speech into loud noise).

Both are pure: bytes in, bytes out; concatenating everything they return gives back what was pushed
(plus padding when asked).
"""

from __future__ import annotations

from callspeak.audio.format import FRAME_BYTES
from callspeak.audio.mulaw import MULAW_SILENCE

__all__ = ["Framer", "SampleAligner"]


class Framer:
    """Cut a stream into ``frame_bytes``-byte frames, carrying the remainder between pushes."""

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        if frame_bytes <= 0:
            raise ValueError(f"frame_bytes must be positive, got {frame_bytes}")
        self.frame_bytes = frame_bytes
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back because they do not fill a frame yet (always < ``frame_bytes``)."""
        return len(self._buffer)

    def push(self, data: bytes) -> list[bytes]:
        """The complete frames now available, in order; possibly none."""
        self._buffer += data
        size = self.frame_bytes
        end = len(self._buffer) - len(self._buffer) % size
        frames = [bytes(self._buffer[i : i + size]) for i in range(0, end, size)]
        del self._buffer[:end]
        return frames

    def flush(self, *, pad: bool = True) -> list[bytes]:
        """The remainder as one last frame, or ``[]`` when nothing is held.

        With ``pad`` the frame is filled to ``frame_bytes`` with :data:`MULAW_SILENCE` (so the
        padding is only silent for μ-law streams); without it the short frame is returned as is.
        The framer is empty afterwards and can take a new stream.
        """
        if not self._buffer:
            return []
        frame = bytes(self._buffer)
        self._buffer.clear()
        if pad:
            frame += bytes([MULAW_SILENCE]) * (self.frame_bytes - len(frame))
        return [frame]


class SampleAligner:
    """Pass on whole ``sample_width``-byte samples only, carrying a partial sample forward."""

    def __init__(self, sample_width: int = 2) -> None:
        if sample_width <= 0:
            raise ValueError(f"sample_width must be positive, got {sample_width}")
        self.sample_width = sample_width
        self._carry = b""

    @property
    def pending(self) -> int:
        """Bytes of a partial sample held back (always < ``sample_width``)."""
        return len(self._carry)

    def push(self, data: bytes) -> bytes:
        """The whole samples now available (a multiple of ``sample_width`` bytes, maybe empty)."""
        if self._carry:
            data = self._carry + data
        cut = len(data) - len(data) % self.sample_width
        self._carry = data[cut:]
        return data[:cut] if cut < len(data) else data

    def flush(self) -> bytes:
        """End the stream: return the dangling partial sample (``b""`` if none) and forget it.

        Those bytes are not a whole sample, so audio consumers should drop them; they are returned
        rather than silently discarded so a caller can log a stream that ended mid-sample.
        """
        carry, self._carry = self._carry, b""
        return carry
