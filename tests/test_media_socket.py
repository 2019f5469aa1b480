"""The native ``/twilio`` socket (media_socket.py): bytes in and bytes out on a recording
transport, a standalone server on loopback with injected admission and call, and the whole app
behind uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, cast

import pytest
import websockets
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.uri import parse_uri

from callspeak import media_socket
from callspeak.config import Settings
from callspeak.emulator import DialOptions, dial
from callspeak.emulator.frames import ClientTextFrames
from callspeak.frame_reader import FrameAt, frame_at
from callspeak.hooks import CallHooks
from callspeak.media_socket import INBOX_HIGH, INBOX_LOW, MediaSocket
from callspeak.protocol import Connected
from callspeak.server import Refusal, create_app
from callspeak.session import TransportClosed
from callspeak.signatures import SIGNATURE_HEADER, sign
from callspeak.testing.asgi_server import serve_asgi
from callspeak.uvicorn_ws import uvicorn_ws_protocol
from tests.conftest import RunningServer, serve_app, serving_options
from tests.conftest import Serve as ServeApp
from tests.fakes import FakeService, spoken
from tests.test_server_limits import read_until_closed, start_message, until

Serve = Callable[[MediaSocket], Coroutine[Any, Any, None]]


class RecordingTransport(asyncio.Transport):
    """What the socket wrote and asked of its transport."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.writes = 0  # calls of write()
        self.paused = self.resumed = 0
        self.eof = self.closed = self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        self.writes += 1

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default


