"""Waiting for a child server to listen: success, early exit with its stderr, and timeout."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from callspeak.testing.processes import wait_until_listening


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_returns_once_the_child_listens() -> None:
    port = free_port()
    script = (
        "import socket, time; s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"time.sleep(0.3); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_until_listening(proc, port, timeout=10)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_child_that_exits_is_reported_with_its_stderr() -> None:
    argv = [sys.executable, "-c", "import sys; sys.exit('no such voice')"]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) as proc:
        with pytest.raises(RuntimeError, match="exited .*no such voice"):
            wait_until_listening(proc, free_port(), timeout=10)


def test_a_child_that_never_listens_times_out() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(RuntimeError, match="is not listening after 0.3 s"):
            wait_until_listening(proc, free_port(), timeout=0.3)
    finally:
        proc.kill()
        proc.wait()
