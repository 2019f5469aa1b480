"""Sample-rate conversion on libsoxr, for whole buffers and for streams cut at arbitrary points.

:class:`StreamResampler` keeps the filter state between chunks, so feeding a signal in pieces gives
(to within float rounding) the same samples as resampling it whole — no clicks at chunk joins.
The resampler has an algorithmic delay: early calls may return fewer samples than the ratio
suggests, and :meth:`StreamResampler.flush` returns the held-back tail at the end of the stream.

Samples are 1-D mono arrays of ``float32`` (nominally in [-1, 1]) or native ``int16``; output has
the input's dtype (soxr clips ``int16`` output on overflow). ``int16`` output also carries libsoxr's
default TPDF dither: digital silence comes out as -1/0/+1, and a stream fed in pieces matches the
whole to within 2 LSB rather than exactly (the ``float32`` path is undithered and exact).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import soxr
from numpy.typing import NDArray

__all__ = ["StreamResampler", "resample_once"]

Samples = TypeVar("Samples", NDArray[np.float32], NDArray[np.int16])

_SUPPORTED = (np.dtype(np.float32), np.dtype(np.int16))


def _check_samples(samples: NDArray[Any]) -> None:
    if samples.ndim != 1:
        raise ValueError(f"expected mono 1-D samples, got shape {samples.shape}")
    if samples.dtype not in _SUPPORTED:
        raise TypeError(f"expected float32 or int16 samples, got {samples.dtype}")


def _check_rates(in_rate: int, out_rate: int) -> None:
    if in_rate <= 0 or out_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")


class StreamResampler:
    """Resample one mono stream chunk by chunk, ``in_rate`` → ``out_rate`` Hz.

    The sample dtype (``float32`` or ``int16``) is fixed by the first :meth:`process` call, because
    libsoxr's stream is built for one dtype; a later chunk of another dtype raises TypeError.
    When ``in_rate == out_rate`` chunks pass through unchanged (the same array object is returned).
    :meth:`flush` ends the stream and resets the filter, so the object can take a new stream of
    the same dtype. ``quality`` is a libsoxr preset: ``"QQ"``, ``"LQ"``, ``"MQ"``, ``"HQ"``,
    ``"VHQ"``.
    """

    def __init__(self, in_rate: int, out_rate: int, *, quality: str = "HQ") -> None:
        _check_rates(in_rate, out_rate)
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.quality = quality
        self._dtype: np.dtype[Any] | None = None
        self._stream: Any = None  # soxr.ResampleStream, built on the first chunk

    @property
    def dtype(self) -> np.dtype[Any] | None:
        """The sample dtype fixed by the first :meth:`process` call, or None before it."""
        return self._dtype

    @property
    def passthrough(self) -> bool:
        return self.in_rate == self.out_rate

    def process(self, samples: Samples) -> Samples:
        """Resampled output for the next chunk (possibly empty while the filter fills)."""
        _check_samples(samples)
        if self._dtype is None:
            self._dtype = samples.dtype
            if not self.passthrough:
                self._stream = soxr.ResampleStream(
                    self.in_rate, self.out_rate, 1, dtype=samples.dtype, quality=self.quality
                )
        elif samples.dtype != self._dtype:
            raise TypeError(f"this stream carries {self._dtype}, got a {samples.dtype} chunk")
        if self._stream is None:
            return samples
        out: Samples = self._stream.resample_chunk(samples)
        return out

    def flush(self) -> NDArray[Any]:
        """The tail held in the filter; empty in passthrough or if nothing was processed.

        Before any :meth:`process` call the dtype is unknown and an empty ``float32`` array is
        returned.
        """
        if self._stream is None:
            return np.zeros(0, dtype=self._dtype or np.float32)
        tail: NDArray[Any] = self._stream.resample_chunk(np.zeros(0, self._dtype), last=True)
        self._stream.clear()
        return tail


def resample_once(samples: Samples, in_rate: int, out_rate: int) -> Samples:
    """Resample a whole mono buffer (HQ). Returns ``samples`` itself when the rates are equal."""
    _check_samples(samples)
    _check_rates(in_rate, out_rate)
    if in_rate == out_rate:
        return samples
    out: Samples = soxr.resample(samples, in_rate, out_rate, quality="HQ")
    return out