class Wired:
    """A MediaSocket on a RecordingTransport, with websockets' client protocol as the peer.
    ``pieces`` feeds every later write in pieces of that many bytes."""

    def __init__(
        self,
        serve: Serve,
        admit: Refusal | None = None,
        *,
        max_size: int = 2**20,
        pieces: int | None = None,
        **options: Any,
    ) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections: set[Any] = set()
        self.pieces = pieces
        self.socket = MediaSocket(
            lambda request, client: admit,
            serve,
            max_size=max_size,
            connections=self.connections,
            tasks=self.tasks,
            **options,
        )
        self.transport = RecordingTransport()
        self.socket.connection_made(self.transport)
        self.client = ClientProtocol(parse_uri("ws://test/twilio"))
        self.client.send_request(self.client.connect())
        self.deliver()
        self.opening = self._read()  #: the response, and any frame sent right behind it
        self.response = self.opening[0]

    def deliver(self, extra: bytes = b"") -> None:
        """What the client has to send (and ``extra`` raw bytes), to the socket."""
        data = b"".join(self.client.data_to_send()) + extra
        step = self.pieces or len(data) or 1
        for i in range(0, len(data), step):
            self.socket.data_received(data[i : i + step])

    def _read(self) -> list[Any]:
        self.client.receive_data(bytes(self.transport.written))
        self.transport.written.clear()
        return self.client.events_received()

    def send_text(self, text: str) -> None:
        self.client.send_text(text.encode())
        self.deliver()

    def frames(self) -> list[Frame]:
        return [event for event in self._read() if isinstance(event, Frame)]

    async def finish(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def collecting() -> tuple[list[str | bytes | None], Callable[[MediaSocket], Awaitable[None]]]:
    """A server that keeps every message it receives, and the list it keeps them in."""
    got: list[str | bytes | None] = []

    async def serve(sock: MediaSocket) -> None:
        while (message := await sock.receive()) is not None:
            got.append(message)

    return got, serve


async def test_the_upgrade_is_answered_101_and_a_refusal_403_with_its_text() -> None:
    served: list[MediaSocket] = []

    async def serve(sock: MediaSocket) -> None:
        served.append(sock)

    wired = Wired(serve)
    assert isinstance(wired.response, Response) and wired.response.status_code == 101
    await asyncio.sleep(0)
    assert served == [wired.socket]
    await wired.finish()

    refused = Wired(serve, admit=Refusal("full", "server full: too many calls"))
    assert refused.response.status_code == 403
    assert refused.response.body == b"server full: too many calls"
    assert refused.transport.eof and not refused.tasks  # no call for a refused upgrade


async def test_reading_pauses_when_the_call_falls_behind_and_resumes_once_it_catches_up() -> None:
    go = asyncio.Event()
    got: list[str | bytes | None] = []
    resumed_after: list[int] = []  # messages read when reading resumed

    async def serve(sock: MediaSocket) -> None:
        await go.wait()
        while (message := await sock.receive()) is not None:
            got.append(message)
            if wired.transport.resumed and not resumed_after:
                resumed_after.append(len(got))
            if len(got) == INBOX_HIGH + 10:
                return

    wired = Wired(serve)
    await asyncio.sleep(0)
    for n in range(INBOX_HIGH - 1):
        wired.send_text(f"m{n}")
    assert wired.transport.paused == 0
    wired.send_text(f"m{INBOX_HIGH - 1}")
    assert wired.transport.paused == 1  # at INBOX_HIGH unread messages
    for n in range(INBOX_HIGH, INBOX_HIGH + 10):
        wired.send_text(f"m{n}")  # what was already in flight is still taken
    assert wired.transport.paused == 1 and wired.transport.resumed == 0
    go.set()
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    assert got == [f"m{n}" for n in range(INBOX_HIGH + 10)]
    assert wired.transport.resumed == 1  # once, on reaching INBOX_LOW
    assert resumed_after == [INBOX_HIGH + 10 - INBOX_LOW]  # with INBOX_LOW left unread
    assert INBOX_LOW < INBOX_HIGH


async def test_send_waits_while_the_transport_is_full_and_fails_if_the_peer_goes() -> None:
    async def serve(sock: MediaSocket) -> None:
        await asyncio.Event().wait()

    wired = Wired(serve)
    sock = wired.socket
    await sock.send("one")
    sock.pause_writing()
    waiting = asyncio.create_task(sock.send("two"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    sock.resume_writing()
    await asyncio.wait_for(waiting, 1)
    sock.pause_writing()
    lost = asyncio.create_task(sock.send("three"))
    await asyncio.sleep(0.01)
    sock.connection_lost(None)
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(lost, 1)
    assert [bytes(f.data) for f in wired.frames()] == [b"one", b"two", b"three"]
    with pytest.raises(TransportClosed):
        await sock.send("four")
    assert await sock.receive() is None
    await wired.finish()


async def test_messages_sent_together_are_one_write_in_order_and_none_once_closed() -> None:
    """send_all hands the transport one write: written one by one, the first went out alone
    and, on a loaded machine, the rest reached the peer up to 70 ms later (a caller heard a gap
    in a second of audio sent at once)."""

    async def serve(sock: MediaSocket) -> None:
        await asyncio.Event().wait()

    wired = Wired(serve)
    sock, transport = wired.socket, wired.transport
    before = transport.writes
    await sock.send_all(["one", "two", "three"])
    assert transport.writes == before + 1
    await sock.send("four")
    assert transport.writes == before + 2
    assert [bytes(f.data) for f in wired.frames()] == [b"one", b"two", b"three", b"four"]
    sock.connection_lost(None)
    with pytest.raises(TransportClosed):
        await sock.send_all(["five", "six"])
    assert transport.writes == before + 2 and not transport.written
    await wired.finish()


async def test_fragments_are_joined_binary_kept_and_bad_utf8_closes_with_1007() -> None:
    await _fragments_binary_and_bad_utf8(None)


async def test_the_same_stream_fed_byte_by_byte_reads_the_same() -> None:
    await _fragments_binary_and_bad_utf8(1)


async def _fragments_binary_and_bad_utf8(pieces: int | None) -> None:
    got: list[str | bytes | None] = []

    async def serve(sock: MediaSocket) -> None:
        while (message := await sock.receive()) is not None:
            got.append(message)
        got.append(None)

    wired = Wired(serve, pieces=pieces)
    await asyncio.sleep(0)
    client = wired.client
    client.send_text(b"first " * 30)  # a 16-bit length
    client.send_text(b'{"event":', fin=False)
    client.send_ping(b"ping")  # between two fragments: answered, the message goes on
    client.send_continuation(b'"connected"}', fin=True)
    client.send_binary(b"\x00\x01")
    client.send_text(b"x" * 70000)  # a 64-bit length
    client.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
    client.send_text(b'{"event":"stop"}')  # after the 1007: never delivered
    wired.deliver()
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    assert got == ["first " * 30, '{"event":"connected"}', b"\x00\x01", "x" * 70000, None]
    frames = wired.frames()
    assert [f.opcode for f in frames] == [Opcode.PONG, Opcode.CLOSE]
    assert frames[-1].data[:2] == (1007).to_bytes(2, "big")


async def test_a_handler_given_as_the_stream_is_accepted_sees_messages_before_its_task_runs() -> (
    None
):
    """serve() is called in the callback that sends the 101, so a handler it sets takes the
    first messages before the call's task has had a turn. One it declines is queued for the
    reader; while the reader is busy with it, later messages wait too — even once nothing is
    queued — and are handed over again only when it asks for the next one."""
    handled: list[str | bytes] = []
    received: list[str | bytes] = []
    release = asyncio.Event()

    def handler(message: str | bytes) -> bool:
        if message != "mine":
            return False
        handled.append(message)
        return True

    async def reader(sock: MediaSocket) -> None:
        while (message := await sock.receive()) is not None:
            received.append(message)
            if message == "the reader's":
                await release.wait()  # busy with it, the inbox empty

    def serve(sock: MediaSocket) -> Coroutine[Any, Any, None]:
        sock.deliver_to(handler)
        return reader(sock)

    wired = Wired(serve)
    for text in ("mine", "the reader's", "mine"):  # one read, before the task's first turn
        wired.client.send_text(text.encode())
    wired.deliver()
    assert handled == ["mine"] and received == []  # the second "mine" queued behind the other
    for _ in range(3):
        await asyncio.sleep(0)
    assert received == ["the reader's"]
    release.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert received == ["the reader's", "mine"]
    release.clear()
    wired.send_text("the reader's")  # the reader waits: declined, so it takes it (and waits)
    for _ in range(3):
        await asyncio.sleep(0)
    assert received[-1] == "the reader's"
    wired.send_text("mine")  # the reader is busy and nothing is queued: still not handed over
    assert handled == ["mine"]
    release.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert received == ["the reader's", "mine", "the reader's", "mine"]
    wired.send_text("mine")  # the reader waits again: handed over at once
    assert handled == ["mine", "mine"] and len(received) == 4
    await wired.finish()


async def test_a_serve_that_fails_as_the_stream_is_accepted_closes_it_with_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def serve(sock: MediaSocket) -> Coroutine[Any, Any, None]:
        raise RuntimeError("a bug in setting the call up")

    wired = Wired(serve)
    assert wired.response.status_code == 101 and not wired.tasks
    close = wired.opening[-1]
    assert (
        isinstance(close, Frame)
        and close.opcode is Opcode.CLOSE
        and close.data[:2] == (1011).to_bytes(2, "big")
    )
    assert "setting up the media stream from" in caplog.text
    assert await asyncio.wait_for(wired.socket.receive(), 1) is None


async def test_a_failing_handler_closes_the_stream_with_1011_and_sees_nothing_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str | bytes] = []

    def broken(message: str | bytes) -> bool:
        seen.append(message)
        raise RuntimeError("a bug")

    async def serve(sock: MediaSocket) -> None:
        sock.deliver_to(broken)
        assert await sock.receive() is None

    wired = Wired(serve)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for text in ("anything", "media-1", "media-2"):  # one read
        wired.client.send_text(text.encode())
    wired.deliver()
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    close = wired.frames()[-1]
    assert close.opcode is Opcode.CLOSE and close.data[:2] == (1011).to_bytes(2, "big")
    assert "handling an inbound message failed" in caplog.text
    assert seen == ["anything"]


async def test_close_drops_the_connection_if_the_peer_never_answers() -> None:
    async def serve(sock: MediaSocket) -> None:
        await sock.close(1000, "hangup")

    wired = Wired(serve, close_timeout=0.05)
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    close = wired.frames()[-1]
    assert close.opcode is Opcode.CLOSE and close.data == b"\x03\xe8hangup"
    assert not wired.transport.aborted
    await asyncio.sleep(0.1)
    assert wired.transport.aborted  # the peer never sent its close frame


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (Frame(Opcode.TEXT, b"x" * 2000).serialize(mask=True), 1009),  # over max_size
        (b"\xc1" + ClientTextFrames().frame(b"hi")[1:], 1002),  # reserved bit, no extension
        (Frame(Opcode.CONT, b"orphan").serialize(mask=True), 1002),  # continuing nothing
        (Frame(Opcode.TEXT, b"plain").serialize(mask=False), 1002),  # unmasked
        (
            Frame(Opcode.TEXT, b"start", fin=False).serialize(mask=True)
            + Frame(Opcode.TEXT, b"cuts in").serialize(mask=True),
            1002,
        ),  # inside a fragmented one
    ],  # fmt: skip
    ids=["too-big", "reserved-bit", "orphan-continuation", "unmasked", "cuts-into-fragments"],
)
async def test_broken_frames_are_websockets_to_refuse(frame: bytes, code: int) -> None:
    got, serve = collecting()

    wired = Wired(serve, max_size=1024)
    await asyncio.sleep(0)
    wired.client.send_text(b"before")
    wired.deliver(frame)
    wired.client.send_text(b"after")
    wired.deliver()
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    assert got == ["before"]
    close = wired.frames()[-1]
    assert close.opcode is Opcode.CLOSE and close.data[:2] == code.to_bytes(2, "big")


