"""μ-law against a line-by-line port of the ITU-T G.191 reference, over every input."""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

import numpy as np
import pytest

from callspeak.audio import mulaw
from callspeak.audio.mulaw import (
    MULAW_SILENCE,
    decode,
    encode,
    float_to_mulaw,
    mulaw_to_pcm16,
    pcm16_to_mulaw,
)

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


# --- ITU-T STL g711.c, ported statement by statement (C short arithmetic fits Python ints) ---


def itu_ulaw_compress(linear: int) -> int:
    # absno = x < 0 ? ((~x) >> 2) + 33 : ((x) >> 2) + 33;
    absno = ((~linear) >> 2) + 33 if linear < 0 else (linear >> 2) + 33
    if absno > 0x1FFF:
        absno = 0x1FFF
    i = absno >> 6
    segno = 1
    while i != 0:
        segno += 1
        i >>= 1
    high_nibble = 0x0008 - segno
    low_nibble = (absno >> segno) & 0x000F
    low_nibble = 0x000F - low_nibble
    log = (high_nibble << 4) | low_nibble
    if linear >= 0:
        log = log | 0x0080
    return log


def itu_ulaw_expand(log: int) -> int:
    sign = -1 if log < 0x0080 else 1
    mantissa = ~log
    exponent = (mantissa >> 4) & 0x0007
    segment = exponent + 1
    mantissa = mantissa & 0x000F
    step = 4 << segment
    return sign * ((0x0080 << exponent) + step * mantissa + step // 2 - 4 * 33)


REF_ENCODE = np.array([itu_ulaw_compress(int(x)) for x in ALL_INT16], dtype=np.uint8)
REF_DECODE = np.array([itu_ulaw_expand(c) for c in range(256)], dtype=np.int16)


def test_encode_matches_itu_reference_for_every_int16() -> None:
    np.testing.assert_array_equal(encode(ALL_INT16), REF_ENCODE)


def test_decode_matches_itu_reference_for_every_code() -> None:
    np.testing.assert_array_equal(decode(ALL_CODES), REF_DECODE)


@pytest.mark.parametrize(
    ("code", "sample"), [(0x00, -32124), (0x80, 32124), (0x7F, 0), (0xFF, 0), (0x70, -120)]
)
def test_decode_known_table_values(code: int, sample: int) -> None:
    assert decode(np.array([code], dtype=np.uint8))[0] == sample


@pytest.mark.parametrize(
    ("sample", "code"),
    [(0, 0xFF), (-1, 0x7F), (32767, 0x80), (-32768, 0x00), (1, 0xFF), (-5, 0x7E), (130, 0xEF)],
)
def test_encode_known_values(sample: int, code: int) -> None:
    assert encode(np.array([sample], dtype=np.int16))[0] == code


def test_silence_constant_is_the_code_for_zero() -> None:
    assert encode(np.zeros(1, dtype=np.int16))[0] == MULAW_SILENCE
    assert decode(np.array([MULAW_SILENCE], dtype=np.uint8))[0] == 0


def test_round_trip_is_stable_for_every_code() -> None:
    levels = decode(ALL_CODES)
    np.testing.assert_array_equal(decode(encode(levels)), levels)


def test_round_trip_maps_codes_to_themselves_except_negative_zero() -> None:
    # 0x7F decodes to 0, which encodes as 0xFF (+0): the only code that is not a fixed point.
    back = encode(decode(ALL_CODES))
    changed = np.nonzero(back != ALL_CODES)[0]
    assert changed.tolist() == [0x7F]
    assert back[0x7F] == 0xFF


def test_encode_is_monotonic_in_level() -> None:
    levels = decode(encode(ALL_INT16)).astype(np.int32)
    assert np.all(np.diff(levels) >= 0)
    # The worst error is at full scale, clipped to the top level ±32124 (half a step is only 512).
    assert np.max(np.abs(levels - ALL_INT16.astype(np.int32))) <= 32768 - 32124


def test_encode_keeps_shape() -> None:
    block = ALL_INT16[:12].reshape(3, 4)
    assert encode(block).shape == (3, 4)
    assert decode(encode(block)).shape == (3, 4)


def test_encode_refuses_other_dtypes() -> None:
    with pytest.raises(TypeError, match="int16"):
        encode(np.zeros(4, dtype=np.int32))


def test_decode_refuses_other_dtypes() -> None:
    with pytest.raises(TypeError, match="uint8"):
        decode(np.zeros(4, dtype=np.int16))


def test_tables_are_read_only() -> None:
    with pytest.raises(ValueError, match="read-only"):
        mulaw._ENCODE_TABLE[0] = 1


# --- byte helpers ---


def test_pcm16_to_mulaw_is_little_endian_encode() -> None:
    pcm = ALL_INT16.astype("<i2").tobytes()
    assert pcm16_to_mulaw(pcm) == REF_ENCODE.tobytes()


def test_pcm16_to_mulaw_rejects_odd_length() -> None:
    with pytest.raises(ValueError, match="even"):
        pcm16_to_mulaw(b"\x00\x01\x02")


def test_mulaw_to_pcm16_is_little_endian_decode() -> None:
    pcm = mulaw_to_pcm16(ALL_CODES.tobytes())
    assert len(pcm) == 512
    np.testing.assert_array_equal(np.frombuffer(pcm, dtype="<i2"), REF_DECODE)
    assert mulaw_to_pcm16(b"\x00")[:2] == (-32124).to_bytes(2, "little", signed=True)


def test_empty_inputs() -> None:
    assert pcm16_to_mulaw(b"") == b""
    assert mulaw_to_pcm16(b"") == b""
    assert float_to_mulaw(np.zeros(0, dtype=np.float32)) == b""


# --- float input ---


def test_float_to_mulaw_scales_rounds_and_clips() -> None:
    values = np.array([0.0, 1.0, -1.0, 2.5, -7.0, 0.5, 1e-5, -1e-5], dtype=np.float64)
    expected_int16 = np.array([0, 32767, -32767, 32767, -32767, 16384, 0, 0], dtype=np.int16)
    assert float_to_mulaw(values) == encode(expected_int16).tobytes()


def test_float_to_mulaw_float32_matches_float64() -> None:
    rng = np.random.default_rng(7)
    signal = rng.uniform(-1.2, 1.2, 10_000)
    assert float_to_mulaw(signal.astype(np.float32)) == float_to_mulaw(
        signal.astype(np.float32).astype(np.float64)
    )


def test_float_to_mulaw_maps_nan_to_silence_and_infinities_to_full_scale() -> None:
    out = float_to_mulaw(np.array([np.nan, np.inf, -np.inf], dtype=np.float32))
    assert out == bytes([MULAW_SILENCE]) + encode(np.array([32767, -32767], np.int16)).tobytes()


# --- the stdlib audioop (deprecated, removed in 3.13) as a second opinion ---


@pytest.fixture(scope="module")
def audioop() -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module: ModuleType = pytest.importorskip("audioop")
    return module


def test_audioop_decode_agrees_on_all_codes(audioop: ModuleType) -> None:
    ours = mulaw_to_pcm16(ALL_CODES.tobytes())
    assert audioop.ulaw2lin(ALL_CODES.tobytes(), 2) == ours


def test_audioop_encode_differs_only_by_one_step_on_negative_boundaries(
    audioop: ModuleType,
) -> None:
    # audioop (the Sun g711.c) takes -(x >> 2) for negatives, the ITU takes (~x) >> 2: the two
    # disagree by one quantisation step on the 4 negative inputs just past each decision level.
    # The ITU port stays the reference.
    assert sys.byteorder == "little"
    theirs = np.frombuffer(audioop.lin2ulaw(ALL_INT16.tobytes(), 2), dtype=np.uint8)
    differ = np.nonzero(theirs != REF_ENCODE)[0]
    assert len(differ) == 508
    assert np.all(ALL_INT16[differ] < 0)
    steps = np.abs(theirs[differ].astype(int) - REF_ENCODE[differ].astype(int))
    assert np.all(steps == 1)
    assert ALL_INT16[differ][-4:].tolist() == [-4, -3, -2, -1]
