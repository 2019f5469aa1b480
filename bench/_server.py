"""Helpers for benchmarks: run `callspeak serve` in its own process, as a user would."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from callspeak.testing.processes import wait_until_listening


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def callspeak_server(env: Mapping[str, str] | None = None, *args: str) -> Iterator[int]:
    """Start `callspeak serve` on a free port in a child process; yields the port."""
    with callspeak_server_process(env, *args) as (port, _):
        yield port


@contextmanager
def callspeak_server_process(
    env: Mapping[str, str] | None = None, *args: str, log_to: Path | None = None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Like :func:`callspeak_server`, yielding the port and the process (for its CPU time). The
    server's log goes to ``log_to`` when given, else to this process's standard error."""
    port = free_port()
    full_env = {
        **os.environ,
        "CALLSPEAK_PORT": str(port),
        "CALLSPEAK_LOG_LEVEL": "warning",
        "CALLSPEAK_VALIDATE_SIGNATURES": "false",  # loopback benchmark, no Twilio
    }
    full_env.update(env or {})
    log = None if log_to is None else open(log_to, "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "callspeak.cli", "serve", *args], env=full_env, stderr=log
    )
    try:
        wait_until_listening(proc, port, timeout=60)
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(15)
        if log is not None:
            log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, from ``/proc/<pid>/stat`` (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # proc(5) fields 14, 15


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def per_call_us(work: Callable[[], object], runs: int, calls: int = 20_000) -> float:
    """µs of CPU one call of ``work`` takes: the median of ``runs`` runs of ``calls`` calls."""
    timings = []
    for _ in range(runs):
        start = time.process_time()
        for _ in range(calls):
            work()
        timings.append(time.process_time() - start)
    return statistics.median(timings) / calls * 1e6


def machine_reference_us(runs: int = 5) -> float:
    """This machine's speed now, as µs of CPU to parse one inbound media message in Twilio's form
    (the server's hottest pure path; median of ``runs`` runs of 20 000). The machine's speed
    varies 2-3x from day to day: figures from different runs compare only beside this."""
    from callspeak.protocol import Media, StreamSid, parse_message

    text = Media(41, StreamSid("MZ" + "0" * 32), "inbound", 40, 800, b"\xff" * 160).to_json()
    return per_call_us(lambda: parse_message(text), runs)