async def test_a_message_of_max_size_is_delivered_and_one_byte_more_closes_with_1009() -> None:
    got, serve = collecting()

    wired = Wired(serve, max_size=1024)
    await asyncio.sleep(0)
    wired.send_text("x" * 1024)
    wired.send_text("y" * 1025)
    wired.send_text("after")
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    assert got == ["x" * 1024]
    close = wired.frames()[-1]
    assert close.opcode is Opcode.CLOSE and close.data[:2] == (1009).to_bytes(2, "big")


async def test_nothing_the_peer_sends_after_its_close_frame_is_delivered() -> None:
    """A close frame and a message behind it in one read: the call sees the close, not the
    message (websockets reads nothing after a close)."""
    got, serve = collecting()

    wired = Wired(serve)
    await asyncio.sleep(0)
    wired.client.send_text(b"before")
    wired.client.send_close(1000)
    late = Frame(Opcode.TEXT, b"after the close").serialize(mask=True)
    wired.deliver(late)
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    assert got == ["before"]
    assert wired.frames()[-1].opcode is Opcode.CLOSE  # the close echoed


async def test_receive_keeps_answering_none_once_the_stream_has_ended() -> None:
    """A reader asking again after the end is told again, not left waiting for good."""
    ends: list[str | bytes | None] = []

    async def serve(sock: MediaSocket) -> None:
        while await sock.receive() is not None:
            pass
        ends.append(await asyncio.wait_for(sock.receive(), 1))

    wired = Wired(serve)
    await asyncio.sleep(0)
    wired.send_text("one")
    wired.client.send_close(1000)
    wired.deliver()
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    assert ends == [None]


