"""Throughput of the pure audio path, in CPU time (median of several runs).

Run: ``.venv/bin/python bench/audio_throughput.py [--runs N]``

Prints μ-law encode/decode speed in MB/s of input and converter speed as seconds of audio handled
per CPU-second (the number of real-time calls one core could feed), for the two shapes TTS audio
arrives in: 22050 Hz float (Piper-style) and 24000 Hz linear16 (Deepgram-style), both in 20 ms
chunks like a streaming engine delivers them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from callspeak.audio import AudioFormat, StreamResampler, TwilioAudioConverter, float_to_mulaw
from callspeak.audio.mulaw import mulaw_to_pcm16, pcm16_to_mulaw

AUDIO_SECONDS = 30.0
Chunk = TypeVar("Chunk", bytes, NDArray[np.float32])


def speech_like(rate: int, seconds: float) -> NDArray[np.float32]:
    """A few harmonics with a syllable-rate envelope and a little noise, in [-1, 1]."""
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 1100), 1))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    signal = 0.3 * envelope * voice + 0.01 * rng.standard_normal(len(t))
    return np.clip(signal, -1, 1).astype(np.float32)


def median_cpu_seconds(work: Callable[[], object], runs: int) -> float:
    timings = []
    for _ in range(runs):
        start = time.process_time()
        work()
        timings.append(time.process_time() - start)
    return statistics.median(timings)


def chunks(data: Chunk, size: int) -> list[Chunk]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def float_22050_to_twilio(pieces: list[NDArray[np.float32]]) -> None:
    resampler = StreamResampler(22050, 8000)
    out = [float_to_mulaw(resampler.process(piece)) for piece in pieces]
    out.append(float_to_mulaw(resampler.flush()))


def linear16_24000_to_twilio(pieces: list[bytes]) -> None:
    converter = TwilioAudioConverter(AudioFormat("linear16", 24000))
    for piece in pieces:
        converter.push(piece)
    converter.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs

    pcm = (speech_like(8000, 600.0) * 32767).astype("<i2").tobytes()  # 600 s of 8 kHz PCM16
    codes = pcm16_to_mulaw(pcm)
    encode_s = median_cpu_seconds(lambda: pcm16_to_mulaw(pcm), runs)
    decode_s = median_cpu_seconds(lambda: mulaw_to_pcm16(codes), runs)
    print(f"mu-law encode (PCM16 bytes in):   {len(pcm) / encode_s / 1e6:8.0f} MB/s")
    print(f"mu-law decode (mu-law bytes in):  {len(codes) / decode_s / 1e6:8.0f} MB/s")

    floats = speech_like(22050, AUDIO_SECONDS)
    float_pieces = chunks(floats, 441)  # 20 ms at 22050 Hz
    cpu = median_cpu_seconds(lambda: float_22050_to_twilio(float_pieces), runs)
    print(f"22050 Hz float -> mu-law 8k:      {AUDIO_SECONDS / cpu:8.0f} s of audio per CPU-s")

    pcm24 = (speech_like(24000, AUDIO_SECONDS) * 32767).astype("<i2").tobytes()
    pcm_pieces = chunks(pcm24, 960)  # 20 ms at 24000 Hz
    cpu = median_cpu_seconds(lambda: linear16_24000_to_twilio(pcm_pieces), runs)
    print(f"24000 Hz linear16 -> mu-law 8k:   {AUDIO_SECONDS / cpu:8.0f} s of audio per CPU-s")
    print(f"(median of {runs} runs; 20 ms input chunks for the converters)")


if __name__ == "__main__":
    main()
