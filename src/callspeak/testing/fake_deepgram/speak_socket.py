"""The fake's ``/v1/speak`` WebSocket served straight from the socket: websockets' sans-I/O
``ServerProtocol``, no ASGI between.

Why not Starlette's WebSocket route, as the REST side uses Starlette: in a benchmark the fake
shares a 2-core machine with the server under test and stands in for Deepgram's own fleet. Through
uvicorn's WebSocket protocol, the ASGI app and Starlette's routing, a socket that connects, asks
for one text and takes its first audio cost the fake ~0.35 ms of CPU (~0.25 ms here), so 200
calls connecting together queued behind the fake's own work. Here the handshake is answered in
the callback that reads it.

:func:`speak_socket_protocol` gives uvicorn (``ws=``) the class. uvicorn builds it with
``config``, ``server_state`` and ``app_state``, calls ``connection_made``, hands it the whole
upgrade request, re-serialized, in the first ``data_received``, and makes it the transport's
protocol (uvicorn 0.54 and 0.55, as ``callspeak.uvicorn_ws`` relies on too). Not reproduced:
permessage-deflate and keepalive pings (callspeak's client offers no extensions and needs no
pings from Deepgram). ``server_state.connections``
and ``tasks`` are uvicorn's bookkeeping for graceful shutdown.

Contract, as :class:`~callspeak.testing.fake_deepgram.websocket.WebSocketSession` sees it
(:class:`~callspeak.testing.fake_deepgram.websocket.Peer`): messages arrive in order, fragmented
ones joined, each with the ``fake.clock()`` reading of the callback that read it; ``receive()``
returns None once the client has closed, failed the protocol or gone;
``send_*`` wait while the kernel's send buffer is full and raise ``ConnectionError`` once the
socket is closing or gone; ``close()`` sends a close frame, and the TCP connection is dropped if
the client does not answer within ``close_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from callspeak.testing.fake_deepgram import FakeDeepgram, WsVerdict

log = logging.getLogger("callspeak.testing.fake_deepgram")

__all__ = ["CLOSE_TIMEOUT", "SpeakSocket", "speak_socket_protocol"]

#: The one WebSocket path Deepgram's text-to-speech serves.
SPEAK_PATH: Final = "/v1/speak"
#: Seconds a closing socket waits for the client's close frame before dropping the connection.
CLOSE_TIMEOUT: Final = 5.0
#: Unread client messages at which reading pauses, and where it resumes.
INBOX_HIGH: Final = 64
INBOX_LOW: Final = 16


class SpeakSocket(asyncio.Protocol):
    """One connection to the fake's WebSocket, from the upgrade request to the TCP close."""

    # Set on the subclass speak_socket_protocol makes:
    fake: FakeDeepgram
    close_timeout: float

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any]) -> None:
        self._conn = ServerProtocol(max_size=config.ws_max_size)
        self._connections: set[Any] = server_state.connections
        self._tasks: set[asyncio.Task[None]] = server_state.tasks
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._inbox: deque[tuple[str | bytes, float]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._fragment_opcode = Opcode.TEXT
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._ended = False  # no more client messages will be delivered
        self._lost = False
        self._close_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods.)
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._conn.receive_data(data)
        for event in self._conn.events_received():
            if isinstance(event, Request):
                self._upgrade(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()
        if self._conn.state is not State.OPEN and self._conn.state is not State.CONNECTING:
            self._end_input()

    def eof_received(self) -> bool | None:
        self._conn.receive_eof()
        self._flush()
        self._end_input()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._connections.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._end_input()
        self._resume_senders()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_senders()

    def shutdown(self) -> None:
        """uvicorn's server is stopping: close with 1012 (service restart) and drop the
        connection once that is written, without waiting for the client's answer (as uvicorn's
        own WebSocket protocols do: a client that does not answer must not hold the shutdown)."""
        if self._conn.state is State.OPEN:
            self._conn.send_close(1012, "server shutting down")
            self._flush()
        if self._transport is not None and not self._lost:
            self._transport.close()  # after the buffered bytes are written
        self._end_input()

    # -- Peer -----------------------------------------------------------------------------

    async def receive(self) -> tuple[str | bytes, float] | None:
        """The next message and when it was read; None once the socket is closing or gone."""
        inbox = self._inbox
        while not inbox:
            if self._ended:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = inbox.popleft()
        if self._reading_paused and len(inbox) <= INBOX_LOW and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return message

    async def send_text(self, text: str) -> None:
        self._check_open()
        self._conn.send_text(text.encode())
        await self._sent()

    async def send_bytes(self, data: bytes) -> None:
        self._check_open()
        self._conn.send_binary(data)
        await self._sent()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._conn.state is State.OPEN and not self._lost:
            self._conn.send_close(code, reason)
            self._flush()
        self._end_input()

    def abort(self) -> None:
        """Drop the TCP connection now, without a close frame (the client sees 1006)."""
        if self._transport is not None and not self._lost:
            self._transport.abort()
        # Gone from now on (connection_lost follows): nothing more is written to it (uvloop
        # raises on a closed handle), and senders waiting for it to drain are woken.
        self._lost = True
        self._end_input()
        self._resume_senders()

    # -- inside ---------------------------------------------------------------------------

    def _upgrade(self, request: Request) -> None:
        """Answer the upgrade: websockets' 4xx for a broken handshake, 404 off ``/v1/speak``,
        else the fake's verdict (a documented error, or 101 and the session's task)."""
        conn = self._conn
        response = conn.accept(request)
        url = urlsplit(request.path)
        path = unquote(url.path)  # as uvicorn gives ASGI apps the path
        if response.status_code == 101 and path != SPEAK_PATH:
            response = conn.reject(404, "Not Found\n")
        verdict = None
        if response.status_code == 101:
            try:
                verdict = self._verdict(request, path, url.query)
                if verdict.status == 101:
                    response.headers["dg-request-id"] = verdict.request_id
                else:
                    response = _refusal(verdict)
            except Exception:  # a bug in the fake: answer, rather than drop the connection
                log.exception("the fake Deepgram failed to answer a WebSocket handshake")
                verdict, response = None, conn.reject(500, "Internal Server Error\n")
        conn.send_response(response)
        if verdict is not None and verdict.status == 101:
            task = self.fake.serve_ws(self, verdict)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _verdict(self, request: Request, path: str, query: str) -> WsVerdict:
        headers: dict[str, str] = {}
        for name, value in request.headers.raw_items():
            headers.setdefault(name.lower(), value)  # the first one wins
        params = dict(parse_qsl(query, keep_blank_values=True))
        return self.fake.answer_ws_handshake(path, params, headers)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if not frame.fin:
                self._fragment_opcode, self._fragments = opcode, [bytes(frame.data)]
                return
            self._message(opcode, bytes(frame.data))
        elif opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self._message(self._fragment_opcode, data)
        # PING is answered and CLOSE echoed by the protocol itself; PONG needs nothing.

    def _message(self, opcode: Opcode, data: bytes) -> None:
        if self._ended:
            return  # after our close frame: read on until the client's, but deliver nothing
        if opcode is Opcode.TEXT:
            try:
                message: str | bytes = data.decode()
            except UnicodeDecodeError:
                self._conn.fail(1007, "invalid UTF-8 in a text message")
                self._end_input()
                return
        else:
            message = data
        # Stamped here, in the callback that read it: the fake's delays run from the message's
        # arrival, not from when the session's task got round to it.
        self._inbox.append((message, self.fake.clock()))
        if len(self._inbox) >= INBOX_HIGH and not self._reading_paused and not self._lost:
            assert self._transport is not None
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    def _check_open(self) -> None:
        if self._conn.state is not State.OPEN or self._lost:
            raise ConnectionError("the WebSocket is closed")

    async def _sent(self) -> None:
        self._flush()
        if self._write_paused:
            # Bounded: resume_writing or connection_lost resolves it.
            if self._drain is None:
                self._drain = self._loop.create_future()
            await asyncio.shield(self._drain)
            if self._lost:
                raise ConnectionError("the WebSocket closed while sending")

    def _flush(self) -> None:
        transport = self._transport
        if transport is None or self._lost:
            self._conn.data_to_send()  # nowhere to write it (uvloop raises on a closed handle)
            return
        for data in self._conn.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()  # the server half-closes first (RFC 6455 §7.1.1)
            else:
                transport.close()
        if self._conn.close_expected() and self._close_timer is None:
            self._close_timer = self._loop.call_later(self.close_timeout, transport.abort)

    def _end_input(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._reading_paused and self._transport is not None and not self._lost:
            self._reading_paused = False
            self._transport.resume_reading()  # to see the client's close and EOF
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume_senders(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)


def _refusal(verdict: WsVerdict) -> Response:
    """The HTTP answer refusing a handshake, as Deepgram's: the JSON error as the body and in
    ``dg-error``. Built here, not with ``ServerProtocol.reject``, which knows only the statuses
    ``http.HTTPStatus`` names (a test may inject any, e.g. 529)."""
    try:
        phrase = HTTPStatus(verdict.status).phrase
    except ValueError:
        phrase = ""
    body = verdict.error.encode()
    headers = Headers(
        [
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "application/json"),
            ("dg-request-id", verdict.request_id),
            ("dg-error", verdict.error),
            *([("Retry-After", verdict.retry_after)] if verdict.retry_after else []),
        ]
    )
    return Response(verdict.status, phrase, headers, body)


def speak_socket_protocol(
    fake: FakeDeepgram, *, close_timeout: float = CLOSE_TIMEOUT
) -> type[SpeakSocket]:
    """The class to give uvicorn as ``ws=`` when serving ``fake.app``."""
    attributes = {"fake": fake, "close_timeout": close_timeout}
    return type("FakeDeepgramSocket", (SpeakSocket,), attributes)