async def test_frames_sent_right_behind_the_request_are_read_after_the_101() -> None:
    got: list[str | bytes | None] = []

    async def serve(sock: MediaSocket) -> None:
        got.append(await sock.receive())

    tasks: set[asyncio.Task[None]] = set()
    sock = MediaSocket(
        lambda request, client: None, serve, max_size=2**20, connections=set(), tasks=tasks
    )
    transport = RecordingTransport()
    sock.connection_made(transport)
    client = ClientProtocol(parse_uri("ws://test/twilio"))
    client.send_request(client.connect())
    request = b"".join(client.data_to_send())
    early = Frame(Opcode.TEXT, b"early").serialize(mask=True)
    sock.data_received(request[:10])
    sock.data_received(request[10:] + early[:3])  # the request's end and a frame's start
    sock.data_received(early[3:])
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert transport.written.startswith(b"HTTP/1.1 101")
    assert got == ["early"]


# -- the whole app behind uvicorn ------------------------------------------------------------


@contextlib.asynccontextmanager
async def native_server(idle_timeout: float) -> AsyncIterator[RunningServer]:
    """A server whose /twilio is the native socket, with a short close timeout."""
    settings = Settings(validate_signatures=False, idle_timeout=idle_timeout)
    app = create_app(settings, tts=FakeService())
    options = serving_options(app, ws=uvicorn_ws_protocol(app, close_timeout=0.3))
    async with serve_asgi(app, **options) as url:
        yield RunningServer(url, app)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with native_server(idle_timeout=0.3) as running:
        yield running


async def test_twilio_is_served_natively_and_other_paths_reach_the_asgi_app(
    server: RunningServer,
) -> None:
    dialed = asyncio.create_task(
        dial(DialOptions(url=server.ws_url, parameters={"say": "Native."}, quiet_seconds=0.2))
    )
    session = await asyncio.wait_for(server.state.calls.wait_for(), 5)
    assert isinstance(session.transport, MediaSocket)
    report = await asyncio.wait_for(dialed, 10)
    assert report.played.rstrip(b"\xff") == spoken("Native.").rstrip(b"\xff")
    other = server.ws_url.replace("/twilio", "/elsewhere")
    with pytest.raises(InvalidStatus) as refused:  # Starlette: no such WebSocket route
        async with websockets.connect(other):
            pass
    assert refused.value.response.status_code == 403
    await until(lambda: server.state.calls.connections == 0)


