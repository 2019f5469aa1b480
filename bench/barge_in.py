"""Barge-in latency: from the caller starting to speak to the server's `clear`, over 20 trials.

`callspeak serve` (offline voice, barge-in on) runs in its own process, speaking a long text;
each emulated call starts "speaking" (real speech, rendered once by the offline voice) at a random
moment mid-sentence. Speech onset is the first 20 ms frame of the caller's audio louder than
-50 dBFS (the quietest frame the detector may count); the latency is the time from that frame
being sent to `clear` being received.

    .venv/bin/python bench/barge_in.py [--trials 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import callspeak_server  # noqa: E402
from callspeak import eventloop  # noqa: E402
from callspeak.audio.mulaw import decode  # noqa: E402
from callspeak.emulator import DialOptions, dial  # noqa: E402
from callspeak.tts.piper import PiperService  # noqa: E402

STORY = (
    "Thank you for calling. Our opening hours are nine to five on weekdays, and ten to two on "
    "Saturdays. We are closed on Sundays and public holidays. For anything else, stay on the line."
)


def onset(mulaw: bytes, threshold: float = 100.0) -> float:
    frames = decode(np.frombuffer(mulaw[: len(mulaw) // 160 * 160], np.uint8)).reshape(-1, 160)
    loud = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) > threshold
    return float(np.argmax(loud)) * 0.02


async def caller_voice() -> bytes:
    service = PiperService()
    await service.start()
    try:
        return service.render_sentence("Sorry, can I ask you something?")
    finally:
        await service.aclose()


async def trials(port: int, count: int, seed: int) -> list[float]:
    voice = await caller_voice()
    speech_starts = onset(voice)
    rng = random.Random(seed)
    url = f"ws://127.0.0.1:{port}/twilio"
    latencies = []
    for _ in range(count):
        at = rng.uniform(1.0, 4.0)
        report = await dial(
            DialOptions(url=url, caller_audio=voice, caller_audio_at=at, duration=at + 1.2)
        )
        if not report.clears:
            raise RuntimeError(f"no clear after speech at {at:.2f} s:\n{report.timeline()}")
        latencies.append(report.clears[0] - (at + speech_starts))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    env = {"CALLSPEAK_TTS": "piper", "CALLSPEAK_GREETING": STORY}
    with callspeak_server(env) as port:
        latencies = eventloop.run(trials(port, args.trials, args.seed))
    ms = [v * 1000 for v in latencies]
    print(f"barge-in latency, speech onset -> clear received, {len(ms)} trials")
    print(f"median {statistics.median(ms):6.1f} ms   max {max(ms):6.1f} ms   min {min(ms):6.1f} ms")
    print("target: clear sent <= 250 ms after the caller's speech starts")


if __name__ == "__main__":
    main()
