"""TwilioAudioConverter: any source, any chunking → clean 160-byte μ-law 8 kHz frames."""

from __future__ import annotations

import io
import random
import wave

import numpy as np
import pytest
from numpy.typing import NDArray

from callspeak.audio.convert import TwilioAudioConverter, convert_all
from callspeak.audio.format import TWILIO_FORMAT, AudioFormat
from callspeak.audio.mulaw import MULAW_SILENCE, decode, encode, pcm16_to_mulaw
from callspeak.audio.wav import WavError

FREQ = 440.0
AMPLITUDE = 12000


def tone_int16(rate: int, seconds: float, freq: float = FREQ) -> NDArray[np.int16]:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(AMPLITUDE * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def linear16(rate: int, seconds: float = 0.5) -> bytes:
    return tone_int16(rate, seconds).astype("<i2").tobytes()


def mulaw(rate: int, seconds: float = 0.5) -> bytes:
    return encode(tone_int16(rate, seconds)).tobytes()


def as_wav(pcm_or_mulaw: bytes, rate: int, *, encoding: str = "linear16") -> bytes:
    if encoding == "linear16":
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm_or_mulaw)
        return out.getvalue()
    fmt = (7).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little")
    fmt += rate.to_bytes(4, "little") + (1).to_bytes(2, "little") + (8).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt
    body += b"data" + b"\xff\xff\xff\xff" + pcm_or_mulaw  # streaming writer: size unknown
    return b"RIFF" + b"\xff\xff\xff\xff" + body


def split(data: bytes, size: int | str, seed: int = 0) -> list[bytes]:
    if size == "random":
        rng, out, start = random.Random(seed), [], 0
        while start < len(data):
            end = start + rng.randint(1, 999)
            out.append(data[start:end])
            start = end
        return out
    assert isinstance(size, int)
    return [data[i : i + size] for i in range(0, len(data), size)]


def run(converter: TwilioAudioConverter, parts: list[bytes]) -> list[bytes]:
    frames = []
    for part in parts:
        pushed = converter.push(part)
        assert all(len(f) == 160 for f in pushed)
        frames += pushed
    return frames + converter.flush()


def assert_clean_tone(frames: list[bytes], seconds: float) -> None:
    """Whole frames, no header bytes, and the decoded audio is the 440 Hz tone at 8 kHz."""
    assert frames and all(len(f) == 160 for f in frames)
    out = b"".join(frames)
    assert b"RIFF" not in out and b"WAVE" not in out and b"fmt " not in out
    expected_samples = int(8000 * seconds)
    assert abs(len(out) - expected_samples) < 160 + 4  # padding to a frame + resampler rounding
    got = decode(np.frombuffer(out, np.uint8))[:expected_samples].astype(np.float64)
    want = tone_int16(8000, seconds).astype(np.float64)[: len(got)]
    interior = slice(80, len(got) - 80)  # the filter's start and end transients
    noise = got[interior] - want[interior]
    snr_db = 10 * np.log10(np.mean(want[interior] ** 2) / np.mean(noise**2))
    assert snr_db > 30, snr_db  # μ-law itself gives ~38 dB; a misaligned byte gives < 0 dB


CHUNKINGS: list[int | str] = [333, 1, 7, 160, 100_000, "random"]


def seconds_for(size: int | str) -> float:
    return 0.1 if size == 1 else 0.3  # one-byte pushes are slow; 100 ms still spans 5 frames


# --- μ-law 8 kHz: bytes untouched ---


@pytest.mark.parametrize("size", [333, 1, 7, 159, 160, 161, 4096])
def test_native_mulaw_passes_through_byte_for_byte(size: int) -> None:
    data = random.Random(size).randbytes(5000).replace(b"R", b"S")  # raw audio, never "RIFF"
    frames = run(TwilioAudioConverter(TWILIO_FORMAT), split(data, size))
    joined = b"".join(frames)
    assert joined[: len(data)] == data
    assert joined[len(data) :] == bytes([MULAW_SILENCE]) * (len(joined) - len(data))
    assert len(frames) == -(-len(data) // 160)


@pytest.mark.parametrize("seed", range(20))
def test_native_mulaw_random_chunkings_are_identity(seed: int) -> None:
    rng = random.Random(seed)
    data = b"\x00" + rng.randbytes(rng.randint(0, 3000))
    converter = TwilioAudioConverter(TWILIO_FORMAT)
    frames = run(converter, split(data, "random", seed))
    assert b"".join(frames)[: len(data)] == data


@pytest.mark.parametrize("size", CHUNKINGS)
def test_native_mulaw_tone(size: int | str) -> None:
    secs = seconds_for(size)
    assert_clean_tone(
        run(TwilioAudioConverter(TWILIO_FORMAT), split(mulaw(8000, secs), size)), secs
    )


# --- formats that need work ---


@pytest.mark.parametrize("size", CHUNKINGS)
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 48000])
def test_linear16_sources(rate: int, size: int | str) -> None:
    converter, secs = TwilioAudioConverter(AudioFormat("linear16", rate)), seconds_for(size)
    assert_clean_tone(run(converter, split(linear16(rate, secs), size)), secs)


@pytest.mark.parametrize("size", CHUNKINGS)
def test_mulaw_16k_source(size: int | str) -> None:
    converter, secs = TwilioAudioConverter(AudioFormat("mulaw", 16000)), seconds_for(size)
    assert_clean_tone(run(converter, split(mulaw(16000, secs), size)), secs)


def test_linear16_8k_is_just_encoded() -> None:
    pcm = linear16(8000, 0.1)
    frames = run(TwilioAudioConverter(AudioFormat("linear16", 8000)), split(pcm, 333))
    assert b"".join(frames)[:800] == pcm16_to_mulaw(pcm)


