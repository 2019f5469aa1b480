"""What the emulator puts on the wire, against a scripted server: Twilio's order, counters, timing.

The server here is a bare ``websockets`` server that records every message the emulated caller
sends and plays a fixed script (audio, marks, a clear, two messages Twilio would refuse), so the
test pins the emulator's own behaviour rather than callspeak's: one ``media`` per 20 ms tick with
consecutive chunks and sequence numbers, marks echoed in the tick that played the audio before
them (at once when nothing is queued, on ``clear`` when dropped), DTMF after the tick's media,
``stop`` last, and a report that agrees with all of it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from callspeak.clock import Clock, MonotonicClock
from callspeak.emulator import CallReport, DialOptions, EmulatedCall, dial
from callspeak.protocol import (
    Dtmf,
    Mark,
    Media,
    Start,
    Stop,
    StreamSid,
    encode_clear,
    encode_mark,
    encode_media,
    parse_message,
)

Script = list[tuple[float, Callable[[StreamSid], list[str]]]]

#: (seconds after ``start`` arrived, messages to send then)
SCRIPT: Script = [
    (
        0.0,
        lambda sid: [
            encode_media(sid, b"\x11" * 500),
            encode_mark(sid, "a"),
            "not json",  # Twilio: 31951
            encode_media(StreamSid("MZ-someone-else"), b"\x99" * 160),  # 31951, not played
        ],
    ),
    (0.20, lambda sid: [encode_mark(sid, "b")]),  # nothing queued any more: echoed at once
    (
        0.24,
        lambda sid: [
            encode_media(sid, b"\x22" * 1600),
            encode_mark(sid, "c"),
            encode_media(sid, b"\x44" * 160),
            encode_mark(sid, "d"),
        ],
    ),
    (0.30, lambda sid: [encode_clear(sid)]),  # c and d still pending: echoed, flushed
    (0.40, lambda sid: [encode_media(sid, b"\x33" * 320), encode_mark(sid, "e")]),
]

#: RFC 6455's key suffix, for a server that answers the upgrade by hand.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CALLER_AUDIO = bytes(range(1, 201)) * 2  # 400 bytes: ticks 5, 6 and 7 (the last one padded)


@dataclass
class Recording:
    """Messages the server received: (arrival on the monotonic clock, text)."""

    messages: list[tuple[float, str]] = field(default_factory=list)


@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[str, Recording]]:
    recording = Recording()

    async def handler(ws: ServerConnection) -> None:
        started = asyncio.get_running_loop().create_future()

        async def read() -> None:
            async for text in ws:
                assert isinstance(text, str)
                recording.messages.append((time.monotonic(), text))
                event = parse_message(text)
                if isinstance(event, Start) and not started.done():
                    started.set_result((time.monotonic(), event.stream_sid))

        reader = asyncio.create_task(read())
        t_start, sid = await started
        for at, messages in script:
            await asyncio.sleep(max(0.0, t_start + at - time.monotonic()))
            for message in messages(sid):
                await ws.send(message)
        await reader

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}", recording


def first_tick_with_played(report: CallReport, total: int) -> int:
    """The tick in which the ``total``-th byte of server audio played."""
    played = itertools.accumulate(report.played_per_tick)
    return next(i for i, n in enumerate(played) if n >= total)


@pytest.mark.parametrize("clock", [None, MonotonicClock()], ids=["shared ticker", "own clock"])
async def test_the_emulator_speaks_twilios_protocol_on_a_20_ms_clock(clock: Clock | None) -> None:
    async with scripted_server(SCRIPT) as (url, recording):
        options = DialOptions(
            url=url,
            duration=0.6,
            caller_audio=CALLER_AUDIO,
            caller_audio_at=0.1,
            dtmf=[(0.2, "#"), (0.2, "5")],
        )
        report = await dial(options, clock=clock)

    texts = [text for _, text in recording.messages]
    events = [parse_message(text) for text in texts]
    sid = StreamSid(options.stream_sid)

    # connected, start, …, stop; every message after connected numbered 1, 2, 3, … in order
    assert texts[0] == '{"event": "connected", "protocol": "Call", "version": "1.0.0"}'
    assert isinstance(events[1], Start) and isinstance(events[-1], Stop)
    numbered = [e for e in events[1:] if hasattr(e, "sequence_number")]
    assert [e.sequence_number for e in numbered] == list(range(1, len(events)))

    # One media message per tick, chunk n+1 and timestamp 20 n for tick n, the exact text of
    # Media.to_json: silence, except the caller's audio from 0.1 s (padded with silence).
    media = [(i, e) for i, e in enumerate(events) if isinstance(e, Media)]
    ticks = len(report.played_per_tick)
    assert ticks == 31  # 0.0 s … 0.6 s
    assert [e.chunk for _, e in media] == list(range(1, ticks + 1))
    padded = CALLER_AUDIO.ljust(480, b"\xff")
    for i, event in media:
        tick = event.chunk - 1
        assert event.timestamp == 20 * tick
        expected = padded[(tick - 5) * 160 : (tick - 4) * 160] if 5 <= tick <= 7 else b"\xff" * 160
        want = Media(event.sequence_number, sid, "inbound", tick + 1, 20 * tick, expected)
        assert texts[i] == want.to_json()

    # DTMF at 0.2 s: right after tick 10's media, in the order given
    tick_10 = next(i for i, e in media if e.chunk == 11)
    assert events[tick_10 + 1 : tick_10 + 3] == [
        Dtmf(events[tick_10 + 1].sequence_number, sid, "inbound_track", "#"),  # type: ignore[union-attr]
        Dtmf(events[tick_10 + 2].sequence_number, sid, "inbound_track", "5"),  # type: ignore[union-attr]
    ]
    assert report.dtmf_sent == [(0.2, "#"), (0.2, "5")]

    # Marks: each echoed once, in order; "a" and "e" once the audio before them has finished
    # playing — in the tick after the one that began its last frame, just before that tick's
    # media — "b" at once, "c" and "d" by the clear.
    echoes = [(i, e.name) for i, e in enumerate(events) if isinstance(e, Mark)]
    assert [name for _, name in echoes] == ["a", "b", "c", "d", "e"]
    at = {name: i for i, name in echoes}
    for name, audio_before in (("a", 500), ("e", len(report.played))):
        tick = first_tick_with_played(report, audio_before)
        following = events[at[name] + 1]
        assert isinstance(following, Media) and following.chunk == tick + 2, name
    records = {m.name: m for m in report.marks}
    assert [m.name for m in report.marks] == ["a", "b", "c", "d", "e"]
    assert [records[n].flushed for n in "abcde"] == [False, False, True, True, False]
    assert all(m.echoed_at is not None and m.echoed_at >= m.received_at for m in report.marks)
    assert records["b"].echoed_at - records["b"].received_at < 0.015  # type: ignore[operator]
    assert at["d"] == at["c"] + 1  # the clear echoes both at once

    # The report agrees with what was sent and played.
    assert report.media_messages == 4 and report.audio_bytes_received == 500 + 1600 + 160 + 320
    # Three runs of audio began arriving with nothing left to play: at 0.0, at 0.24 (the 500
    # bytes played out by 0.08 s; the 160 behind the 1600 joins their run) and at 0.4 (the
    # clear emptied the buffer). Times are the caller's, a loopback trip after the script's.
    assert len(report.audio_starts) == 3
    for got, scripted in zip(report.audio_starts, (0.0, 0.24, 0.40), strict=True):
        assert scripted <= got < scripted + 0.05, (got, scripted)
    assert report.audio_starts[0] == report.first_audio_at
    warnings = [text for _, text in report.warnings]
    assert len(warnings) == 2
    assert warnings[0].startswith("31951 invalid message: message is not valid JSON")
    assert warnings[1] == "31951 message for unknown streamSid 'MZ-someone-else'"
    assert len(report.clears) == 1 and report.ended_by == "caller"
    assert len(report.heard) == 160 * ticks
    played = bytes(report.played)
    cut = played.index(b"\x33")
    assert played[:500] == b"\x11" * 500
    assert set(played[500:cut]) == {0x22} and played[cut:] == b"\x33" * 320
    assert sum(report.played_per_tick) == len(played)
    heard = bytes(report.heard)
    for tick, taken in enumerate(report.played_per_tick):
        assert heard[tick * 160 + taken : (tick + 1) * 160] == b"\xff" * (160 - taken)

    # Timing: tick n's media is never sent before start + n × 20 ms, nor far behind it. Each
    # is timed from its arrival here, so the slack is for the start message's trip being longer
    # than a media message's: up to 5 ms on a quiet machine, just over it when another test
    # process shares the two cores (CI runs two). A tick early would be 20 ms.
    t_start = recording.messages[1][0]
    for i, event in media:
        lead = recording.messages[i][0] - t_start - 0.02 * (event.chunk - 1)
        assert -0.01 < lead < 0.25, (event.chunk, lead)


async def test_a_duration_longer_than_max_seconds_is_kept() -> None:
    """max_seconds caps a call that waits for quiet; a duration asked for is kept whole
    (`callspeak dial --duration 150` hung up at 120 s)."""
    assert DialOptions(url="ws://x", max_seconds=0.2).time_limit == 0.2
    async with scripted_server([]) as (url, _):
        report = await dial(DialOptions(url=url, duration=0.5, max_seconds=0.2))
    assert report.ended_by == "caller" and report.duration >= 0.5


async def test_a_call_the_server_closes_ends_by_server_without_a_stop() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # connected
        await ws.recv()  # start
        await asyncio.sleep(0.1)
        await ws.close()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        report = await dial(DialOptions(url=f"ws://127.0.0.1:{port}", duration=5.0))
    assert report.ended_by == "server"
    assert 0.1 <= report.duration < 1.0
    assert 4 <= len(report.played_per_tick) <= 10


async def test_a_server_that_stops_reading_holds_the_caller_back_and_nothing_is_lost() -> None:
    """Flow control as websockets' send() has it: when the write buffer is full the call waits
    for it to drain, then plays the ticks it missed back to back, in order."""
    arrivals: list[tuple[float, str]] = []

    async def handler(ws: ServerConnection) -> None:
        arrivals.append((time.monotonic(), str(await ws.recv())))  # connected
        arrivals.append((time.monotonic(), str(await ws.recv())))  # start
        await asyncio.sleep(1.0)  # not reading: the socket buffers fill up
        async for text in ws:
            arrivals.append((time.monotonic(), str(text)))

    # Small socket buffers on both sides, and a server that stops reading from the socket once
    # one message waits (max_queue), so the caller's write buffer fills within the second.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    async with serve(handler, sock=listener, compression=None, max_queue=1):
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        async with connect(
            f"ws://127.0.0.1:{port}", sock=client, compression=None, write_limit=512
        ) as websocket:
            drains = 0
            real_drain = websocket.drain

            async def drain() -> None:
                nonlocal drains
                drains += 1
                await real_drain()

            websocket.drain = drain  # type: ignore[method-assign]
            report = await EmulatedCall(DialOptions(url="unused", duration=1.5), websocket).run()

    assert drains >= 1  # the call did wait for the buffer
    assert report.ended_by == "caller" and len(report.played_per_tick) == 76
    events = [parse_message(text) for _, text in arrivals]
    assert [e.chunk for e in events if isinstance(e, Media)] == list(range(1, 77))
    assert isinstance(events[-1], Stop)
    numbered = [e.sequence_number for e in events[1:]]  # type: ignore[union-attr]
    assert numbered == list(range(1, len(events)))


async def test_a_large_message_an_empty_one_and_a_reused_mark_name_are_taken_as_twilio_does() -> (
    None
):
    """Twilio takes media of any size (here 7 minutes of audio, 4.5 MB of base64); an
    empty media message plays nothing, so no audio begins with it; a mark name sent twice is
    echoed twice, each echo recorded on its own mark."""
    big = b"\x55" * (8000 * 60 * 7)
    script: Script = [
        (0.0, lambda sid: [encode_media(sid, b""), encode_mark(sid, "again")]),
        (0.1, lambda sid: [encode_media(sid, b"\x11" * 160), encode_mark(sid, "again")]),
        (0.2, lambda sid: [encode_media(sid, big), encode_clear(sid)]),
    ]
    async with scripted_server(script) as (url, _):
        report = await dial(DialOptions(url=url, duration=0.6))
    assert report.ended_by == "caller" and report.warnings == []
    assert report.audio_bytes_received == 160 + len(big)
    assert report.first_audio_at is not None and report.first_audio_at >= 0.1
    assert report.audio_starts[0] == report.first_audio_at
    first, second = report.marks
    assert first.name == second.name == "again"
    assert first.echoed_at is not None and first.echoed_at < 0.1  # nothing before it played
    assert second.echoed_at is not None and second.echoed_at > first.echoed_at


async def test_a_server_that_never_reads_cannot_hold_dial_past_its_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server answers the upgrade, then reads nothing: the caller's writes back up, and
    hanging up (stop, close) can never complete. dial() still returns, with a report."""
    monkeypatch.setattr("callspeak.emulator.caller.STUCK_GRACE", 0.3)
    monkeypatch.setattr("callspeak.emulator.caller.HANG_UP_SECONDS", 0.3)
    stuck: list[asyncio.StreamWriter] = []

    async def answer_then_stop_reading(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        writer.transport.pause_reading()
        stuck.append(writer)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # fills within the call
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(answer_then_stop_reading, sock=sock)
    port = sock.getsockname()[1]
    original = EmulatedCall.__init__

    def small_send_buffer(self: EmulatedCall, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        transport = args[1].transport  # buffers that fill within the call, not minutes
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2048)
        transport.set_write_buffer_limits(high=1024)

    monkeypatch.setattr(EmulatedCall, "__init__", small_send_buffer)
    options = DialOptions(
        url=f"ws://127.0.0.1:{port}/twilio",
        duration=1.0,
        max_seconds=1.0,
        caller_audio=b"\x00" * 8000 * 60,
    )
    try:
        report = await asyncio.wait_for(dial(options), 10)
    finally:
        for writer in stuck:
            writer.close()
        server.close()
    assert report.ended_by == "timeout"  # held back in the call, past its time limit...
    assert any("stopped reading" in text for _, text in report.warnings)
    # ...and hanging up, which the stalled server can never let finish, dropped the
    # connection: dial returned (it waited for good), the report's close code unknown.
    assert report.close_code is None and report.duration < 2
