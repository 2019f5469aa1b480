"""The native ``/twilio`` socket (media_socket.py): bytes in and bytes out on a recording
transport, a standalone server on loopback with injected admission and call, and the whole app
behind uvicorn."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import websockets
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.uri import parse_uri

from callspeak.config import Settings
from callspeak.emulator import DialOptions, dial
from callspeak.media_socket import INBOX_HIGH, INBOX_LOW, MediaSocket, uvicorn_ws_protocol
from callspeak.protocol import Connected
from callspeak.server import Refusal, create_app
from callspeak.session import TransportClosed
from callspeak.testing.asgi_server import serve_asgi
from tests.conftest import RunningServer, serve_app, serving_options
from tests.fakes import FakeService, spoken
from tests.test_server_limits import start_message, until

Serve = Callable[[MediaSocket], Coroutine[Any, Any, None]]


class RecordingTransport(asyncio.Transport):
    """What the socket wrote and asked of its transport."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = self.resumed = 0
        self.eof = self.closed = self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

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
    """A MediaSocket on a RecordingTransport, with websockets' client protocol as the peer."""

    def __init__(self, serve: Serve, admit: Refusal | None = None, **options: Any) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections: set[Any] = set()
        self.socket = MediaSocket(
            lambda request, client: admit,
            serve,
            max_size=2**20,
            connections=self.connections,
            tasks=self.tasks,
            **options,
        )
        self.transport = RecordingTransport()
        self.socket.connection_made(self.transport)
        self.client = ClientProtocol(parse_uri("ws://test/twilio"))
        self.client.send_request(self.client.connect())
        self.socket.data_received(b"".join(self.client.data_to_send()))
        self.response = self._read()[0]

    def _read(self) -> list[Any]:
        self.client.receive_data(bytes(self.transport.written))
        self.transport.written.clear()
        return self.client.events_received()

    def send_text(self, text: str) -> None:
        self.client.send_text(text.encode())
        self.socket.data_received(b"".join(self.client.data_to_send()))

    def frames(self) -> list[Frame]:
        return [event for event in self._read() if isinstance(event, Frame)]

    async def finish(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


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

    async def serve(sock: MediaSocket) -> None:
        await go.wait()
        while (message := await sock.receive()) is not None:
            got.append(message)
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


async def test_fragments_are_joined_binary_kept_and_bad_utf8_closes_with_1007() -> None:
    got: list[str | bytes | None] = []

    async def serve(sock: MediaSocket) -> None:
        while (message := await sock.receive()) is not None:
            got.append(message)
        got.append(None)

    wired = Wired(serve)
    await asyncio.sleep(0)
    client = wired.client
    client.send_text(b'{"event":', fin=False)
    client.send_continuation(b'"connected"}', fin=True)
    client.send_binary(b"\x00\x01")
    client.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
    wired.socket.data_received(b"".join(client.data_to_send()))
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    assert got == ['{"event":"connected"}', b"\x00\x01", None]
    close = wired.frames()[-1]
    assert close.opcode is Opcode.CLOSE and close.data[:2] == (1007).to_bytes(2, "big")


async def test_a_failing_handler_closes_the_stream_with_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(message: str | bytes) -> bool:
        raise RuntimeError("a bug")

    async def serve(sock: MediaSocket) -> None:
        sock.deliver_to(broken)
        assert await sock.receive() is None

    wired = Wired(serve)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    wired.send_text("anything")
    await asyncio.wait_for(asyncio.gather(*wired.tasks), 5)
    close = wired.frames()[-1]
    assert close.opcode is Opcode.CLOSE and close.data[:2] == (1011).to_bytes(2, "big")
    assert "handling an inbound message failed" in caplog.text


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


# -- the whole app behind uvicorn ------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    app = create_app(Settings(validate_signatures=False, idle_timeout=0.3), tts=FakeService())
    options = serving_options(app, ws=uvicorn_ws_protocol(app, close_timeout=0.3))
    async with serve_asgi(app, **options) as url:
        yield RunningServer(url, app)


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
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
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