async def test_pings_are_answered_and_shutdown_closes_with_1012() -> None:
    app = create_app(Settings(validate_signatures=False), tts=FakeService())
    async with serve_app(app) as url:
        ws = await websockets.connect(url.replace("http", "ws", 1) + "/twilio")
        await ws.send(Connected("Call", "1.0.0").to_json())
        await ws.send(start_message())
        await asyncio.wait_for(await ws.ping(), 2)
    await read_until_closed(ws)
    assert ws.close_code == 1012


async def test_a_broken_handshake_gets_websockets_400_and_takes_no_slot(
    server: RunningServer,
) -> None:
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(
            b"GET /twilio HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"  # no Sec-WebSocket-Key
        )
        answer = await asyncio.to_thread(raw.recv, 4096)
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"Sec-WebSocket-Key" in answer
    assert server.state.calls.connections == 0


async def test_a_peer_that_ignores_the_close_is_dropped_and_its_slot_freed(
    server: RunningServer,
) -> None:
    host, port = server.base_url.removeprefix("http://").split(":")
    client = ClientProtocol(parse_uri(server.ws_url))
    request: Request = client.connect()
    client.send_request(request)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"".join(client.data_to_send()))
        events: list[Any] = []
        while not events:  # the 101
            client.receive_data(await asyncio.to_thread(raw.recv, 65536))
            events = client.events_received()
        client.send_text(Connected("Call", "1.0.0").to_json().encode())
        client.send_text(start_message().encode())
        raw.sendall(b"".join(client.data_to_send()))
        began = time.monotonic()
        while True:  # the greeting, then the idle timeout's close frame; never answered
            try:
                chunk = await asyncio.to_thread(raw.recv, 65536)
            except ConnectionResetError:  # dropped with a reset rather than a FIN
                break
            if not chunk:
                break
            client.receive_data(chunk)
            events += client.events_received()
        ended = time.monotonic() - began
    frames = [e for e in events if isinstance(e, Frame)]
    assert frames[-1].opcode is Opcode.CLOSE
    assert frames[-1].data == b"\x03\xe8idle timeout"
    assert 0.5 <= ended < 3  # 0.3 s idle + 0.3 s waiting for our close frame
    await until(lambda: server.state.calls.connections == 0)


# -- what the review of the first version found ------------------------------------------------


def _close_after_a_reset(loop_factory: Callable[[], asyncio.AbstractEventLoop] | None) -> Any:
    """A peer resets the connection right after the 101; the call then closes its socket (as
    serve_stream does on the way out). Returns what that close raised, or None."""

    async def main() -> BaseException | None:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[BaseException | None] = loop.create_future()

        async def serve(sock: MediaSocket) -> None:
            try:
                while await sock.receive() is not None:
                    pass
                await sock.close()
            except Exception as exc:
                outcome.set_result(exc)
                return
            outcome.set_result(None)

        tasks: set[asyncio.Task[None]] = set()
        server = await loop.create_server(
            lambda: MediaSocket(
                lambda request, client: None, serve, max_size=2**20, connections=set(), tasks=tasks
            ),
            "127.0.0.1",
            0,
        )
        port = server.sockets[0].getsockname()[1]
        client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/twilio"))
        client.send_request(client.connect())
        raw = socket.socket()
        raw.setblocking(False)
        try:
            await loop.sock_connect(raw, ("127.0.0.1", port))
            await loop.sock_sendall(raw, b"".join(client.data_to_send()))
            client.receive_data(await loop.sock_recv(raw, 4096))
            assert client.events_received()[0].status_code == 101
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            raw.close()  # with SO_LINGER 0: a reset, not a FIN
        try:
            return await asyncio.wait_for(outcome, 5)
        finally:
            server.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_closing_after_the_peer_reset_the_connection_raises_nothing(loop: str) -> None:
    factory = None
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop  # its closed transports raise on write; asyncio's don't
    assert _close_after_a_reset(factory) is None


class BrokenService(FakeService):
    def open(self) -> Any:
        raise RuntimeError("the voice could not open a stream")


async def test_a_call_that_cannot_be_set_up_is_closed_not_left_open(serve: ServeApp) -> None:
    app = create_app(Settings(validate_signatures=False), tts=BrokenService())
    async with serve(app) as url:
        ws = await websockets.connect(url.replace("http", "ws", 1) + "/twilio")
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert app.state.callspeak.calls.connections == 0
    assert ws.close_code in (1011, 1006)  # 1006: uvicorn's ASGI path drops the connection


class BrokenHooks(CallHooks):
    def attach(self, session: Any) -> None:
        raise RuntimeError("a hook could not attach")


