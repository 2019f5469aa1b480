"""Deepgram's concurrency limit: what callers hear when more calls speak at once than it allows.

Deepgram lets a project have 15 requests in progress at once on its Pay as You Go and Growth
plans (Aura over REST; streaming sockets are a second limit of 15) and answers 429 past it. Here
the fake Deepgram (``--max-concurrent 15``, 150 ms to first byte, 5x real time) refuses past 15
as Deepgram does, and ``callspeak serve`` (REST voice) runs once with the limit kept on its own
side (``CALLSPEAK_DEEPGRAM_MAX_CONCURRENT=15``, the default) and once without (``0``).

Calls arrive evenly over ``--ramp`` seconds; each is greeted with three sentences of its own, so
three requests one after another. The fallback voice is off (``CALLSPEAK_FALLBACK=none``): a
sentence Deepgram did not speak is heard as the apology, and the rest of that greeting is not
spoken. Printed per setting: calls whose whole greeting was Deepgram's, calls that heard the
apology, the 429s the fake answered, and time to first audio (start -> first media frame at the
caller; median / p99). The server's log goes to a file (its path is printed), so that the table
stands alone.

    .venv/bin/python bench/deepgram_limit.py [--calls 80] [--ramp 2] [--limit 15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import callspeak_server_process, free_port, percentile  # noqa: E402
from callspeak import eventloop  # noqa: E402
from callspeak.emulator import CallReport, DialOptions, dial  # noqa: E402
from callspeak.testing.fake_deepgram import synthesize  # noqa: E402
from callspeak.tts.fallback import load_apology  # noqa: E402


def greeting(n: int) -> list[str]:
    return [f"Hello caller {n}.", f"Your order {n} is ready.", f"Goodbye caller {n}."]


def start_fake(port: int, limit: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "callspeak.testing.fake_deepgram", "--port", str(port),
        "--first-byte-delay", "0.15", "--bytes-per-second", "40000",
        "--max-concurrent", str(limit),
    ]  # fmt: skip
    fake = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/_fake/counts", timeout=0.5)
            return fake
        except httpx.HTTPError:
            if time.monotonic() > deadline or fake.poll() is not None:
                raise RuntimeError("the fake Deepgram did not start") from None
            time.sleep(0.05)


async def place_calls(port: int, calls: int, ramp: float) -> list[CallReport]:
    url = f"ws://127.0.0.1:{port}/twilio"

    async def one(n: int) -> CallReport:
        await asyncio.sleep(ramp * n / calls)
        say = " ".join(greeting(n))
        return await dial(DialOptions(url=url, parameters={"say": say}, quiet_seconds=1.5))

    return list(await asyncio.gather(*(one(n) for n in range(calls))))


def row(label: str, reports: list[CallReport], counts: dict[str, object]) -> str:
    apology = load_apology()[:1600]
    whole = sum(
        1
        for n, report in enumerate(reports)
        if apology not in report.played
        and all(synthesize(s)[:1600] in report.played for s in greeting(n))
    )
    apologised = sum(1 for report in reports if apology in report.played)
    waits = [r.first_audio_at * 1000 for r in reports if r.first_audio_at is not None]
    statuses = counts["statuses"]
    assert isinstance(statuses, dict)
    return (
        f"{label:<34} Deepgram's whole greeting {whole:>3}/{len(reports)}  "
        f"apology {apologised:>3}  429s {statuses.get('429', 0):>4}  time to first audio "
        f"median {statistics.median(waits):6.0f} p99 {percentile(waits, 99):6.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=80)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--limit", type=int, default=15, help="the fake's concurrency limit")
    args = parser.parse_args()
    lines, logs = [], []
    settings = (
        (str(args.limit), f"callspeak keeps the limit ({args.limit})"),
        ("0", "callspeak keeps no limit (0)"),
    )
    for ours, label in settings:
        port = free_port()
        fake = start_fake(port, args.limit)
        try:
            env = {
                "DEEPGRAM_API_KEY": "test-key",
                "CALLSPEAK_TTS": "deepgram",
                "CALLSPEAK_FALLBACK": "none",
                "CALLSPEAK_BARGE_IN": "false",
                "CALLSPEAK_MAX_CALLS": "1000",
                "CALLSPEAK_DEEPGRAM_URL": f"http://127.0.0.1:{port}",
                "CALLSPEAK_DEEPGRAM_MAX_CONCURRENT": ours,
            }
            log = Path(tempfile.gettempdir()) / f"deepgram-limit-{ours}.log"
            log.unlink(missing_ok=True)
            logs.append(str(log))
            with callspeak_server_process(env, log_to=log) as (server_port, _):
                reports = eventloop.run(place_calls(server_port, args.calls, args.ramp))
            counts = httpx.get(f"http://127.0.0.1:{port}/_fake/counts").json()
            lines.append(row(label, reports, counts))
        finally:
            fake.terminate()
            fake.wait(10)
    print(
        f"{args.calls} calls over {args.ramp:g} s, three sentences each, REST voice, against the "
        f"fake Deepgram refusing past {args.limit} in progress (150 ms first byte, 5x real time)"
    )
    print("\n".join(lines))
    print(f"the server's log of each run: {', '.join(logs)}")


if __name__ == "__main__":
    main()
