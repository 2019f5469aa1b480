"""RIFF/WAVE headers: recognise, parse and strip them, in whole buffers and in streams.

A TTS engine asked for WAV (or one that ignores ``container=none``) puts a 44+ byte header before
the audio. Sent to Twilio, those bytes play as a click, so the audio path strips them.

Accepted: mono PCM 16-bit (format tag 1, or ``WAVE_FORMAT_EXTENSIBLE`` with the PCM subformat) and
mono μ-law 8-bit (format tag 7, or extensible with the μ-law subformat). Anything else that is RIFF
raises :class:`WavError` with a message naming the problem. Chunks other than ``fmt `` and
``data`` (``LIST``, ``fact``, ...) are skipped. A ``data`` size of 0 or 0xFFFFFFFF is what
streaming writers put there before they know the length; it is read as "until the stream ends".

Only :func:`write_wav` and :func:`read_wav` touch files; the rest is pure.
"""

from __future__ import annotations

import os
import struct
import wave
from dataclasses import dataclass
from pathlib import Path

from callspeak.audio.format import AudioFormat, Encoding
from callspeak.audio.mulaw import mulaw_to_pcm16

__all__ = [
    "WavError",
    "WavHeaderStripper",
    "WavInfo",
    "looks_like_wav",
    "parse_wav_header",
    "read_wav",
    "write_wav",
]

_RIFF_HEADER = 12  # "RIFF" <u32 size> "WAVE"
_CHUNK_HEADER = 8  # <4-byte id> <u32 size>
#: A header that has not reached ``data`` within this many bytes is refused, so a corrupt or hostile
#: stream cannot make the stripper buffer without bound.
MAX_HEADER_BYTES = 64 * 1024

_FORMAT_PCM = 1
_FORMAT_MULAW = 7
_FORMAT_EXTENSIBLE = 0xFFFE
# Bytes 2..16 of every KSDATAFORMAT_SUBTYPE_* GUID; bytes 0..2 hold the plain format tag.
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_STREAMING_SIZES = (0, 0xFFFFFFFF)


class WavError(ValueError):
    """A RIFF/WAVE stream that is malformed or in a format the audio path cannot take."""


@dataclass(frozen=True, slots=True)
class WavInfo:
    """What a WAV header says.

    ``format`` describes the payload after the header is gone (``container="none"``).
    ``data_offset`` is where the audio starts in the stream; ``data_size`` is the declared payload
    length in bytes, or None when the header leaves it open (0 or 0xFFFFFFFF: a streaming writer).
    """

    format: AudioFormat
    channels: int
    bits_per_sample: int
    data_offset: int
    data_size: int | None


def looks_like_wav(prefix: bytes) -> bool:
    """True when ``prefix`` starts with ``RIFF`` and has ``WAVE`` at offset 8.

    Never raises. With fewer than 12 bytes it returns False, even if they begin with ``RIFF``: the
    answer is "not shown to be WAV yet". Streams should use :class:`WavHeaderStripper`, which waits.
    """
    return len(prefix) >= _RIFF_HEADER and prefix[:4] == b"RIFF" and prefix[8:12] == b"WAVE"


def _could_still_be_wav(buf: bytes | bytearray) -> bool:
    """False once the bytes seen so far contradict a RIFF/WAVE start."""
    return b"RIFF".startswith(buf[:4]) and b"WAVE".startswith(buf[8:12])


def _parse_fmt(body: bytes | bytearray) -> tuple[Encoding, int, int, int]:
    """(encoding, channels, sample_rate, bits) from a ``fmt `` chunk body; WavError if unusable."""
    if len(body) < 16:
        raise WavError(f"WAV fmt chunk is {len(body)} bytes, needs at least 16")
    tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _FORMAT_EXTENSIBLE:
        if len(body) < 40 or body[26:40] != _GUID_TAIL:
            raise WavError("WAVE_FORMAT_EXTENSIBLE fmt chunk without a recognisable subformat")
        (tag,) = struct.unpack_from("<H", body, 24)
    if channels != 1:
        raise WavError(f"WAV has {channels} channels; only mono is supported (ask for mono)")
    if rate == 0:
        raise WavError("WAV declares a sample rate of 0")
    if tag == _FORMAT_PCM and bits == 16:
        return "linear16", channels, rate, bits
    if tag == _FORMAT_MULAW and bits == 8:
        return "mulaw", channels, rate, bits
    raise WavError(
        f"unsupported WAV format tag {tag} with {bits} bits per sample; "
        "supported: PCM 16-bit (tag 1) and mu-law 8-bit (tag 7)"
    )