async def test_a_call_that_fails_after_its_voice_opened_closes_the_voice_too(
    serve: ServeApp,
) -> None:
    """The voice is open (and, for a voice that keeps a connection per call, warming it up)
    before the rest of the call is set up: a failure after it must close the voice as well as
    the socket, or that connection stays taken until the service closes."""
    service = FakeService()
    app = create_app(Settings(validate_signatures=False), tts=service, hooks=BrokenHooks())
    async with serve(app) as url:
        ws = await websockets.connect(url.replace("http", "ws", 1) + "/twilio")
        await asyncio.wait_for(ws.wait_closed(), 5)
        [provider] = service.providers
        async with asyncio.timeout(5):
            while not provider.closed:  # noqa: ASYNC110 (the close announces nothing)
                await asyncio.sleep(0.01)
        assert app.state.callspeak.calls.connections == 0
    assert ws.close_code in (1011, 1006)


async def refused_as_full(
    serve: ServeApp,
    caplog: pytest.LogCaptureFixture,
    headers: websockets.datastructures.HeadersLike,
    settings: Settings | None = None,
    path: str = "/twilio",
    **config: Any,
) -> list[str]:
    """Open one stream with ``headers`` on a server taking one call, then a second, refused as
    full: the server's log lines, its refusal naming the client it saw among them."""
    caplog.set_level(logging.INFO)
    settings = settings or Settings(validate_signatures=False, max_calls=1)
    app = create_app(settings, tts=FakeService())
    async with serve(app, log_level="info", **config) as url:
        ws_url = url.replace("http", "ws", 1) + path
        async with websockets.connect(ws_url, additional_headers=headers):
            with pytest.raises(InvalidStatus):
                async with websockets.connect(ws_url, additional_headers=headers):
                    pass
    return [record.getMessage() for record in caplog.records]


def refusals(messages: list[str]) -> list[str]:
    return [m for m in messages if m.startswith("refused media stream")]


