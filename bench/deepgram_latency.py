"""Deepgram paths: how fast audio from Deepgram reaches the caller, at 1 and 200 calls at once.

Three processes, as deployed: the fake Deepgram (`python -m callspeak.testing.fake_deepgram`, 150
ms to first byte, 333-byte chunks streamed at 5x real time), `callspeak serve` pointed at it
through the base-URL settings, and this one, placing emulated Twilio calls. Each call says its own
text, so the fake's first-byte time for that text can be matched with the call's first media frame.
Both are read on the machine's monotonic clock, which every process shares.

Prints, for REST and WebSocket: first byte at the provider → first media frame at the caller
(our overhead, including loopback and the emulator's own scheduling), and time to first audio
(start → first media frame), as median / p99 / max.

    .venv/bin/python bench/deepgram_latency.py [--calls 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import callspeak_server, free_port, percentile  # noqa: E402
from callspeak.emulator import CallReport, DialOptions, dial  # noqa: E402


def start_fake(
    port: int, first_byte_delay: float, bytes_per_second: float | None = None
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "callspeak.testing.fake_deepgram",
        "--port", str(port), "--first-byte-delay", str(first_byte_delay),
    ]  # fmt: skip
    if bytes_per_second:
        cmd += ["--bytes-per-second", str(bytes_per_second)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/_fake/first-bytes", timeout=0.5)
            return proc
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the fake Deepgram did not start") from None
            time.sleep(0.05)


async def round_of_calls(url: str, calls: int, tag: str) -> list[tuple[str, CallReport]]:
    texts = [f"Caller {n} of round {tag}, hello there." for n in range(calls)]
    reports = await asyncio.gather(
        *(dial(DialOptions(url=url, parameters={"say": t}, duration=8.0)) for t in texts)
    )
    return list(zip(texts, reports, strict=True))


def stats(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name:<58} n={len(ms):<4} median {statistics.median(ms):7.1f}  "
        f"p99 {percentile(ms, 99):7.1f}  max {max(ms):7.1f} ms"
    )


async def measure(port: int, fake_port: int, calls: int, rounds: int, label: str) -> list[str]:
    url = f"ws://127.0.0.1:{port}/twilio"
    await round_of_calls(url, 1, f"warmup-{label}")
    lines = []
    for n in sorted({1, 50, calls}):
        results: list[tuple[str, CallReport]] = []
        for r in range(rounds if n > 1 else rounds * 5):
            results += await round_of_calls(url, n, f"{label}-{n}-{r}")
        async with httpx.AsyncClient() as client:
            first = (await client.get(f"http://127.0.0.1:{fake_port}/_fake/first-bytes")).json()
        overhead, ttfa = [], []
        silent = 0
        for text, report in results:
            if report.first_audio_at is None or text not in first:
                silent += 1  # heard nothing before hanging up: reported, not hidden
                continue
            ttfa.append(report.first_audio_at)
            overhead.append(report.started_at + report.first_audio_at - first[text])
        lines.append(stats(f"{label}, {n} call(s): provider first byte -> caller", overhead))
        lines.append(stats(f"{label}, {n} call(s): time to first audio", ttfa))
        if silent:
            lines.append(f"{label}, {n} call(s): {silent} of {len(results)} heard nothing in 8 s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first-byte-delay", type=float, default=0.15)
    parser.add_argument(
        "--bytes-per-second",
        type=float,
        default=40_000,
        help="the fake's streaming rate (40000 = 5x real time for 8 kHz mu-law; 0 = unpaced)",
    )
    args = parser.parse_args()
    fake_port = free_port()
    fake = start_fake(fake_port, args.first_byte_delay, args.bytes_per_second or None)
    lines: list[str] = []
    try:
        for tts, label in (("deepgram", "REST"), ("deepgram-ws", "WebSocket")):
            env = {
                "DEEPGRAM_API_KEY": "test-key",
                "CALLSPEAK_TTS": tts,
                "CALLSPEAK_FALLBACK": "none",
                "CALLSPEAK_BARGE_IN": "false",
                "CALLSPEAK_MAX_CALLS": "1000",
                "CALLSPEAK_DEEPGRAM_URL": f"http://127.0.0.1:{fake_port}",
                "CALLSPEAK_DEEPGRAM_WS_URL": f"ws://127.0.0.1:{fake_port}",
                "CALLSPEAK_DEEPGRAM_FIRST_BYTE_TIMEOUT": "10",
            }
            with callspeak_server(env) as port:
                lines += asyncio.run(measure(port, fake_port, args.calls, args.rounds, label))
    finally:
        fake.terminate()
        fake.wait(10)
    print(
        f"Deepgram paths against the fake ({args.first_byte_delay * 1000:.0f} ms first byte), "
        f"{os.cpu_count()} cores"
    )
    print("\n".join(lines))
    print(
        "targets: first byte -> first frame <= 5 ms at 1 call, <= 25 ms p99 at 200; "
        "time to first audio p99 <= 250 ms at 200 calls"
    )


if __name__ == "__main__":
    main()