def parse_wav_header(
    buf: bytes | bytearray, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> WavInfo | None:
    """Parse the header at the start of ``buf``, walking chunks up to ``data``.

    Returns None while ``buf`` is a plausible but incomplete header (more bytes needed). Raises
    :class:`WavError` when ``buf`` is not RIFF/WAVE, is malformed (``data`` before ``fmt ``, no
    ``data`` within ``max_header_bytes``: a bound for streams, which would otherwise be held
    without end), or holds an unsupported format (checked as soon as the ``fmt `` chunk is
    complete). The RIFF size field is ignored: streaming writers leave it unset.
    """
    if not _could_still_be_wav(buf):
        raise WavError(f"not a RIFF/WAVE stream (starts with {bytes(buf[:12])!r})")
    pos = _RIFF_HEADER
    fmt: tuple[Encoding, int, int, int] | None = None
    while pos + _CHUNK_HEADER <= len(buf):
        chunk_id, size = struct.unpack_from("<4sI", buf, pos)
        body = pos + _CHUNK_HEADER
        if chunk_id == b"data":
            if fmt is None:
                raise WavError("WAV data chunk comes before the fmt chunk")
            encoding, channels, rate, bits = fmt
            return WavInfo(
                format=AudioFormat(encoding, rate),
                channels=channels,
                bits_per_sample=bits,
                data_offset=body,
                data_size=None if size in _STREAMING_SIZES else size,
            )
        if chunk_id == b"fmt ":
            if body + size > max_header_bytes:  # (checked first: else it is waited for forever)
                raise WavError(f"WAV fmt chunk of {size} bytes: a corrupt header")
            if body + size > len(buf):
                return None
            fmt = _parse_fmt(buf[body : body + size])
        pos = body + size + (size & 1)  # chunks are padded to an even length
        if pos > max_header_bytes:
            raise WavError(f"no WAV data chunk within the first {max_header_bytes} bytes")
    return None


class WavHeaderStripper:
    """Strip a WAV header from a stream cut at arbitrary points, passing other streams through.

    The first bytes decide: as soon as they cannot begin ``RIFF`` (at most 4 bytes), the stream is
    raw and every byte passes through untouched and unbuffered. A ``RIFF`` stream is buffered until
    the header is complete (even when it arrives one byte at a time); then :attr:`info` is set and
    the payload flows. A declared ``data`` size is honoured: bytes after it (a trailing ``LIST``
    chunk, say) are dropped. :class:`WavError` from :func:`parse_wav_header` propagates.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._held = bytearray()
        self._mode: str = "deciding"  # -> "raw" | "header" -> "payload"
        self._remaining: int | None = None
        self.info: WavInfo | None = None

    @property
    def decided(self) -> bool:
        """True once the stream is known to be raw, or its WAV header has been parsed."""
        return self._mode in ("raw", "payload")

    def push(self, chunk: bytes) -> bytes:
        """Audio payload bytes available now (possibly empty while a header is buffered)."""
        if self._mode == "raw":
            return chunk
        if self._mode == "payload":
            return self._limit(chunk)
        self._held += chunk
        if self._mode == "deciding":
            if not b"RIFF".startswith(self._held[:4]):
                self._mode = "raw"
                return self._take_held()
            if len(self._held) < 4:
                return b""
            self._mode = "header"
        info = parse_wav_header(self._held)
        if info is None:
            return b""
        self.info = info
        self._mode = "payload"
        self._remaining = info.data_size
        del self._held[: info.data_offset]
        return self._limit(self._take_held())

    def flush(self) -> bytes:
        """End the stream and reset for a new one; return what is held that could be audio.

        A stream shorter than 4 bytes that still looked like ``RI...`` is not WAV: those bytes are
        returned. A ``RIFF`` stream that ends inside its header holds no audio: nothing is returned.
        """
        held = self._take_held() if self._mode == "deciding" else b""
        self._reset()
        return held

    def _take_held(self) -> bytes:
        held = bytes(self._held)
        self._held.clear()
        return held

    def _limit(self, payload: bytes) -> bytes:
        if self._remaining is None:
            return payload
        taken = payload[: self._remaining]
        self._remaining -= len(taken)
        return taken


def write_wav(path: str | os.PathLike[str], mulaw: bytes, *, sample_rate: int = 8000) -> None:
    """Write μ-law audio to ``path`` as a mono 16-bit PCM WAV (playable everywhere). Raises
    :class:`OSError` when ``path`` cannot be written."""
    # The file is opened first: wave.open(path) failing to open it leaves a half-made writer
    # whose __del__ prints an AttributeError ("Exception ignored …") on Python 3.11.
    with open(path, "wb") as file, wave.open(file, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(mulaw_to_pcm16(mulaw))


def read_wav(path: str | os.PathLike[str]) -> tuple[AudioFormat, bytes]:
    """Read a mono PCM16 or μ-law WAV: its payload format and the raw audio bytes.

    Raises :class:`WavError` for an unsupported or truncated header. A payload shorter than its
    declared size (a cut-off file) is returned as far as it goes.
    """
    data = Path(path).read_bytes()
    # A file is whole: chunks before "data" (an ID3 tag, cover art) may take any room in it.
    info = parse_wav_header(data, max_header_bytes=max(len(data), MAX_HEADER_BYTES))
    if info is None:
        raise WavError(f"{os.fspath(path)}: WAV header is truncated")
    end = None if info.data_size is None else info.data_offset + info.data_size
    return info.format, data[info.data_offset : end]