async def test_accepted_streams_are_logged_and_refusals_name_the_forwarded_client(
    serve: ServeApp, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7"}  # uvicorn trusts 127.0.0.1
    messages = await refused_as_full(serve, caplog, headers, path="/twilio?x=1")
    assert any('"WebSocket /twilio?x=1" [accepted]' in m for m in messages)
    assert refusals(messages)[0].startswith("refused media stream from 203.0.113.7:")


async def test_repeated_forwarded_for_and_signature_lines_are_read_not_fatal(
    serve: ServeApp, caplog: pytest.LogCaptureFixture
) -> None:
    """Proxies in a chain may each add an X-Forwarded-For line: read as one list, as uvicorn
    reads it. A repeated signature header: the first is checked, as on the ASGI route. (The
    native socket dropped both upgrades unanswered.)"""
    settings = Settings(twilio_auth_token="t", public_url="https://calls.example.com", max_calls=1)
    good = sign("t", "wss://calls.example.com/twilio", {})
    headers = [
        ("X-Forwarded-For", "198.51.100.9"),
        ("X-Forwarded-For", "203.0.113.7"),
        (SIGNATURE_HEADER, good),  # the first: valid, so the first stream is accepted
        (SIGNATURE_HEADER, "forged"),
    ]
    messages = await refused_as_full(serve, caplog, headers, settings)
    assert refusals(messages)[0].startswith("refused media stream from 203.0.113.7:")


async def test_without_proxy_headers_the_peer_is_the_client_whatever_it_forwards(
    serve: ServeApp, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn's ``proxy_headers=False`` (``--no-proxy-headers``): X-Forwarded-For is not read,
    even from a loopback peer uvicorn would otherwise trust."""
    headers = {"X-Forwarded-For": "203.0.113.7"}
    messages = await refused_as_full(serve, caplog, headers, proxy_headers=False)
    assert refusals(messages)[0].startswith("refused media stream from 127.0.0.1:")


async def test_an_empty_forwarded_hop_leaves_the_peer_as_the_client(
    serve: ServeApp, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"X-Forwarded-For": "203.0.113.7, "}  # uvicorn: the empty hop, so the peer
    messages = await refused_as_full(serve, caplog, headers)
    assert refusals(messages)[0].startswith("refused media stream from 127.0.0.1:")


# -- what a peer can make the socket hold or do: bounded by what it sends -------------------------


class Watched(MediaSocket):
    """A MediaSocket that keeps its transport where a test can see it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods.)
        self.transport = cast(asyncio.Transport, transport)
        super().connection_made(transport)


async def test_a_peer_that_pings_but_does_not_read_is_not_read_either_until_it_reads() -> None:
    """websockets answers every ping with a pong. While the peer takes none of them (writing
    paused), reading pauses too, so the pongs waiting in the transport stay near its high-water
    mark instead of growing with every ping; once the peer reads, every ping is answered."""
    loop = asyncio.get_running_loop()
    small = 16 * 1024  # kernel buffers, so that the transport's own buffer is what fills
    opened: list[Watched] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(sock: MediaSocket) -> None:
        while await sock.receive() is not None:
            pass

    def socket_with_small_buffers() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, small)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, small)
        sock.setblocking(False)
        return sock

    def accept() -> Watched:
        opened.append(
            Watched(lambda r, c: None, serve, max_size=2**20, connections=set(), tasks=tasks)
        )
        return opened[-1]

    listener = socket_with_small_buffers()  # the accepted socket inherits its buffer sizes
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = await loop.create_server(accept, sock=listener)
    raw = socket_with_small_buffers()
    pings = 32_000
    flood = memoryview(Frame(Opcode.PING, b"p" * 125).serialize(mask=True) * pings)  # 4.2 MB
    pongs = Frame(Opcode.PONG, b"p" * 125).serialize(mask=False) * pings
    try:
        await loop.sock_connect(raw, listener.getsockname())
        client = ClientProtocol(parse_uri("ws://test/twilio"))
        client.send_request(client.connect())
        await loop.sock_sendall(raw, b"".join(client.data_to_send()))
        answer = await loop.sock_recv(raw, 4096)
        assert answer.startswith(b"HTTP/1.1 101") and answer.endswith(b"\r\n\r\n")
        sent = idle = 0
        while sent < len(flood) and idle < 20:  # until the server has taken none for 0.2 s
            try:
                sent += raw.send(flood[sent : sent + 65536])
                idle = 0
            except BlockingIOError:
                idle += 1
                await asyncio.sleep(0.01)  # the server's turn to read
        held = opened[0].transport.get_write_buffer_size()
        # Under the high-water mark (64 KiB) plus the pongs to one read (256 KiB of pings).
        assert sent < len(flood) and held < 1_000_000, (sent, held)

        async def read_pongs() -> bytes:
            got = bytearray()
            while len(got) < len(pongs) and (chunk := await loop.sock_recv(raw, 65536)):
                got += chunk
            return bytes(got)

        answered, _ = await asyncio.wait_for(
            asyncio.gather(read_pongs(), loop.sock_sendall(raw, flood[sent:])), 30
        )
        assert answered == pongs
    finally:
        raw.close()
        server.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_reading_resumes_only_once_neither_the_inbox_nor_the_writes_hold_it_paused() -> None:
    go = asyncio.Event()

    async def serve(sock: MediaSocket) -> None:
        await go.wait()
        while await sock.receive() is not None:
            pass

    wired = Wired(serve)
    sock, transport = wired.socket, wired.transport
    sock.pause_writing()
    assert (transport.paused, transport.resumed) == (1, 0)
    sock.resume_writing()
    assert (transport.paused, transport.resumed) == (1, 1)
    for n in range(INBOX_HIGH):
        wired.send_text(f"m{n}")
    assert (transport.paused, transport.resumed) == (2, 1)  # the inbox is full
    sock.pause_writing()
    sock.resume_writing()  # the inbox still is
    assert (transport.paused, transport.resumed) == (2, 1)
    sock.pause_writing()
    go.set()
    for _ in range(5):
        await asyncio.sleep(0)  # the call catches up, writing is still paused
    assert (transport.paused, transport.resumed) == (2, 1)
    sock.resume_writing()
    assert (transport.paused, transport.resumed) == (2, 2)
    await wired.finish()


