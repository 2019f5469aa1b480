"""Audio format descriptions shared by TTS providers and the audio path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TWILIO_FORMAT", "FRAME_BYTES", "FRAME_SECONDS", "AudioFormat", "Encoding"]

Encoding = Literal["mulaw", "linear16"]

#: One Twilio media frame: 20 ms of 8 kHz mono μ-law is 160 bytes.
FRAME_BYTES = 160
FRAME_SECONDS = 0.020


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """What a stream of audio bytes holds.

    ``linear16`` is little-endian signed 16-bit PCM, mono. ``container="wav"`` means the stream
    may start with a RIFF/WAVE header, which must be stripped before the bytes reach a caller.
    """

    encoding: Encoding
    sample_rate: int
    container: Literal["none", "wav"] = "none"

    @property
    def bytes_per_sample(self) -> int:
        return 1 if self.encoding == "mulaw" else 2

    @property
    def is_twilio_native(self) -> bool:
        """True when bytes can go to Twilio untouched (only re-framed)."""
        return self.encoding == "mulaw" and self.sample_rate == 8000


#: What Twilio bidirectional Media Streams carry: raw μ-law, 8000 Hz, mono, no header.
TWILIO_FORMAT = AudioFormat("mulaw", 8000)
