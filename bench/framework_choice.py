"""Pick the HTTP+WebSocket stack for Twilio Media Streams by measurement.

Compares, for a call-like WebSocket workload (one ~250-byte JSON media message each way every
20 ms per call):

* ``starlette+uvicorn/sansio``   - Starlette on uvicorn, ``ws="websockets-sansio"``
* ``starlette+uvicorn/websockets`` - Starlette on uvicorn, ``ws="websockets"`` (legacy impl)
* ``aiohttp``                      - ``aiohttp.web``
* ``native``                       - uvicorn's HTTP, then callspeak's own ``/twilio`` socket
  (``callspeak.media_socket``: websockets' sans-I/O protocol without ASGI), as ``callspeak serve``
  runs it; here the call reads with ``receive()`` (the session also takes messages directly)

Each run starts a fresh server process and a fresh load-generator process (``websockets``
asyncio client, one event loop, N simultaneous calls). The stacks are interleaved run by run
(A, B, C, B, C, A, ...) so slow drifts of a noisy machine hit all of them alike. By default the
scheduler places server and client freely, so the client competes with the server for the cores
(its CPU is reported); ``--pin`` puts them on separate CPUs instead.

Measured over the steady-state window (after ``--warmup``, before the calls end):

* server CPU (utime+stime from ``/proc/<pid>/stat``) per call-second,
* client CPU (the load generator competes for the same two cores, so it is reported),
* jitter at the client: |inter-arrival gap - 20 ms|, p50 / p99 / max over all calls,
* late frames: gaps > 40 ms, as a share of all gaps,
* the server's and the client's own 20 ms timer lag p99: jitter at the client is the server's lag
  plus the client's stalls; a large client lag means the jitter is the client's, not the server's.

Run: ``.venv/bin/python bench/framework_choice.py`` (aiohttp is a dependency: the Deepgram REST
client uses it). Both processes run on the loop ``callspeak.eventloop`` picks (uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callspeak import eventloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import cpu_seconds  # noqa: E402

FRAME_S = 0.020  # Twilio media frame: 20 ms of 8 kHz mu-law = 160 bytes
LATE_S = 0.040  # a gap of two frames or more is a late frame
STACKS: dict[str, str] = {
    "sansio": "starlette+uvicorn/websockets-sansio",
    "websockets": "starlette+uvicorn/websockets",
    "aiohttp": "aiohttp.web",
    "native": "uvicorn + callspeak MediaSocket (no ASGI)",
}
SERVER_START_TIMEOUT_S = 20.0
SERVER_MAX_LIFETIME_S = 300.0  # a server whose orchestrator vanished exits by itself
CONNECT_CONCURRENCY = 32  # calls arrive over time; also keeps the accept backlog small
AUDIO = bytes(random.Random(0).randrange(256) for _ in range(8000))  # 1 s of fake mu-law


# --------------------------------------------------------------------------------------------
# shared helpers


def pin_to_cpu(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


async def sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# --------------------------------------------------------------------------------------------
# the server: one call per WebSocket, identical application code on every stack

Receive = Callable[[], Awaitable[str | None]]  # None once the peer is gone
Send = Callable[[str], Awaitable[None]]
SEND_LAG = array("d")  # (due, how late the sender's timer fired) pairs, for every frame


async def send_media(send: Send, stream_sid: str) -> None:
    """Send one outbound media message every 20 ms, drift-corrected (due = start + n * 20 ms)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = 0
    try:
        while True:
            offset = (n * 160) % len(AUDIO)
            payload = base64.b64encode(AUDIO[offset : offset + 160]).decode("ascii")
            message = {"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}
            await send(json.dumps(message, separators=(",", ":")))
            n += 1
            due = start + n * FRAME_S
            await sleep_until(due)
            SEND_LAG.extend((due, loop.time() - due))
    except asyncio.CancelledError:
        raise
    except Exception:  # the peer went away between two frames
        return


async def serve_call(receive: Receive, send: Send) -> None:
    """Read (and JSON-decode) inbound messages; stream media from ``start`` until ``stop``."""
    sender: asyncio.Task[None] | None = None
    try:
        while (text := await receive()) is not None:
            event = json.loads(text)
            kind = event.get("event")
            if kind == "start" and sender is None:
                sender = asyncio.create_task(send_media(send, event["streamSid"]))
            elif kind == "stop":
                break
    finally:
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def call(websocket: WebSocket) -> None:
        await websocket.accept()

        async def receive() -> str | None:
            try:
                return await websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return None

        await serve_call(receive, websocket.send_text)
        try:
            await websocket.close()
        except Exception:  # already closed by the peer
            pass

    return Starlette(routes=[WebSocketRoute("/call", call)])


async def run_uvicorn(sock: socket.socket, ws_impl: str, stop: asyncio.Event) -> None:
    import uvicorn

    config = uvicorn.Config(
        starlette_app(),
        http="h11",
        ws=ws_impl,  # type: ignore[arg-type]
        ws_per_message_deflate=False,
        lifespan="off",
        log_level="warning",
        access_log=False,
        backlog=1024,
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(SERVER_START_TIMEOUT_S):
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.01)
    print(sock.getsockname()[1], flush=True)
    await stop.wait()
    server.should_exit = True
    async with asyncio.timeout(5):
        await task


async def run_aiohttp(sock: socket.socket, stop: asyncio.Event) -> None:
    from aiohttp import WSMsgType, web

    async def call(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)

        async def receive() -> str | None:
            message = await ws.receive()
            return message.data if message.type is WSMsgType.TEXT else None

        await serve_call(receive, ws.send_str)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/call", call)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=1024).start()
    print(sock.getsockname()[1], flush=True)
    await stop.wait()
    async with asyncio.timeout(5):
        await runner.cleanup()


def native_protocol() -> type[asyncio.Protocol]:
    """callspeak's own ``/twilio`` socket (``callspeak.media_socket.MediaSocket``: websockets'
    sans-I/O protocol, no ASGI) as uvicorn's WebSocket protocol, serving :func:`serve_call`."""
    from callspeak.media_socket import MediaSocket

    async def call(sock: MediaSocket) -> None:
        await serve_call(sock.receive, sock.send)  # type: ignore[arg-type]
        await sock.close()

    class Native(MediaSocket):
        def __init__(self, config: Any, server_state: Any, app_state: Any) -> None:
            super().__init__(
                lambda request, client: None,
                call,
                max_size=config.ws_max_size,
                connections=server_state.connections,
                tasks=server_state.tasks,
            )

    return Native


async def read_stdin_line() -> str:
    """One line from stdin without blocking the loop; "" at EOF (the orchestrator is gone)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    buffer = bytearray()

    def on_readable() -> None:
        chunk = os.read(0, 4096)
        buffer.extend(chunk)
        if (not chunk or b"\n" in buffer) and not done.done():
            loop.remove_reader(0)
            done.set_result(buffer.decode())

    loop.add_reader(0, on_readable)
    return await done


async def control(stop: asyncio.Event) -> None:
    """Wait for "<window start> <window end>" on stdin, print the server's timer lag, stop."""
    try:
        async with asyncio.timeout(SERVER_MAX_LIFETIME_S):
            line = await read_stdin_line()
        if line.strip():
            start, end = map(float, line.split())
            pairs = zip(SEND_LAG[::2], SEND_LAG[1::2], strict=True)
            lags = sorted(lag for due, lag in pairs if start <= due < end)
            stats = {"server_lag_p99_ms": 1000 * percentile(lags, 0.99)}
            print(json.dumps(stats), flush=True)
    finally:
        stop.set()


async def serve(stack: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    controller = asyncio.create_task(control(stop))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    if stack == "aiohttp":
        await run_aiohttp(sock, stop)
    else:
        impls: dict[str, Any] = {"sansio": "websockets-sansio", "native": native_protocol()}
        ws_impl = impls.get(stack, stack)
        await run_uvicorn(sock, ws_impl, stop)
    controller.cancel()


# --------------------------------------------------------------------------------------------
# the load generator: N calls on one event loop, playing Twilio


@dataclass
class CallRecord:
    arrivals: list[float]  # loop.time() of every outbound (server -> client) message
    send_lag: list[float]  # how late the client's own 20 ms timer fired, in the window
    closed_cleanly: bool = True


def twilio_messages(stream_sid: str) -> tuple[str, str, Callable[[int], str]]:
    connected = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    start = json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_sid,
            "start": {
                "streamSid": stream_sid,
                "accountSid": "AC" + "0" * 32,
                "callSid": "CA" + stream_sid[2:],
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    )
    payload = base64.b64encode(AUDIO[:160]).decode("ascii")
    head = '{"event":"media","sequenceNumber":"'
    tail = f'","streamSid":"{stream_sid}","media":{{"track":"inbound","chunk":"%d",'
    tail += f'"timestamp":"%d","payload":"{payload}"}}}}'

    def media(n: int) -> str:
        return head + str(n + 2) + tail % (n + 1, n * 20)

    return connected, start, media


async def run_call(
    ws: Any, stream_sid: str, start: float, window: tuple[float, float], record: CallRecord
) -> None:
    from websockets.exceptions import ConnectionClosed

    loop = asyncio.get_running_loop()
    connected_msg, start_msg, media = twilio_messages(stream_sid)

    async def receive() -> None:
        append, clock = record.arrivals.append, loop.time
        try:
            async for _ in ws:
                append(clock())
        except ConnectionClosed:
            record.closed_cleanly = False

    try:
        await sleep_until(start)
        await ws.send(connected_msg)
        await ws.send(start_msg)
        receiver = asyncio.create_task(receive())
        n = 0
        while (due := start + n * FRAME_S) < window[1]:
            await sleep_until(due)
            if due >= window[0]:
                record.send_lag.append(loop.time() - due)
            await ws.send(media(n))
            n += 1
        await ws.send(json.dumps({"event": "stop", "streamSid": stream_sid}))
        await ws.close()
        await asyncio.wait_for(receiver, timeout=5)
    except (ConnectionClosed, TimeoutError):
        record.closed_cleanly = False
        await ws.close()


async def load(url: str, calls: int, duration: float, warmup: float, server_pid: int) -> None:
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one() -> Any:
        async with gate:
            return await connect(
                url, compression=None, ping_interval=None, open_timeout=10, close_timeout=2
            )

    opened = await asyncio.wait_for(
        asyncio.gather(*(open_one() for _ in range(calls)), return_exceptions=True), timeout=60
    )
    sockets = [ws for ws in opened if not isinstance(ws, BaseException)]
    failed = len(opened) - len(sockets)

    rng = random.Random(calls)  # random call phases within a frame, like real calls
    t0 = loop.time() + 0.2
    window = (t0 + warmup, t0 + duration)
    records = [CallRecord([], []) for _ in sockets]
    tasks = [
        asyncio.create_task(
            run_call(ws, f"MZ{i:032x}", t0 + rng.random() * FRAME_S, window, record)
        )
        for i, (ws, record) in enumerate(zip(sockets, records, strict=True))
    ]

    await sleep_until(window[0])
    cpu0, own0, wall0 = cpu_seconds(server_pid), time.process_time(), loop.time()
    await sleep_until(window[1])
    cpu1, own1, wall1 = cpu_seconds(server_pid), time.process_time(), loop.time()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)

    jitter: list[float] = []
    late = received = 0
    for record in records:
        in_window = [t for t in record.arrivals if window[0] <= t < window[1]]
        received += len(in_window)
        for a, b in zip(in_window, in_window[1:], strict=False):
            gap = b - a
            jitter.append(abs(gap - FRAME_S))
            late += gap > LATE_S
    jitter.sort()
    lags = sorted(lag for record in records for lag in record.send_lag)
    elapsed = wall1 - wall0
    result = {
        "calls": len(sockets),
        "failed": failed,
        "unclean": sum(not record.closed_cleanly for record in records),
        "server_cpu_ms_per_call_s": 1000 * (cpu1 - cpu0) / (len(sockets) * elapsed),
        "server_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
        "client_cpu_pct": 100 * (own1 - own0) / elapsed,
        "jitter_p50_ms": 1000 * percentile(jitter, 0.50),
        "jitter_p99_ms": 1000 * percentile(jitter, 0.99),
        "jitter_max_ms": 1000 * (jitter[-1] if jitter else float("nan")),
        "late_pct": 100 * late / max(1, len(jitter)),
        "received_pct": 100 * received / (len(sockets) * (window[1] - window[0]) / FRAME_S),
        "client_lag_p99_ms": 1000 * percentile(lags, 0.99),
        "window_start": window[0],
        "window_end": window[1],
    }
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# the orchestrator


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no line from pid {proc.pid} within {timeout} s")
    return proc.stdout.readline().strip()


def stop_process(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def run_once(
    stack: str, calls: int, args: argparse.Namespace, cpus: tuple[int | None, int | None]
) -> dict[str, float]:
    me = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve())]
    server_log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(
        [*me, "_serve", stack, *(["--cpu", str(cpus[0])] if cpus[0] is not None else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=server_log,
        text=True,
    )
    try:
        try:
            port = int(read_line(server, SERVER_START_TIMEOUT_S))
        except (TimeoutError, ValueError) as exc:
            stop_process(server)
            server_log.seek(0)
            raise RuntimeError(f"{stack} server did not start: {server_log.read()}") from exc
        client = subprocess.run(
            [
                *me,
                "_load",
                f"ws://127.0.0.1:{port}/call",
                str(calls),
                str(args.duration),
                str(args.warmup),
                str(server.pid),
                *(["--cpu", str(cpus[1])] if cpus[1] is not None else []),
            ],
            capture_output=True,
            text=True,
            timeout=args.duration + 120,
        )
        if client.returncode != 0:
            raise RuntimeError(f"load generator failed against {stack}:\n{client.stderr}")
        result: dict[str, float] = json.loads(client.stdout.strip().splitlines()[-1])
        assert server.stdin is not None
        server.stdin.write(f"{result['window_start']!r} {result['window_end']!r}\n")
        server.stdin.flush()
        result.update(json.loads(read_line(server, 10)))
        return result
    finally:
        stop_process(server)
        server_log.close()


COLUMNS: list[tuple[str, str, str]] = [
    ("server_cpu_ms_per_call_s", "srv CPU ms/call-s", "{:.2f}"),
    ("server_cpu_min", "(min", "{:.2f}"),
    ("server_cpu_max", "max)", "{:.2f}"),
    ("server_cpu_pct", "srv CPU %", "{:.0f}"),
    ("client_cpu_pct", "cli CPU %", "{:.0f}"),
    ("jitter_p50_ms", "jit p50 ms", "{:.2f}"),
    ("jitter_p99_ms", "jit p99 ms", "{:.2f}"),
    ("jitter_max_ms", "jit max ms", "{:.1f}"),
    ("late_pct", "late %", "{:.3f}"),
    ("received_pct", "recv %", "{:.1f}"),
    ("server_lag_p99_ms", "srv lag p99", "{:.2f}"),
    ("client_lag_p99_ms", "cli lag p99", "{:.2f}"),
    ("failed", "fail", "{:.0f}"),
]


def print_table(medians: dict[tuple[str, int], dict[str, float]], stacks: list[str]) -> None:
    header = ["stack", "N"] + [title for _, title, _ in COLUMNS]
    rows = [
        [STACKS[stack], str(calls)] + [fmt.format(values[key]) for key, _, fmt in COLUMNS]
        for (stack, calls), values in sorted(
            medians.items(), key=lambda item: (item[0][1], stacks.index(item[0][0]))
        )
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print(
            "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))


def conclude(medians: dict[tuple[str, int], dict[str, float]], stacks: list[str]) -> str:
    ns = sorted({calls for _, calls in medians})

    def cost(stack: str) -> float:  # geometric mean over N of CPU per call-second
        values = [medians[stack, n]["server_cpu_ms_per_call_s"] for n in ns]
        return statistics.geometric_mean(values)

    ranked = sorted(stacks, key=cost)
    best = ranked[0]
    others = ", ".join(
        f"{cost(other) / cost(best):.2f}x for {STACKS[other]}" for other in ranked[1:]
    )
    top = ns[-1]
    return (
        f"Conclusion: {STACKS[best]} is cheapest at {cost(best):.2f} ms CPU per call-second "
        f"(~{1000 / cost(best):.0f} calls/core); server CPU ratio vs it: {others}; "
        f"jitter p99 at N={top}: "
        + ", ".join(f"{STACKS[s]} {medians[s, top]['jitter_p99_ms']:.2f} ms" for s in ranked)
        + "."
    )


def benchmark(args: argparse.Namespace) -> None:
    available = sorted(os.sched_getaffinity(0))
    cpus: tuple[int | None, int | None] = (None, None)
    if args.pin and len(available) >= 2:
        cpus = (available[0], available[1])
    stacks: list[str] = args.stacks
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    began = time.monotonic()
    total = args.repeats * len(args.calls) * len(stacks)
    done = 0
    print(
        f"# {len(available)} CPUs, server on CPU {cpus[0] if args.pin else 'any'}, "
        f"client on CPU {cpus[1] if args.pin else 'any'}; "
        f"{args.duration:g} s calls, window after {args.warmup:g} s warm-up; "
        f"medians of {args.repeats} interleaved runs",
        flush=True,
    )
    for repeat in range(args.repeats):
        for calls in args.calls:
            order = stacks[repeat % len(stacks) :] + stacks[: repeat % len(stacks)]
            for stack in order:
                result = run_once(stack, calls, args, cpus)
                results.setdefault((stack, calls), []).append(result)
                done += 1
                print(
                    f"# [{done}/{total} {time.monotonic() - began:5.0f} s] {STACKS[stack]} "
                    f"N={calls}: {result['server_cpu_ms_per_call_s']:.2f} ms/call-s, "
                    f"jitter p99 {result['jitter_p99_ms']:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    for runs in results.values():
        cpu = [run["server_cpu_ms_per_call_s"] for run in runs]
        for run in runs:
            run["server_cpu_min"], run["server_cpu_max"] = min(cpu), max(cpu)
    medians = {
        key: {column: statistics.median(run[column] for run in runs) for column, _, _ in COLUMNS}
        for key, runs in results.items()
    }
    print()
    print_table(medians, stacks)
    print()
    print(conclude(medians, stacks))
    print(f"# total {time.monotonic() - began:.0f} s")


def main(argv: list[str]) -> None:
    if argv[:1] == ["_serve"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("stack", choices=STACKS)
        parser.add_argument("--cpu", type=int)
        ns = parser.parse_args(argv[1:])
        pin_to_cpu(ns.cpu)
        warnings.simplefilter("ignore", DeprecationWarning)  # uvicorn's legacy websockets impl
        warnings.simplefilter("ignore", UserWarning)
        eventloop.run(serve(ns.stack))
        return
    if argv[:1] == ["_load"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("url")
        parser.add_argument("calls", type=int)
        parser.add_argument("duration", type=float)
        parser.add_argument("warmup", type=float)
        parser.add_argument("server_pid", type=int)
        parser.add_argument("--cpu", type=int)
        ns = parser.parse_args(argv[1:])
        pin_to_cpu(ns.cpu)
        eventloop.run(load(ns.url, ns.calls, ns.duration, ns.warmup, ns.server_pid))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--stacks", nargs="+", choices=STACKS, default=list(STACKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="call length, s")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured start, s")
    parser.add_argument("--pin", action="store_true", help="server on one CPU, client on another")
    benchmark(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
