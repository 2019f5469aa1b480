"""Streaming resampling: chunked equals whole, lengths, frequency kept, aliasing removed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import soxr
from numpy.typing import NDArray

from callspeak.audio.resample import StreamResampler, resample_once


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> NDArray[np.float32]:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def random_chunks(n: int, rng: random.Random, largest: int = 700) -> list[tuple[int, int]]:
    bounds, start = [], 0
    while start < n:
        end = min(n, start + rng.randint(0, largest))
        bounds.append((start, end))
        start = end
    return bounds


def stream(
    resampler: StreamResampler, signal: NDArray[np.float32], seed: int
) -> NDArray[np.float32]:
    parts = [
        resampler.process(signal[a:b]) for a, b in random_chunks(len(signal), random.Random(seed))
    ]
    return np.concatenate([*parts, resampler.flush()])


def peak_frequency(signal: NDArray[np.floating], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("in_rate", "out_rate"), [(22050, 8000), (24000, 8000), (16000, 8000)])
def test_chunked_equals_one_shot(seed: int, in_rate: int, out_rate: int) -> None:
    signal = tone(440, in_rate, 0.5)
    chunked = stream(StreamResampler(in_rate, out_rate), signal, seed)
    whole = soxr.resample(signal, in_rate, out_rate, quality="HQ")
    assert abs(len(chunked) - len(whole)) <= 3
    n = min(len(chunked), len(whole))
    assert np.max(np.abs(chunked[:n] - whole[:n])) < 1e-3
    assert chunked.dtype == np.float32


def test_output_length_matches_duration() -> None:
    out = stream(StreamResampler(22050, 8000), tone(440, 22050, 2.0), seed=1)
    assert abs(len(out) - 16000) <= 2


def test_keeps_a_1khz_tone_at_1khz() -> None:
    out = stream(StreamResampler(22050, 8000), tone(1000, 22050, 1.0), seed=2)
    assert abs(peak_frequency(out, 8000) - 1000) < 5
    # Level is kept too (0.5 amplitude sine → RMS 0.354), ignoring the filter's edges.
    assert np.sqrt(np.mean(out[400:-400] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_removes_energy_above_the_new_nyquist() -> None:
    # A 6 kHz tone cannot exist at 8 kHz: without the low-pass it would alias to 2 kHz.
    mix = tone(1000, 22050, 1.0) + tone(6000, 22050, 1.0, amplitude=0.4)
    out = stream(StreamResampler(22050, 8000), mix, seed=3)[400:-400]  # skip start/end transients
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    freqs = np.fft.rfftfreq(len(out), 1 / 8000)
    wanted = spectrum[np.abs(freqs - 1000) < 20].max()
    alias = spectrum[np.abs(freqs - 2000) < 20].max()
    assert alias < wanted * 1e-4  # at least 80 dB down


def test_a_tone_above_the_new_nyquist_comes_out_silent() -> None:
    out = stream(StreamResampler(22050, 8000), tone(6000, 22050, 1.0), seed=4)[400:-400]
    assert np.sqrt(np.mean(out**2)) < 1e-4


def test_int16_stream_stays_int16_and_tracks_float() -> None:
    signal = tone(440, 24000, 0.5)
    as_int = np.round(signal * 32767).astype(np.int16)
    out = stream(StreamResampler(24000, 8000), as_int, seed=4)  # type: ignore[arg-type]
    assert out.dtype == np.int16
    whole = soxr.resample(signal, 24000, 8000) * 32767
    n = min(len(out), len(whole))
    assert np.max(np.abs(out[:n] - whole[:n])) <= 3


def test_dtype_is_fixed_by_first_call() -> None:
    resampler = StreamResampler(16000, 8000)
    assert resampler.dtype is None
    resampler.process(np.zeros(100, dtype=np.int16))
    assert resampler.dtype == np.int16
    with pytest.raises(TypeError, match="int16"):
        resampler.process(np.zeros(100, dtype=np.float32))


def test_passthrough_when_rates_match() -> None:
    resampler = StreamResampler(8000, 8000)
    chunk = tone(440, 8000, 0.1)
    assert resampler.passthrough
    assert resampler.process(chunk) is chunk
    assert resampler.flush().size == 0
    assert resampler.flush().dtype == np.float32
    with pytest.raises(TypeError):
        resampler.process(np.zeros(4, dtype=np.int16))


def test_flush_before_any_chunk_is_empty_float32() -> None:
    tail = StreamResampler(22050, 8000).flush()
    assert tail.size == 0
    assert tail.dtype == np.float32


def test_flush_resets_for_a_new_stream() -> None:
    resampler = StreamResampler(24000, 8000)
    signal = tone(440, 24000, 0.25)
    first = np.concatenate([resampler.process(signal), resampler.flush()])
    second = np.concatenate([resampler.process(signal), resampler.flush()])
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_empty_chunks_are_fine() -> None:
    resampler = StreamResampler(22050, 8000)
    assert resampler.process(np.zeros(0, dtype=np.float32)).size == 0
    assert resampler.process(np.zeros(0, dtype=np.float32)).dtype == np.float32


@pytest.mark.parametrize("bad", [np.zeros(10, dtype=np.float64), np.zeros(10, dtype=np.int32)])
def test_refuses_unsupported_dtypes(bad: NDArray[np.generic]) -> None:
    with pytest.raises(TypeError, match="float32 or int16"):
        StreamResampler(16000, 8000).process(bad)  # type: ignore[type-var]
    with pytest.raises(TypeError):
        resample_once(bad, 16000, 8000)  # type: ignore[type-var]


def test_refuses_stereo_shapes() -> None:
    with pytest.raises(ValueError, match="mono"):
        StreamResampler(16000, 8000).process(np.zeros((10, 2), dtype=np.float32))


@pytest.mark.parametrize(("in_rate", "out_rate"), [(0, 8000), (8000, 0), (-1, 8000)])
def test_refuses_bad_rates(in_rate: int, out_rate: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        StreamResampler(in_rate, out_rate)
    with pytest.raises(ValueError, match="positive"):
        resample_once(np.zeros(4, np.float32), in_rate, out_rate)


def test_resample_once_matches_soxr_and_passes_through() -> None:
    signal = tone(440, 16000, 0.3)
    np.testing.assert_array_equal(
        resample_once(signal, 16000, 8000), soxr.resample(signal, 16000, 8000)
    )
    assert len(resample_once(signal, 16000, 8000)) == 2400
    assert resample_once(signal, 16000, 16000) is signal
    as_int = np.zeros(100, dtype=np.int16)
    assert resample_once(as_int, 24000, 8000).dtype == np.int16
