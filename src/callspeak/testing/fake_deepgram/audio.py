"""The fake's synthetic audio: deterministic tone bursts, one per character, in Aura's raw formats.

Contract: :func:`synthesize` is a pure function of its arguments. Every character becomes
``int(sample_rate * SECONDS_PER_CHAR)`` samples that depend on that character alone, so joining
per-character bursts gives exactly the bytes of encoding the whole text at once (a test checks
this with :func:`pcm_for_text`, :func:`mulaw_encode` and :func:`alaw_encode`).
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import numpy as np

__all__ = [
    "RAW_CONTENT_TYPES",
    "SECONDS_PER_CHAR",
    "alaw_encode",
    "mulaw_encode",
    "pcm_for_text",
    "synthesize",
    "wav_header",
]

SECONDS_PER_CHAR = 0.060
#: The ``content-type`` of a raw (container ``none``) REST response, by encoding.
RAW_CONTENT_TYPES = {"mulaw": "audio/basic", "alaw": "audio/x-alaw-basic", "linear16": "audio/l16"}
_WAV_TAG = {"linear16": 1, "alaw": 6, "mulaw": 7}


def pcm_for_text(text: str, rate: int) -> np.ndarray[Any, np.dtype[np.int16]]:
    """One 60 ms tone burst per character; letters loud and pitched by code point, others quiet."""
    n = int(rate * SECONDS_PER_CHAR)
    codes = np.array([ord(c) for c in text], dtype=np.float64)[:, None]
    loud = np.array([c.isalnum() for c in text], dtype=np.float64)[:, None]
    t = np.arange(n, dtype=np.float64) / rate
    freq = 180.0 + (codes * 37.0) % 700.0
    wave = np.sin(2 * np.pi * freq * t) + 0.35 * np.sin(4 * np.pi * freq * t)
    envelope = np.sin(np.pi * (np.arange(n) + 0.5) / n)
    amplitude = 2000.0 + 7000.0 * loud
    return (wave * envelope * amplitude).astype(np.int16).reshape(-1)


def mulaw_encode(pcm: np.ndarray[Any, np.dtype[np.int16]]) -> bytes:
    """G.711 μ-law, one byte per 16-bit sample."""
    x = pcm.astype(np.int32)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    code = ((x < 0).astype(np.int32) << 7) | (exponent << 4) | mantissa
    return bytes((~code & 0xFF).astype(np.uint8).tobytes())


def alaw_encode(pcm: np.ndarray[Any, np.dtype[np.int16]]) -> bytes:
    """G.711 A-law, one byte per 16-bit sample."""
    x = pcm.astype(np.int32) >> 3
    mask = np.where(x >= 0, 0xD5, 0x55)
    mag = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), mag)
    shift = np.where(seg < 2, 1, seg)
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | ((mag >> shift) & 0x0F))
    return bytes((code ^ mask).astype(np.uint8).tobytes())


def wav_header(encoding: str, rate: int, data_len: int) -> bytes:
    """The 44-byte RIFF/WAVE header for ``data_len`` bytes of mono ``encoding`` audio."""
    width = 2 if encoding == "linear16" else 1
    fmt = struct.pack("<HHIIHH", _WAV_TAG[encoding], 1, rate, rate * width, width, 8 * width)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_len)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + (b"data" + struct.pack("<I", data_len))
    )


@functools.lru_cache(maxsize=1024)
def _char_audio(char: str, encoding: str, sample_rate: int) -> bytes:
    """One character's burst, encoded (each character's samples depend on it alone)."""
    pcm = pcm_for_text(char, sample_rate)
    if encoding == "linear16":
        return pcm.astype("<i2").tobytes()
    return mulaw_encode(pcm) if encoding == "mulaw" else alaw_encode(pcm)


@functools.lru_cache(maxsize=64)
def synthesize(
    text: str, encoding: str = "mulaw", sample_rate: int = 8000, container: str = "none"
) -> bytes:
    """The exact bytes the fake streams for ``text`` in this format (deterministic, cached).

    Joined from per-character bursts: the same bytes as encoding the whole text at once, but a
    benchmark's 200 new texts cost the fake almost nothing (it shares the CPU being measured).
    """
    audio = b"".join(_char_audio(char, encoding, sample_rate) for char in text)
    return wav_header(encoding, sample_rate, len(audio)) + audio if container == "wav" else audio
