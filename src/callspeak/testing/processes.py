"""Waiting for a server started as a child process (tests and benchmarks run `callspeak serve`)."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

__all__ = ["wait_until_listening"]


def wait_until_listening(
    proc: subprocess.Popen[Any], port: int, *, timeout: float, host: str = "127.0.0.1"
) -> None:
    """Return once ``host:port`` accepts a TCP connection.

    Raises :class:`RuntimeError` if ``proc`` exits first or ``timeout`` seconds pass; the message
    carries the process's captured stderr when it was started with ``stderr=PIPE`` and has ended.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            ended = proc.poll() is not None
            if ended or time.monotonic() > deadline:
                detail = f": {proc.stderr.read()}" if ended and proc.stderr is not None else ""
                problem = "exited" if ended else f"is not listening after {timeout:g} s"
                raise RuntimeError(f"{proc.args!r} {problem} (port {port}){detail}") from None
            time.sleep(0.05)
