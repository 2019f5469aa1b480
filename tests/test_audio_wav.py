"""WAV headers: parsing, streaming stripping across any chunking, and file round trips."""

from __future__ import annotations

import io
import random
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from callspeak.audio.format import AudioFormat
from callspeak.audio.mulaw import pcm16_to_mulaw
from callspeak.audio.wav import (
    MAX_HEADER_BYTES,
    WavError,
    WavHeaderStripper,
    WavInfo,
    looks_like_wav,
    parse_wav_header,
    read_wav,
    write_wav,
)

GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def chunk(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def fmt_body(tag: int = 1, channels: int = 1, rate: int = 24000, bits: int = 16) -> bytes:
    align = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)


def extensible_body(subformat: int, rate: int = 16000, bits: int = 16) -> bytes:
    ext = struct.pack("<HHI", 22, bits, 0x4) + struct.pack("<H", subformat) + GUID_TAIL
    return fmt_body(0xFFFE, 1, rate, bits) + ext


def wav_bytes(
    payload: bytes,
    fmt: bytes | None = None,
    *,
    extra: bytes = b"",
    data_size: int | None = None,
    riff_size: int | None = None,
) -> bytes:
    fmt = fmt_body() if fmt is None else fmt
    body = b"WAVE" + chunk(b"fmt ", fmt) + extra
    size = len(payload) if data_size is None else data_size
    body += b"data" + struct.pack("<I", size) + payload
    riff = len(body) if riff_size is None else riff_size
    return b"RIFF" + struct.pack("<I", riff) + body


def stdlib_wav(pcm: bytes, rate: int = 24000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def pieces(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    cuts, start = [], 0
    while start < len(data):
        end = start + rng.randint(1, largest)
        cuts.append(data[start:end])
        start = end
    return cuts


PAYLOAD = bytes(range(256)) * 4


# --- looks_like_wav ---


def test_looks_like_wav() -> None:
    header = wav_bytes(b"")
    assert looks_like_wav(header)
    assert looks_like_wav(header[:12])
    assert not looks_like_wav(header[:11])  # too short to tell: "not shown to be WAV"
    assert not looks_like_wav(b"")
    assert not looks_like_wav(b"RIFF\x00\x00\x00\x00AVI LIST")
    assert not looks_like_wav(b"\xff" * 64)


# --- parse_wav_header ---


def test_parses_the_stdlib_writers_header() -> None:
    data = stdlib_wav(b"\x01\x00" * 100, rate=24000)
    info = parse_wav_header(data)
    assert info == WavInfo(AudioFormat("linear16", 24000), 1, 16, 44, 200)
    assert info is not None
    assert data[info.data_offset :] == b"\x01\x00" * 100


def test_parses_mulaw_and_skips_unknown_chunks() -> None:
    extra = chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00Lavf\x00") + chunk(
        b"fact", b"\x10\x00\x00\x00"
    )
    data = wav_bytes(PAYLOAD, fmt_body(7, 1, 8000, 8), extra=extra)
    info = parse_wav_header(data)
    assert info is not None
    assert info.format == AudioFormat("mulaw", 8000)
    assert info.bits_per_sample == 8
    assert data[info.data_offset :] == PAYLOAD


def test_odd_sized_chunk_is_padded() -> None:
    extra = chunk(b"junk", b"abc")  # 3 bytes + 1 pad byte
    data = wav_bytes(PAYLOAD, extra=extra)
    info = parse_wav_header(data)
    assert info is not None and data[info.data_offset :] == PAYLOAD


@pytest.mark.parametrize(("subformat", "encoding", "bits"), [(1, "linear16", 16), (7, "mulaw", 8)])
def test_parses_wave_format_extensible(subformat: int, encoding: str, bits: int) -> None:
    info = parse_wav_header(wav_bytes(PAYLOAD, extensible_body(subformat, 16000, bits)))
    assert info is not None
    assert info.format == AudioFormat(encoding, 16000)  # type: ignore[arg-type]


@pytest.mark.parametrize("declared", [0, 0xFFFFFFFF])
def test_streaming_sizes_mean_unknown_length(declared: int) -> None:
    info = parse_wav_header(wav_bytes(PAYLOAD, data_size=declared, riff_size=declared))
    assert info is not None and info.data_size is None


def test_every_proper_prefix_of_a_header_needs_more_bytes() -> None:
    data = wav_bytes(PAYLOAD, extra=chunk(b"LIST", b"x" * 30))
    offset = len(data) - len(PAYLOAD)
    for n in range(offset):
        assert parse_wav_header(data[:n]) is None, n
    assert parse_wav_header(data[:offset]) is not None


def test_accepts_bytearray() -> None:
    assert parse_wav_header(bytearray(wav_bytes(PAYLOAD))) is not None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"ID3\x04" + b"\x00" * 40, "not a RIFF/WAVE"),
        (b"RIFF\x00\x00\x00\x00AVI " + b"\x00" * 40, "not a RIFF/WAVE"),
        (wav_bytes(PAYLOAD, fmt_body(channels=2)), "2 channels; only mono"),
        (wav_bytes(PAYLOAD, fmt_body(bits=24)), "tag 1 with 24 bits"),
        (wav_bytes(PAYLOAD, fmt_body(tag=3, bits=32)), "tag 3"),
        (wav_bytes(PAYLOAD, fmt_body(tag=6, bits=8)), "tag 6"),
        (wav_bytes(PAYLOAD, fmt_body(tag=7, bits=16)), "tag 7 with 16 bits"),
        (wav_bytes(PAYLOAD, fmt_body(rate=0)), "sample rate of 0"),
        (wav_bytes(PAYLOAD, fmt_body()[:14]), "at least 16"),
        (wav_bytes(PAYLOAD, fmt_body(tag=0xFFFE)), "EXTENSIBLE"),
        (wav_bytes(PAYLOAD, extensible_body(1)[:-1] + b"\x00"), "EXTENSIBLE"),
        (wav_bytes(PAYLOAD, extensible_body(3, bits=32)), "tag 3"),
        (b"RIFF\x00\x00\x00\x00WAVE" + chunk(b"data", b"\x00\x00"), "before the fmt"),
    ],
)
def test_refuses_malformed_or_unsupported(data: bytes, message: str) -> None:
    with pytest.raises(WavError, match=message):
        parse_wav_header(data)


