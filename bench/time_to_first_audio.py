"""Time to first audio on the offline voice (Piper), one call and 20 at once.

Runs `callspeak serve` in its own process (as deployed) and places emulated Twilio calls from this
process. Time to first audio = from the caller's `start` message to the first `media` message
received, measured by the emulator. Prints medians and tails; the machine is noisy, so compare
figures from one run only.

    .venv/bin/python bench/time_to_first_audio.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import callspeak_server, percentile  # noqa: E402
from callspeak import eventloop  # noqa: E402
from callspeak.emulator import DialOptions, dial  # noqa: E402


async def one(url: str, say: str | None, duration: float) -> float:
    params = {"say": say} if say else {}
    report = await dial(DialOptions(url=url, parameters=params, duration=duration))
    if report.first_audio_at is None:
        raise RuntimeError("a call heard nothing")
    return report.first_audio_at


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name:<44} n={len(ms):<4} median {statistics.median(ms):7.1f} ms   "
        f"p95 {percentile(ms, 95):7.1f} ms   max {max(ms):7.1f} ms"
    )


async def measure_uncached(port: int, rounds: int) -> list[str]:
    url = f"ws://127.0.0.1:{port}/twilio"
    await one(url, "Warm up the voice.", 0.5)
    greeting = [await one(url, None, 0.6) for _ in range(rounds * 3)]
    return [row("1 call, greeting synthesised (cache off)", greeting)]


async def measure(port: int, rounds: int) -> list[str]:
    url = f"ws://127.0.0.1:{port}/twilio"
    await one(url, "Warm up the voice.", 0.5)
    lines = []
    greeting = [await one(url, None, 0.4) for _ in range(rounds * 3)]
    lines.append(row("1 call, greeting (pre-rendered at start-up)", greeting))
    cold = [
        await one(url, f"Hello caller number {n}, how are you today?", 0.6)
        for n in range(rounds * 3)
    ]
    lines.append(row("1 call, new one-sentence text (synthesised)", cold))
    concurrent_cold: list[float] = []
    concurrent_greeting: list[float] = []
    for r in range(rounds):
        concurrent_cold += await asyncio.gather(
            *(one(url, f"Round {r}, caller {n}, your code is {n} {r} {n}.", 8.0) for n in range(20))
        )
        concurrent_greeting += await asyncio.gather(*(one(url, None, 1.0) for _ in range(20)))
    lines.append(row("20 calls at once, new texts (synthesised)", concurrent_cold))
    lines.append(row("20 calls at once, greeting", concurrent_greeting))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with callspeak_server({"CALLSPEAK_TTS": "piper"}) as port:
        lines = eventloop.run(measure(port, args.rounds))
    with callspeak_server({"CALLSPEAK_TTS": "piper", "CALLSPEAK_PIPER_CACHE_MB": "0"}) as port:
        lines[1:1] = eventloop.run(measure_uncached(port, args.rounds))
    print("time to first audio, offline voice (Piper joe, 8 kHz μ-law), 2-core machine")
    print("\n".join(lines))
    print("target: ≤ 200 ms for a one-sentence greeting on one call")


if __name__ == "__main__":
    main()
