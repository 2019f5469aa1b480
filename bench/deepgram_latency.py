"""Deepgram paths: how fast audio from Deepgram reaches the caller, at 1 and 200 calls at once.

Three processes, as deployed: the fake Deepgram (`python -m callspeak.testing.fake_deepgram`, 150
ms to first byte, 333-byte chunks streamed at 5x real time), `callspeak serve` pointed at it
through the base-URL settings, and this one, placing emulated Twilio calls. Each call says its own
text, so the fake's first-byte time for that text can be matched with the call's first media frame.
Both are read on the machine's monotonic clock, which every process shares.

Prints, for REST and WebSocket: first byte at the provider → our first media frame written to
the caller's socket (our overhead: reading the provider, framing, sending; stamped by the
``_first_frames`` hooks inside the server), the same → the emulated caller reading that frame
(adding loopback and the emulator's own scheduling: the 200 callers share the two cores with us),
and time to first audio (start → first media frame at the caller), as median / p99 / max; with
more than one call, time to first audio split at the fake: start → the fake has read the request
(our server, the network and the fake's own queue), and request read → the fake's first byte
(the configured delay plus the fake's scheduling; the WebSocket's Flush is stamped in the
callback that read it from the socket, a REST request once the fake's ASGI handler has its body);
for 1, 50 and 200 calls answered in the same instant, and for 200 calls arriving over ``--ramp``
seconds (each measured while up to 199 others are in progress); and for 200 calls in progress
answered in the same instant: placed over ``--ramp`` seconds and greeted, then a second after
the last was placed every caller presses a key (to the emulator's 20 ms tick) and the server
says each its own reply from an ``on_dtmf`` hook, as an application would; timed from the key
press to the reply's first audio at the caller, with the spread of the presses printed. With
more than one call, the p99 of each round on its own too, since one round's tail can differ from
the next by a third.
Each row also gives the server's garbage collections while it ran (how many, their time in
all, the longest: a collection pauses every call at once, and the longest shows in the
first-frame tail), and the CPU the three processes used, as a share of one core: all three share
the machine's cores, so a saturated machine shows there first. A machine reference (CPU to parse
one media message, median of 5 x 20000) is printed from before and after each voice's rows: this
machine's speed varies 2-3x between days and by half within a run, and figures compare only
beside it.

``--pin`` gives the server core 0 to itself and puts this process and the fake on the others,
as in production, where the callers (Twilio) and Deepgram are other machines: the server's own
figures then no longer wait for CPU the load generator took. On a 2-core machine the 200 callers
and the fake then share one core, so the fake's own first byte can run late under load: read the
"request read -> fake's first byte" row beside it.

``--by-name`` points the server at the fake as ``localhost`` rather than ``127.0.0.1``, so the
server has a host name to look up, as it has with ``api.deepgram.com`` (here from /etc/hosts, not
a DNS server, so it shows the server's own cost of a lookup, not the network's).

``--tls`` has the fake serve https:// and wss:// with a throw-away certificate (the openssl
command) that the server trusts through ``SSL_CERT_FILE``, as Deepgram is only reached over TLS:
every connection the server opens then costs it a TLS handshake too. The file holds certifi's
bundle as well, as a production trust store holds a hundred-odd CAs: loading it is what a TLS
context costs (a client that made one per connection paid that for every call's socket).

    .venv/bin/python bench/deepgram_latency.py [--calls 200] [--rounds 3] [--ramp 2] [--pin]
        [--by-name] [--tls]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import certifi
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import (  # noqa: E402
    callspeak_server_process,
    cpu_seconds,
    free_port,
    machine_reference_us,
    percentile,
)
from callspeak import eventloop  # noqa: E402
from callspeak.emulator import DialOptions, dial  # noqa: E402
from callspeak.heap import collect_young_less_often, freeze_startup_objects  # noqa: E402
from callspeak.testing.certificates import self_signed_certificate  # noqa: E402

#: Seconds from the last call placed to the key press of "in progress, answered at once": every
#: call's greeting ("Hello.", 0.4 s of the fake's audio) has been heard by then.
PRESS_AFTER = 1.0


@dataclass(frozen=True)
class FakeProcess:
    """The fake Deepgram's process; over TLS (https://, wss://) when ``cert`` is set."""

    proc: subprocess.Popen[bytes]
    port: int
    cert: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, scheme: str, host: str = "127.0.0.1") -> str:
        """``http``/``ws`` as given, or their TLS form when the fake serves TLS."""
        return f"{scheme}{'s' if self.cert else ''}://{host}:{self.port}"

    def client(self) -> httpx.AsyncClient:
        """A client for the fake's own endpoints (``/_fake/...``), trusting its certificate."""
        cert = self.cert
        return httpx.AsyncClient(
            base_url=self.url("http"),
            verify=True if cert is None else ssl.create_default_context(cafile=cert),
        )