def test_unsupported_format_is_refused_before_data_arrives() -> None:
    prefix = b"RIFF\x00\x00\x00\x00WAVE" + chunk(b"fmt ", fmt_body(channels=2))
    with pytest.raises(WavError, match="mono"):
        parse_wav_header(prefix)


def test_refuses_a_header_that_never_reaches_data() -> None:
    start = b"RIFF\x00\x00\x00\x00WAVE" + chunk(b"fmt ", fmt_body())
    small = start + chunk(b"LIST", b"\x00" * 1000)
    assert parse_wav_header(small) is None  # a modest LIST: keep waiting for data
    big = start + chunk(b"LIST", b"\x00" * MAX_HEADER_BYTES)
    with pytest.raises(WavError, match="no WAV data chunk"):
        parse_wav_header(big[:64])  # the LIST chunk's declared size alone overruns the limit


def test_refuses_a_fmt_chunk_larger_than_any_header_at_once() -> None:
    """A corrupt fmt size would otherwise be waited for: a stream held back, never played."""
    header = b"RIFF\x00\x00\x00\x00WAVE" + b"fmt " + struct.pack("<I", 0x7FFFFFF0)
    with pytest.raises(WavError, match="fmt chunk of 2147483632 bytes"):
        parse_wav_header(header + b"\x00" * 16)
    stripper = WavHeaderStripper()
    with pytest.raises(WavError):
        stripper.push(header)


def test_wav_error_is_a_value_error() -> None:
    assert issubclass(WavError, ValueError)


# --- WavHeaderStripper ---


def strip_all(stripper: WavHeaderStripper, parts: list[bytes]) -> bytes:
    return b"".join(stripper.push(p) for p in parts) + stripper.flush()


@pytest.mark.parametrize("seed", range(30))
def test_stripper_removes_header_under_any_chunking(seed: int) -> None:
    rng = random.Random(seed)
    data = wav_bytes(PAYLOAD, extra=chunk(b"LIST", rng.randbytes(rng.randint(0, 90))))
    stripper = WavHeaderStripper()
    out = b"".join(stripper.push(p) for p in pieces(data, rng, rng.choice([1, 3, 50, 2000])))
    assert out == PAYLOAD
    assert stripper.info is not None and stripper.info.format == AudioFormat("linear16", 24000)
    assert stripper.flush() == b""


def test_stripper_with_one_byte_chunks_holds_until_the_header_is_complete() -> None:
    data = stdlib_wav(b"\x10\x20" * 10)
    stripper = WavHeaderStripper()
    outputs = [stripper.push(data[i : i + 1]) for i in range(len(data))]
    assert outputs[:44] == [b""] * 44
    assert not stripper.decided or stripper.info is not None
    assert b"".join(outputs) == b"\x10\x20" * 10


@pytest.mark.parametrize("seed", range(30))
def test_stripper_passes_raw_audio_through_untouched(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randint(4, 2000))
    if data.startswith(b"R"):
        data = b"\xff" + data
    stripper = WavHeaderStripper()
    out = b"".join(stripper.push(p) for p in pieces(data, rng, rng.choice([1, 2, 333])))
    assert out == data
    assert stripper.info is None
    assert stripper.decided