def test_odd_bytes_at_the_end_of_linear16_are_dropped() -> None:
    pcm = linear16(8000, 0.02)  # exactly one frame of samples
    frames = run(
        TwilioAudioConverter(AudioFormat("linear16", 8000)), [pcm[:-1], pcm[-1:] + b"\x7f"]
    )
    assert frames == [pcm16_to_mulaw(pcm)]


# --- WAV headers, expected or not ---


@pytest.mark.parametrize("size", CHUNKINGS)
@pytest.mark.parametrize("container", ["wav", "none"])
def test_wav_headed_linear16_is_stripped(size: int | str, container: str) -> None:
    source = AudioFormat("linear16", 24000, container)  # type: ignore[arg-type]
    converter, secs = TwilioAudioConverter(source), seconds_for(size)
    assert_clean_tone(run(converter, split(as_wav(linear16(24000, secs), 24000), size)), secs)


@pytest.mark.parametrize("size", [1, 7, 333])
def test_wav_headed_native_mulaw_payload_is_untouched(size: int) -> None:
    payload = mulaw(8000, 0.2)
    frames = run(
        TwilioAudioConverter(TWILIO_FORMAT), split(as_wav(payload, 8000, encoding="mulaw"), size)
    )
    assert b"".join(frames)[: len(payload)] == payload
    assert len(frames) == 10


def test_header_wins_over_the_declared_source() -> None:
    # Asked for μ-law 8 kHz, got a 24 kHz PCM WAV: convert what the bytes really are.
    converter = TwilioAudioConverter(TWILIO_FORMAT)
    data = as_wav(linear16(24000), 24000)
    frames = converter.push(data[:100])
    assert converter.header is not None
    assert converter.effective_format == AudioFormat("linear16", 24000)
    frames += converter.push(data[100:])
    assert_clean_tone(frames + converter.flush(), 0.5)


def test_effective_format_is_the_source_without_a_header() -> None:
    converter = TwilioAudioConverter(AudioFormat("linear16", 16000, "wav"))
    converter.push(linear16(16000, 0.05))
    assert converter.header is None
    assert converter.effective_format == AudioFormat("linear16", 16000, "wav")


def test_unsupported_wav_raises() -> None:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(b"\x00" * 400)
    with pytest.raises(WavError, match="mono"):
        TwilioAudioConverter(AudioFormat("linear16", 24000)).push(out.getvalue())


# --- stream edges ---


@pytest.mark.parametrize(
    "source", [TWILIO_FORMAT, AudioFormat("linear16", 24000), AudioFormat("mulaw", 16000)]
)
def test_empty_stream_gives_no_frames(source: AudioFormat) -> None:
    converter = TwilioAudioConverter(source)
    assert converter.push(b"") == []
    assert converter.flush() == []
    assert convert_all(source, b"") == b""


def test_a_header_with_no_audio_gives_no_frames() -> None:
    converter = TwilioAudioConverter(AudioFormat("linear16", 24000))
    assert run(converter, split(as_wav(b"", 24000), 5)) == []


def test_a_truncated_header_gives_no_frames() -> None:
    converter = TwilioAudioConverter(AudioFormat("linear16", 24000))
    assert run(converter, [as_wav(b"", 24000)[:30]]) == []


@pytest.mark.parametrize("tiny", [b"R", b"RI", b"RIF"])
def test_a_tiny_stream_that_looked_like_riff_is_still_audio(tiny: bytes) -> None:
    frames = run(TwilioAudioConverter(TWILIO_FORMAT), [tiny])
    assert frames == [tiny + bytes([MULAW_SILENCE]) * (160 - len(tiny))]


def test_a_single_pcm_sample_survives_resampling_or_not_but_frames_stay_whole() -> None:
    frames = run(TwilioAudioConverter(AudioFormat("linear16", 24000)), [b"\x00\x10"])
    assert all(len(f) == 160 for f in frames)
    assert len(frames) <= 1


def test_converter_is_reusable_after_flush() -> None:
    converter = TwilioAudioConverter(AudioFormat("linear16", 24000))
    first = run(converter, split(as_wav(linear16(24000), 24000), 333))
    second = run(converter, split(linear16(24000), 333))  # second stream has no header
    assert converter.header is None
    assert_clean_tone(first, 0.5)
    assert_clean_tone(second, 0.5)
    assert len(first) == len(second)


def test_custom_frame_size() -> None:
    converter = TwilioAudioConverter(TWILIO_FORMAT, frame_bytes=320)
    frames = converter.push(b"\x00" * 700) + converter.flush()
    assert [len(f) for f in frames] == [320, 320, 320]


def test_convert_all_matches_streaming() -> None:
    data = as_wav(linear16(22050), 22050)
    source = AudioFormat("linear16", 22050)
    whole = convert_all(source, data)
    assert whole == b"".join(run(TwilioAudioConverter(source), [data]))
    assert len(whole) % 160 == 0
    # Chunked resampling matches whole-buffer resampling up to float rounding: a level that sits
    # on a μ-law decision boundary may land one quantisation step (≤ 512 at this loudness) away.
    streamed = b"".join(run(TwilioAudioConverter(source), split(data, 7)))
    assert len(streamed) == len(whole)
    a = decode(np.frombuffer(whole, np.uint8)).astype(int)
    b = decode(np.frombuffer(streamed, np.uint8)).astype(int)
    assert np.max(np.abs(a - b)) <= 512
    assert np.count_nonzero(a != b) < len(a) // 100