def start_fake(
    port: int,
    first_byte_delay: float,
    bytes_per_second: float | None = None,
    tls: tuple[Path, Path] | None = None,
) -> FakeProcess:
    cmd = [
        sys.executable, "-m", "callspeak.testing.fake_deepgram",
        "--port", str(port), "--first-byte-delay", str(first_byte_delay),
    ]  # fmt: skip
    if bytes_per_second:
        cmd += ["--bytes-per-second", str(bytes_per_second)]
    if tls is not None:
        cmd += ["--certfile", str(tls[0]), "--keyfile", str(tls[1])]
    fake = FakeProcess(subprocess.Popen(cmd), port, None if tls is None else tls[0])
    deadline = time.monotonic() + 20
    verify = True if fake.cert is None else ssl.create_default_context(cafile=fake.cert)
    while True:
        try:
            httpx.get(f"{fake.url('http')}/_fake/first-bytes", timeout=0.5, verify=verify)
            return fake
        except httpx.HTTPError:
            if time.monotonic() > deadline or fake.proc.poll() is not None:
                raise RuntimeError("the fake Deepgram did not start") from None
            time.sleep(0.05)


@dataclass(frozen=True)
class Asked:
    """One utterance a call asked for: its text (the fake's key), when it was asked for and
    when the caller began hearing it (both on the monotonic clock; None if it heard nothing)."""

    text: str
    asked_at: float
    heard_at: float | None


async def round_of_calls(url: str, calls: int, tag: str, ramp: float = 0.0) -> list[Asked]:
    """``calls`` calls of 8 s, each greeted with its own text (asked for by ``start``); started
    together, or evenly over ``ramp`` seconds."""
    texts = [f"Caller {n} of round {tag}, hello there." for n in range(calls)]

    async def one(n: int, text: str) -> Asked:
        await asyncio.sleep(ramp * n / calls)
        report = await dial(DialOptions(url=url, parameters={"say": text}, duration=8.0))
        heard = report.first_audio_at
        start = report.started_at
        return Asked(text, start, None if heard is None else start + heard)

    return list(await asyncio.gather(*(one(n, t) for n, t in enumerate(texts))))


async def round_of_replies(url: str, calls: int, tag: str, ramp: float) -> list[Asked]:
    """``calls`` calls placed evenly over ``ramp`` seconds and greeted; a second after the last
    was placed (every greeting over), every caller presses 1 in the same instant — up to the
    emulator's 20 ms tick and each call's own start — and the server answers each with its
    own text, from its ``on_dtmf`` hook (``_first_frames``)."""
    round_start = time.monotonic()
    press_at = round_start + ramp + PRESS_AFTER

    async def one(n: int) -> Asked:
        await asyncio.sleep(ramp * n / calls)
        reply = f"Reply to caller {n} of round {tag}, you pressed one."
        lead = press_at - time.monotonic()  # the emulator counts from its start message
        options = DialOptions(
            url=url,
            parameters={"say": "Hello.", "reply": reply},
            dtmf=[(lead, "1")],
            duration=lead + 1.5,
        )
        report = await dial(options)
        if not report.dtmf_sent:
            return Asked(reply, press_at, None)
        pressed = report.dtmf_sent[0][0]
        after = [t for t in report.audio_starts if t >= pressed]
        start = report.started_at
        return Asked(reply, start + pressed, start + after[0] if after else None)

    return list(await asyncio.gather(*(one(n) for n in range(calls))))