def test_stripper_decides_raw_on_the_first_byte_that_is_not_riff() -> None:
    stripper = WavHeaderStripper()
    assert stripper.push(b"\x7f") == b"\x7f"
    assert stripper.decided
    assert stripper.push(b"RIFF") == b"RIFF"  # once raw, always raw


def test_stripper_decides_at_the_fourth_byte() -> None:
    stripper = WavHeaderStripper()
    assert [stripper.push(bytes([b])) for b in b"RIF"] == [b"", b"", b""]
    assert not stripper.decided
    assert stripper.push(b"X") == b"RIFX"
    assert stripper.decided and stripper.info is None


@pytest.mark.parametrize("short", [b"R", b"RI", b"RIF", b""])
def test_flush_returns_a_short_stream_that_looked_like_riff(short: bytes) -> None:
    stripper = WavHeaderStripper()
    assert stripper.push(short) == b""
    assert stripper.flush() == short


def test_flush_drops_a_truncated_wav_header_and_resets() -> None:
    stripper = WavHeaderStripper()
    assert stripper.push(stdlib_wav(b"")[:30]) == b""
    assert stripper.flush() == b""
    assert stripper.info is None and not stripper.decided
    assert stripper.push(b"abcd") == b"abcd"  # a new stream is judged afresh


def test_stripper_honours_a_declared_data_size() -> None:
    data = wav_bytes(PAYLOAD) + chunk(b"LIST", b"trailing metadata!")
    stripper = WavHeaderStripper()
    out = b"".join(stripper.push(data[i : i + 7]) for i in range(0, len(data), 7))
    assert out == PAYLOAD


def test_stripper_propagates_wav_errors() -> None:
    stripper = WavHeaderStripper()
    with pytest.raises(WavError, match="mono"):
        stripper.push(wav_bytes(PAYLOAD, fmt_body(channels=2)))


def test_stripper_refuses_riff_that_is_not_wave() -> None:
    stripper = WavHeaderStripper()
    assert stripper.push(b"RIFF\x00\x00\x00\x00") == b""
    with pytest.raises(WavError, match="not a RIFF/WAVE"):
        stripper.push(b"AVI ")


# --- files ---


def test_write_wav_then_read_back(tmp_path: Path) -> None:
    t = np.arange(800) / 8000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    codes = pcm16_to_mulaw(pcm)
    path = tmp_path / "out.wav"
    write_wav(path, codes)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (
            1,
            2,
            8000,
            800,
        )
    fmt, data = read_wav(path)
    assert fmt == AudioFormat("linear16", 8000)
    assert pcm16_to_mulaw(data) == codes  # decoded levels re-encode to the same codes


def test_write_wav_takes_a_str_path_and_rate(tmp_path: Path) -> None:
    path = str(tmp_path / "x.wav")
    write_wav(path, b"\xff" * 10, sample_rate=16000)
    assert read_wav(path) == (AudioFormat("linear16", 16000), b"\x00\x00" * 10)


def test_read_wav_reads_mulaw_and_stops_at_data_size(tmp_path: Path) -> None:
    path = tmp_path / "mu.wav"
    path.write_bytes(wav_bytes(PAYLOAD, fmt_body(7, 1, 8000, 8)) + chunk(b"LIST", b"meta"))
    assert read_wav(path) == (AudioFormat("mulaw", 8000), PAYLOAD)


def test_read_wav_streaming_header_reads_to_the_end(tmp_path: Path) -> None:
    path = tmp_path / "s.wav"
    path.write_bytes(wav_bytes(PAYLOAD, data_size=0xFFFFFFFF))
    assert read_wav(path) == (AudioFormat("linear16", 24000), PAYLOAD)


def test_read_wav_refuses_truncated_and_unsupported(tmp_path: Path) -> None:
    truncated = tmp_path / "t.wav"
    truncated.write_bytes(stdlib_wav(b"")[:20])
    with pytest.raises(WavError, match="truncated"):
        read_wav(truncated)
    stereo = tmp_path / "st.wav"
    stereo.write_bytes(wav_bytes(PAYLOAD, fmt_body(channels=2)))
    with pytest.raises(WavError, match="mono"):
        read_wav(stereo)


def test_read_wav_skips_chunks_of_any_size_before_data(tmp_path: Path) -> None:
    """A file is whole: the 64 KiB bound on a header is for streams. A 70 kB ID3 tag before
    the audio was refused ("no WAV data chunk within the first 65536 bytes")."""
    path = tmp_path / "tagged.wav"
    path.write_bytes(
        wav_bytes(PAYLOAD, fmt_body(7, 1, 8000, 8), extra=chunk(b"id3 ", b"\x00" * 70_000))
    )
    assert read_wav(path) == (AudioFormat("mulaw", 8000), PAYLOAD)
    with pytest.raises(WavError, match="within the first 65536 bytes"):
        WavHeaderStripper().push(path.read_bytes())  # a stream is still bounded
