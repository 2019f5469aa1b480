"""Time to first audio on the offline voice (Piper), one call and 20 at once; and a call speaking
while 20 arrive (its silences mid-utterance).

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


async def measure_speaking(port: int, rounds: int) -> list[str]:
    """A call speaking five sentences while 20 new calls arrive at once: how long it went
    silent mid-utterance (its sentences queue behind the new calls' first words on the shared
    synthesis pool), and the new calls' time to first audio. New texts each round (no cache)."""
    url = f"ws://127.0.0.1:{port}/twilio"
    silences: list[float] = []
    longest: list[float] = []
    arriving: list[float] = []
    unheard = 0
    for r in range(rounds):
        text = " ".join(
            f"Round {r}, sentence {k}: the caller keeps listening while others arrive."
            for k in range(5)
        )
        # Ends after 3 s of quiet, not 1: a long silence mid-utterance is measured, not hung up in.
        speaking = asyncio.ensure_future(
            dial(DialOptions(url=url, parameters={"say": text}, quiet_seconds=3.0))
        )
        await asyncio.sleep(0.6)  # its first sentence is playing
        # (20 s: under load the last of them waits seconds, while the speaking call goes first)
        arriving += await asyncio.gather(
            *(
                one(url, f"Round {r}, caller {n}, your code is {n} {r} {n}.", 20.0)
                for n in range(20)
            )
        )
        report = await speaking
        gaps = [g.seconds for g in report.gaps()]
        silences.append(sum(gaps))
        longest.append(max(gaps, default=0.0))
        unheard += 5 - len(report.marks)
    return [
        row("speaking call, 20 arriving: its silence in all", silences),
        row("speaking call, 20 arriving: its longest silence", longest),
        row("speaking call, 20 arriving: theirs to first audio", arriving),
        f"speaking call, 20 arriving: sentences not heard {unheard} of {5 * rounds}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--only-speaking", action="store_true", help="only the speaking call's rows"
    )
    args = parser.parse_args()
    if args.only_speaking:
        with callspeak_server({"CALLSPEAK_TTS": "piper"}) as port:
            print("\n".join(eventloop.run(measure_speaking(port, args.rounds))))
        return
    with callspeak_server({"CALLSPEAK_TTS": "piper"}) as port:
        lines = eventloop.run(measure(port, args.rounds))
        lines += eventloop.run(measure_speaking(port, args.rounds))
    with callspeak_server({"CALLSPEAK_TTS": "piper", "CALLSPEAK_PIPER_CACHE_MB": "0"}) as port:
        lines[1:1] = eventloop.run(measure_uncached(port, args.rounds))
    print("time to first audio, offline voice (Piper joe, 8 kHz μ-law), 2-core machine")
    print("\n".join(lines))
    print("target: ≤ 200 ms for a one-sentence greeting on one call")


if __name__ == "__main__":
    main()