async def test_a_large_frame_arriving_in_small_pieces_is_parsed_once_it_is_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pieces of a frame are collected once its header gives its length: not joined and
    parsed again at each piece, which made n pieces of a frame cost n times its size."""
    scanned: list[int] = []  # bytes from the position parsed to the end of the buffer, per call

    def counting_frame_at(buffer: bytes, pos: int) -> FrameAt | None:
        scanned.append(len(buffer) - pos)
        return frame_at(buffer, pos)

    got: list[str | bytes] = []

    async def serve(sock: MediaSocket) -> None:
        while (message := await sock.receive()) is not None:
            got.append(message)

    size = 2**20  # `callspeak serve`'s ws_max_size
    wired = Wired(serve, max_size=size)
    await asyncio.sleep(0)
    monkeypatch.setattr(media_socket, "frame_at", counting_frame_at)
    wired.pieces = 64
    wired.send_text("x" * (size - 16))  # in 16,384 pieces
    wired.pieces = None
    wired.send_text("after")
    await asyncio.sleep(0)
    assert got == ["x" * (size - 16), "after"]
    assert len(scanned) < 10 and sum(scanned) < 2 * size, (len(scanned), sum(scanned))
    await wired.finish()


async def test_empty_continuation_frames_take_no_memory() -> None:
    got: list[str | bytes] = []

    async def serve(sock: MediaSocket) -> None:
        while (message := await sock.receive()) is not None:
            got.append(message)

    def held_by_media_socket() -> int:
        only = [tracemalloc.Filter(True, media_socket.__file__)]
        stats = tracemalloc.take_snapshot().filter_traces(only).statistics("filename")
        return sum(stat.size for stat in stats)

    wired = Wired(serve)
    await asyncio.sleep(0)
    wired.client.send_text(b"x", fin=False)
    wired.deliver()
    flood = Frame(Opcode.CONT, b"", fin=False).serialize(mask=True) * 20_000
    tracemalloc.start()
    try:
        before = held_by_media_socket()
        wired.socket.data_received(flood)
        grown = held_by_media_socket() - before
    finally:
        tracemalloc.stop()
    wired.client.send_continuation(b"y", fin=True)
    wired.deliver()
    await asyncio.sleep(0)
    assert got == ["xy"]
    assert grown < 4096, grown  # a list of 20,000 empty pieces held 160 kB
    await wired.finish()


@pytest.fixture
async def patient_server() -> AsyncIterator[RunningServer]:
    """As ``server``, but a call is not ended for its silence within the test's time."""
    async with native_server(idle_timeout=30) as running:
        yield running


async def _open_call(server: RunningServer) -> tuple[socket.socket, ClientProtocol]:
    """A call opened on a raw socket with a small receive buffer, by websockets' client
    protocol: connected and start sent, the 101 read."""
    host, port = server.base_url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await loop.sock_connect(raw, (host, int(port)))
    client = ClientProtocol(parse_uri(server.ws_url))
    client.send_request(client.connect())
    await loop.sock_sendall(raw, b"".join(client.data_to_send()))
    events: list[Any] = []
    while not events:
        client.receive_data(await loop.sock_recv(raw, 65536))
        events = client.events_received()
    assert events[0].status_code == 101
    client.send_text(Connected("Call", "1.0.0").to_json().encode())
    client.send_text(start_message().encode())
    await loop.sock_sendall(raw, b"".join(client.data_to_send()))
    return raw, client


async def test_a_peer_that_half_closes_without_reading_is_still_dropped(
    patient_server: RunningServer,
) -> None:
    """The peer stops reading, then sends a FIN (no close frame) while some of our output is
    still in the transport's buffer: the transport's close() waits for a drain that never
    comes, unless something aborts it."""
    loop = asyncio.get_running_loop()
    raw, client = await _open_call(patient_server)
    session = await asyncio.wait_for(patient_server.state.calls.wait_for(), 5)
    media = session.transport
    assert isinstance(media, MediaSocket)
    transport = media._transport
    assert transport is not None
    try:
        # Pings the server answers with pongs we never read, until some of them wait in the
        # transport's own buffer (the kernel's are full) but writing is not paused yet.
        for _ in range(100_000):
            if transport.get_write_buffer_size() > 0 and not media._write_paused:
                break
            client.send_ping(b"x" * 125)
            await loop.sock_sendall(raw, b"".join(client.data_to_send()))
            await asyncio.sleep(0)
        else:
            pytest.fail("the transport's buffer never filled")
        raw.shutdown(socket.SHUT_WR)  # a FIN, no close frame
        await until(lambda: patient_server.state.calls.connections == 0)  # the call ended
        await asyncio.sleep(2)  # close_timeout is 0.3 s
        assert media._lost, "the connection is still open 2 s after the peer's FIN"
    finally:
        raw.close()


@pytest.mark.parametrize("extra", [b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n"])
async def test_an_upgrade_websockets_cannot_read_gets_400_as_on_the_asgi_path(
    server: RunningServer, extra: bytes
) -> None:
    """A request httptools accepts but websockets cannot read (a body): the native path gave
    only a half-close, no status and no log line."""
    host, port = server.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /twilio HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + extra
        + b"\r\n"
    )
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert server.state.calls.connections == 0
