"""Streaming conversion of TTS audio into Twilio's 160-byte μ-law 8 kHz frames.

Pipeline per chunk: strip a WAV header → keep 16-bit samples whole → decode → resample to 8 kHz →
encode μ-law → cut 20 ms frames. Stages a format does not need are skipped, and μ-law 8000 Hz
input is passed through byte for byte, only re-framed (no decode/encode round trip).

The WAV check runs on every stream whatever ``source.container`` says: an engine that ignored
``container=none`` must not make the caller hear its header as a click. When a header is found and
declares a different encoding or rate than ``source``, the header wins — it describes the bytes
that actually follow, while ``source`` is only what was asked for.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from callspeak.audio import mulaw
from callspeak.audio.format import FRAME_BYTES, TWILIO_FORMAT, AudioFormat
from callspeak.audio.framing import Framer, SampleAligner
from callspeak.audio.resample import StreamResampler
from callspeak.audio.wav import WavHeaderStripper, WavInfo

__all__ = ["TwilioAudioConverter", "convert_all"]

_PCM16_LE = np.dtype("<i2")


class _ToMulaw8k:
    """Decoded stage for a non-native format: whole samples → int16 → 8 kHz → μ-law bytes."""

    def __init__(self, fmt: AudioFormat) -> None:
        self._fmt = fmt
        self._aligner = SampleAligner(fmt.bytes_per_sample)
        self._resampler = StreamResampler(fmt.sample_rate, TWILIO_FORMAT.sample_rate)

    def push(self, data: bytes) -> bytes:
        return self._encode(self._resampler.process(self._decode(self._aligner.push(data))))

    def flush(self) -> bytes:
        self._aligner.flush()  # half a sample at the end of a stream is not audio
        return self._encode(self._resampler.flush())

    def _decode(self, data: bytes) -> NDArray[np.int16]:
        if self._fmt.encoding == "mulaw":
            return mulaw.decode(np.frombuffer(data, dtype=np.uint8))
        return np.frombuffer(data, dtype=_PCM16_LE).astype(np.int16, copy=False)

    @staticmethod
    def _encode(samples: NDArray[np.int16]) -> bytes:
        return mulaw.encode(samples).tobytes()


class _Passthrough:
    """Stage for audio that is already μ-law 8000 Hz: bytes go on untouched."""

    def push(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class TwilioAudioConverter:
    """Turn a stream of ``source`` audio, chunked arbitrarily, into μ-law 8 kHz frames.

    :meth:`push` returns the complete ``frame_bytes`` frames ready now (possibly none);
    :meth:`flush` ends the stream and returns the rest, the last frame padded with μ-law silence.
    After :meth:`flush` the converter is reset and takes a new stream of the same ``source``.
    Raises :class:`~callspeak.audio.wav.WavError` for a WAV header it cannot take.
    """

    def __init__(self, source: AudioFormat, *, frame_bytes: int = FRAME_BYTES) -> None:
        self.source = source
        self._frame_bytes = frame_bytes
        self._reset()

    def _reset(self) -> None:
        self._stripper = WavHeaderStripper()
        self._framer = Framer(self._frame_bytes)
        self._stage: _ToMulaw8k | _Passthrough | None = None

    @property
    def header(self) -> WavInfo | None:
        """The WAV header found at the start of the current stream, if any."""
        return self._stripper.info

    @property
    def effective_format(self) -> AudioFormat:
        """The format being converted: the WAV header's if one was found, else ``source``."""
        return self.source if self.header is None else self.header.format

    def push(self, chunk: bytes) -> list[bytes]:
        payload = self._stripper.push(chunk)
        if not payload:
            return []
        return self._framer.push(self._stage_for_stream().push(payload))

    def flush(self) -> list[bytes]:
        held = self._stripper.flush()
        stage = self._stage_for_stream() if held or self._stage else None
        tail = b"" if stage is None else stage.push(held) + stage.flush()
        frames = self._framer.push(tail) + self._framer.flush(pad=True)
        self._reset()
        return frames

    def _stage_for_stream(self) -> _ToMulaw8k | _Passthrough:
        # Chosen on the first payload: by then the stripper knows whether a header was present.
        if self._stage is None:
            fmt = self.effective_format
            self._stage = _Passthrough() if fmt.is_twilio_native else _ToMulaw8k(fmt)
        return self._stage


def convert_all(source: AudioFormat, data: bytes) -> bytes:
    """Convert a whole buffer of ``source`` audio to μ-law 8 kHz, padded to whole frames."""
    converter = TwilioAudioConverter(source)
    return b"".join(converter.push(data) + converter.flush())