def pin_process(pid: int, cores: set[int]) -> None:
    """Run every thread of ``pid`` on ``cores`` (Linux: affinity is per thread, and threads the
    process started before this keep their own)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cores)


def stats(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name:<62} n={len(ms):<4} median {statistics.median(ms):7.1f}  "
        f"p99 {percentile(ms, 99):7.1f}  max {max(ms):7.1f} ms"
    )


def first_frames(path: Path) -> dict[str, float]:
    """Text → when its utterance's first media frame was sent, from the ``_first_frames`` hooks'
    file (each text is said once)."""
    sent: dict[str, float] = {}
    for line in path.read_text().splitlines():
        _call_sid, stamp, text = line.split(" ", 2)
        sent[text] = float(stamp)
    return sent


def collector_pauses(path: Path, since: float, until: float) -> str:
    """The server's garbage collections that began between ``since`` and ``until`` (monotonic),
    from the ``_first_frames`` hooks' ``$BENCH_GC_PAUSES`` file: how many, their time in all and
    the longest, with its generation."""
    pauses: list[tuple[float, int]] = []
    for line in path.read_text().splitlines():
        began, took, gen = line.split()
        if since <= float(began) < until:
            pauses.append((float(took) * 1000, int(gen)))
    if not pauses:
        return "none"
    longest, generation = max(pauses)
    total = sum(took for took, _ in pauses)
    return (
        f"{len(pauses)}, {total:.1f} ms in all, the longest {longest:.1f} ms "
        f"(generation {generation})"
    )


async def measure(
    port: int, server_pid: int, fake: FakeProcess, sent_log: Path, gc_log: Path,
    calls: int, rounds: int, ramp: float, label: str,
) -> list[str]:  # fmt: skip
    url = f"ws://127.0.0.1:{port}/twilio"
    reference = machine_reference_us()
    await round_of_calls(url, 1, f"warmup-{label}")
    lines = []
    # (calls, seconds they arrive over, whether the measured speech answers a key press)
    scenarios = [(n, 0.0, False) for n in sorted({1, 50, calls})]
    if ramp > 0:
        scenarios += [(calls, ramp, False), (calls, ramp, True)]
    for n, spread, replies in scenarios:
        results: list[Asked] = []
        pids = (server_pid, fake.pid, os.getpid())
        cpu_before, wall_before = [cpu_seconds(pid) for pid in pids], time.monotonic()
        round_p99s, press_spreads = [], []  # how much one round differs from the next
        for r in range(rounds if n > 1 else rounds * 5):
            tag = f"{label}-{n}-{spread}-{r}"
            if replies:
                done = await round_of_replies(url, n, tag, spread)
                pressed = [asked.asked_at for asked in done]
                press_spreads.append((max(pressed) - min(pressed)) * 1000)
            else:
                done = await round_of_calls(url, n, tag, spread)
            waited = [a.heard_at - a.asked_at for a in done if a.heard_at is not None]
            round_p99s.append(percentile([t * 1000 for t in waited], 99))
            results += done
        wall_after = time.monotonic()
        wall = wall_after - wall_before
        used = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
        cpu = [seconds / wall for seconds in used]
        async with fake.client() as client:
            first = (await client.get("/_fake/first-bytes")).json()
            came = (await client.get("/_fake/arrivals")).json()
        sent = first_frames(sent_log)
        ours, overhead, ttfa, to_fake, in_fake = [], [], [], [], []
        silent = 0
        for asked in results:
            text = asked.text
            if asked.heard_at is None or text not in first or text not in sent:
                silent += 1  # heard nothing before hanging up: reported, not hidden
                continue
            ttfa.append(asked.heard_at - asked.asked_at)
            ours.append(sent[text] - first[text])
            overhead.append(asked.heard_at - first[text])
            to_fake.append(came[text] - asked.asked_at)
            in_fake.append(first[text] - came[text])
        if replies:
            how = f"{n} in progress, a key in each at once"
            asked_at, waited_for = "key press", "reply"
        else:
            how = f"{n} call(s) at once" if not spread else f"{n} calls over {spread:g} s"
            asked_at, waited_for = "start", "first audio"
        lines.append(stats(f"{label}, {how}: provider first byte -> our first frame", ours))
        lines.append(stats(f"{label}, {how}:   ... -> read by the emulated caller", overhead))
        lines.append(stats(f"{label}, {how}: time to {waited_for} ({asked_at} ->)", ttfa))
        if n > 1:  # each round's tail, and where the time to first audio went
            per_round = " / ".join(f"{p:.0f}" for p in round_p99s)
            lines.append(f"{label}, {how}:   p99 of each round: {per_round} ms")
            to_fake_row = f"{label}, {how}:   {asked_at} -> request read by the fake"
            lines.append(stats(to_fake_row, to_fake))
            lines.append(stats(f"{label}, {how}:   request read -> fake's first byte", in_fake))
        if press_spreads:
            spreads = " / ".join(f"{p:.0f}" for p in press_spreads)
            lines.append(f"{label}, {how}:   first to last key press, each round: {spreads} ms")
        lines.append(
            f"{label}, {how}: CPU, share of one core: server {cpu[0]:.0%}, "
            f"fake Deepgram {cpu[1]:.0%}, emulated callers {cpu[2]:.0%}"
        )
        collections = collector_pauses(gc_log, wall_before, wall_after)
        lines.append(f"{label}, {how}: the server's garbage collections: {collections}")
        if silent:
            lines.append(f"{label}, {how}: {silent} of {len(results)} heard nothing")
    lines.append(
        f"{label}: machine reference (CPU to parse one media message, in this process) "
        f"{reference:.2f} us before these rows, {machine_reference_us():.2f} us after"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first-byte-delay", type=float, default=0.15)
    parser.add_argument(
        "--ramp", type=float, default=2.0, help="seconds over which the ramped calls arrive"
    )
    parser.add_argument(
        "--bytes-per-second",
        type=float,
        default=40_000,
        help="the fake's streaming rate (40000 = 5x real time for 8 kHz mu-law; 0 = unpaced)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give the server core 0 to itself; the callers and the fake share the others",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="the fake serves https:// and wss:// (a throw-away certificate), as Deepgram does",
    )
    parser.add_argument(
        "--by-name",
        action="store_true",
        help="name the fake's host (localhost) in the server's Deepgram URLs, as in production",
    )
    args = parser.parse_args()
    deepgram_host = "localhost" if args.by_name else "127.0.0.1"
    if args.pin:
        cores = os.cpu_count() or 1
        if cores < 2:
            parser.error("--pin needs at least 2 cores")
        pin_process(os.getpid(), set(range(1, cores)))
    # This process is 200 callers at once: as in the server, a full collection walking every
    # import, or young ones re-walking 200 new calls, would pause all of them together, and the
    # pause would be counted as ours.
    freeze_startup_objects()
    collect_young_less_often()
    scratch = tempfile.TemporaryDirectory(prefix="callspeak-bench-")
    tls = self_signed_certificate(Path(scratch.name)) if args.tls else None
    fake = start_fake(free_port(), args.first_byte_delay, args.bytes_per_second or None, tls)
    trust_store = None
    if tls is not None:
        trust_store = Path(scratch.name) / "trusted.pem"
        trust_store.write_text(Path(certifi.where()).read_text() + tls[0].read_text())
    lines: list[str] = []
    # the _first_frames hooks, next to this script: when the server sent each call's first frame
    here = Path(__file__).resolve().parent
    path = [str(here), *filter(None, [os.environ.get("PYTHONPATH")])]
    try:
        for tts, label in (("deepgram", "REST"), ("deepgram-ws", "WebSocket")):
            sent_log = Path(scratch.name) / f"first-frames-{tts}"
            sent_log.touch()
            gc_log = Path(scratch.name) / f"collections-{tts}"
            gc_log.touch()
            env = {
                "PYTHONPATH": os.pathsep.join(path),
                "BENCH_FIRST_FRAMES": str(sent_log),
                "BENCH_GC_PAUSES": str(gc_log),
                "DEEPGRAM_API_KEY": "test-key",
                "CALLSPEAK_TTS": tts,
                "CALLSPEAK_FALLBACK": "none",
                "CALLSPEAK_BARGE_IN": "false",
                "CALLSPEAK_MAX_CALLS": "1000",
                "CALLSPEAK_DEEPGRAM_URL": fake.url("http", deepgram_host),
                "CALLSPEAK_DEEPGRAM_WS_URL": fake.url("ws", deepgram_host),
                "CALLSPEAK_DEEPGRAM_FIRST_BYTE_TIMEOUT": "10",
                # The fake has no concurrency limit: 200 calls' requests all go out at once, as
                # with a Deepgram plan that allows them (the default, 15, is Pay as You Go's).
                "CALLSPEAK_DEEPGRAM_MAX_CONCURRENT": "0",
                # the fake's certificate, trusted as a private CA would be, among the others
                **({"SSL_CERT_FILE": str(trust_store)} if trust_store else {}),
            }
            hooks = ("--hooks", "_first_frames:hooks")
            with callspeak_server_process(env, *hooks) as (port, server):
                if args.pin:
                    pin_process(server.pid, {0})
                lines += eventloop.run(
                    measure(
                        port, server.pid, fake, sent_log, gc_log, args.calls,
                        args.rounds, args.ramp, label,
                    )
                )  # fmt: skip
    finally:
        fake.proc.terminate()
        fake.proc.wait(10)
        scratch.cleanup()
    print(
        f"Deepgram paths against the fake ({args.first_byte_delay * 1000:.0f} ms first byte), "
        f"{os.cpu_count()} cores, event loop {eventloop.loop_name()}, "
        f"Deepgram at {fake.url('http', deepgram_host)}"
        f"{' (server pinned to core 0)' if args.pin else ''}"
    )
    print("\n".join(lines))
    print(
        "targets: first byte -> first frame <= 5 ms at 1 call, <= 25 ms p99 at 200; "
        "time to first audio p99 <= 250 ms at 200 calls"
    )


if __name__ == "__main__":
    main()
