"""G.711 μ-law, bit-exact with the ITU-T G.191 reference (``ulaw_compress`` / ``ulaw_expand``).

Twilio Media Streams carry raw μ-law at 8000 Hz, so every sample we send passes through
:func:`encode`. The reference algorithm (ITU-T STL ``g711.c``):

* compress: take the 14 most significant bits (``x >> 2``), use the one's complement for negative
  samples (so ``-1`` lands on the same magnitude as ``0``), add the bias 33, clip to ``0x1FFF``,
  then split into segment and mantissa and invert the bits;
* expand: the standard table — code ``0x00`` → -32124, ``0x80`` → 32124, ``0x7F``/``0xFF`` → 0.

Both directions are lookup tables built once at import (65,536 entries to encode, 256 to decode),
so a call is one numpy fancy-index. Byte-level helpers take and return little-endian PCM16.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MULAW_SILENCE",
    "decode",
    "encode",
    "float_to_mulaw",
    "mulaw_to_pcm16",
    "pcm16_to_mulaw",
]

#: The μ-law code for a zero sample (what Twilio plays as silence).
MULAW_SILENCE: int = 0xFF

_PCM16_LE = np.dtype("<i2")


def _build_encode_table() -> NDArray[np.uint8]:
    """Vectorised ``ulaw_compress`` over every int16, indexed by the sample's uint16 bit pattern."""
    linear = np.arange(1 << 16, dtype=np.uint16).view(np.int16).astype(np.int32)
    absno = np.where(linear < 0, (~linear) >> 2, linear >> 2) + 33
    absno = np.minimum(absno, 0x1FFF)
    # segno = 1 + bit length of (absno >> 6); absno >> 6 is at most 127, so seven steps suffice.
    segno = np.ones_like(absno)
    rest = absno >> 6
    for _ in range(7):
        segno += rest != 0
        rest >>= 1
    high_nibble = 0x8 - segno
    low_nibble = 0xF - ((absno >> segno) & 0xF)
    code = (high_nibble << 4) | low_nibble
    code = np.where(linear >= 0, code | 0x80, code)
    table: NDArray[np.uint8] = code.astype(np.uint8)
    return table


def _build_decode_table() -> NDArray[np.int16]:
    """Vectorised ``ulaw_expand`` over all 256 codes."""
    log = np.arange(256, dtype=np.int32)
    sign = np.where(log < 0x80, -1, 1)
    mantissa = ~log
    exponent = (mantissa >> 4) & 0x7
    step = 4 << (exponent + 1)
    mantissa &= 0xF
    magnitude = (0x80 << exponent) + step * mantissa + step // 2 - 4 * 33
    table: NDArray[np.int16] = (sign * magnitude).astype(np.int16)
    return table


_ENCODE_TABLE = _build_encode_table()
_DECODE_TABLE = _build_decode_table()
_ENCODE_TABLE.setflags(write=False)
_DECODE_TABLE.setflags(write=False)


def encode(samples: NDArray[np.int16]) -> NDArray[np.uint8]:
    """μ-law codes for native-endian int16 samples (any shape). Raises TypeError on other dtypes.

    Other dtypes are refused rather than cast, because a silent cast from int32 or float would wrap
    or truncate and turn loud audio into noise.
    """
    if samples.dtype != np.int16:
        raise TypeError(f"mulaw.encode needs int16 samples, got {samples.dtype}")
    return _ENCODE_TABLE[samples.view(np.uint16)]


def decode(codes: NDArray[np.uint8]) -> NDArray[np.int16]:
    """int16 samples for μ-law codes (any shape). Raises TypeError unless ``codes`` is uint8."""
    if codes.dtype != np.uint8:
        raise TypeError(f"mulaw.decode needs uint8 codes, got {codes.dtype}")
    return _DECODE_TABLE[codes]


def pcm16_to_mulaw(pcm: bytes) -> bytes:
    """μ-law bytes for little-endian signed 16-bit PCM. Raises ValueError on an odd byte count."""
    if len(pcm) % 2:
        raise ValueError(f"PCM16 needs an even number of bytes, got {len(pcm)}")
    bit_patterns = np.frombuffer(pcm, dtype="<u2")  # index = the int16's two's-complement bits
    codes: NDArray[np.uint8] = _ENCODE_TABLE[bit_patterns]
    return codes.tobytes()


def mulaw_to_pcm16(data: bytes) -> bytes:
    """Little-endian signed 16-bit PCM for μ-law bytes (two output bytes per input byte)."""
    codes = np.frombuffer(data, dtype=np.uint8)
    return _DECODE_TABLE[codes].astype(_PCM16_LE, copy=False).tobytes()


def float_to_mulaw(samples: NDArray[np.floating]) -> bytes:
    """μ-law bytes for float samples in [-1, 1].

    Values are clipped to [-1, 1], scaled by 32767 and rounded half-to-even to int16. NaN becomes
    silence (0) instead of an arbitrary integer, since casting NaN to int is undefined.
    """
    scaled = np.rint(np.clip(np.nan_to_num(samples, nan=0.0), -1.0, 1.0) * 32767.0)
    return encode(scaled.astype(np.int16)).tobytes()
