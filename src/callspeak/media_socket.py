"""``/twilio`` served straight from the socket: websockets' sans-I/O protocol, no ASGI between.

A busy server spends most of its time on one thing: Twilio's inbound media, 50 messages a second
per call. Through ASGI each message takes a queue, a task switch, uvicorn's pause and resume of
reading, and Starlette's bookkeeping. Here the bytes go from the socket into websockets'
``ServerProtocol`` and each text message to the call's session in the same callback
(:class:`~callspeak.session.DirectDelivery`), so media and marks are handled with no task switch.
Everything else about a stream — admission, the session, metrics, logs — is the code the ASGI
route uses (``admit_stream`` and ``open_stream``, the first step of ``serve_stream``, in
``server.py``), the stream set up in the callback that accepted it.

``uvicorn_ws.py`` gives uvicorn (``ws=``) the protocol class that makes an upgrade to ``/twilio``
a :class:`MediaSocket`. Whole masked data frames are unmasked by ``frame_reader.py``; every other
frame goes to websockets whole. The app keeps its ASGI ``/twilio`` route for other servers.

Contract of the socket, as the session sees it (:class:`~callspeak.session.Transport`):

* inbound text messages arrive in order; binary messages as bytes; fragmented messages joined;
  a message over ``max_size`` (uvicorn's ``ws_max_size``) fails the socket with 1009, invalid
  UTF-8 with 1007, any other protocol error with 1002; ``receive()`` then returns None.
* at most :data:`INBOX_HIGH` messages wait unread: beyond that, reading from the socket pauses
  until the session has caught up to :data:`INBOX_LOW`.
* ``send()`` waits while the kernel's send buffer is full (uvicorn's high-water mark) and raises
  :class:`~callspeak.session.TransportClosed` once the socket is closing or gone. Reading from
  the socket pauses meanwhile too: a peer that sends pings but takes nothing would otherwise
  pile our pongs up in the transport's buffer without limit.
* ``close()`` sends a close frame and ends ``receive()``; the TCP connection is dropped if the
  peer does not answer within :data:`CLOSE_TIMEOUT` seconds.
* server shutdown (uvicorn's ``shutdown()``) closes open streams with 1012 (service restart).

No keepalive pings: Twilio sends media every 20 ms, so the session's ``idle_timeout`` finds a
dead peer sooner than a ping would.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, cast

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from callspeak.forwarded import forwarded_client
from callspeak.frame_reader import WHOLE_BINARY, WHOLE_TEXT, frame_at, unmask
from callspeak.logs import LogBudget
from callspeak.server import Refusal
from callspeak.session import TransportClosed

__all__ = ["CLOSE_TIMEOUT", "INBOX_HIGH", "INBOX_LOW", "MediaSocket"]

log = logging.getLogger("callspeak.server")
_uvicorn_log = logging.getLogger("uvicorn.error")

#: Unread inbound messages at which reading pauses (5 s of media), and where it resumes.
INBOX_HIGH: Final = 250
INBOX_LOW: Final = 50
#: Seconds a closing socket waits for the peer's close frame before dropping the connection.
CLOSE_TIMEOUT: Final = 5.0
#: An upgrade request longer than this is websockets' to refuse.
MAX_REQUEST_BYTES: Final = 64 * 1024
#: Marks the end of inbound messages in the inbox.
_END: Final = None

Handler = Callable[[str | bytes], bool]
#: Admission of an upgrade (request, client address): None admits it, a Refusal gets a 403.
Admit = Callable[[Request, str], Refusal | None]
#: Called in the callback that accepts a stream (the call may be set up there and then);
#: returns the coroutine, run as the call's task, that serves it until the call ends.
Serve = Callable[["MediaSocket"], Coroutine[Any, Any, None]]


class MediaSocket(asyncio.Protocol):
    """One ``/twilio`` connection, from the upgrade request to the TCP close.

    Built by uvicorn's HTTP protocol when it sees the upgrade (see :func:`uvicorn_ws_protocol`),
    which then calls :meth:`connection_made` and :meth:`data_received` with the request.
    ``connections`` and ``tasks`` are uvicorn's: the socket is in ``connections`` while it is
    open (shutdown calls :meth:`shutdown` on each), the call's task in ``tasks``.
    """

    def __init__(
        self,
        admit: Admit,
        serve: Serve,
        *,
        max_size: int | None,
        connections: set[Any],
        tasks: set[asyncio.Task[None]],
        default_headers: list[tuple[bytes, bytes]] | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
        trusted_proxy: Callable[[str], bool] | None = None,
        refusals_logged: LogBudget | None = None,
    ) -> None:
        """``refusals_logged``: the server's ration of lines about refused requests (a bad
        handshake is one)."""
        self._refusals_logged = refusals_logged or LogBudget()
        self._admit = admit
        self._serve = serve
        # websockets' own debug lines go where uvicorn's WebSocket protocols send theirs.
        self._conn = ServerProtocol(max_size=max_size, logger=_uvicorn_log)
        self._connections = connections
        self._tasks = tasks
        self._default_headers = default_headers or []
        self._close_timeout = close_timeout
        self._trusted_proxy = trusted_proxy
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._inbox: deque[str | bytes | None] = deque()
        self._waiter: asyncio.Future[None] | None = None
        #: A message receive() returned is still being handled (the reader has not asked for
        #: the next one): nothing may be handed to the handler meanwhile, or order would break.
        self._reader_busy = False
        self._handler: Handler | None = None
        self._max_size = max_size
        #: The start of a frame (or of the request) still arriving, and how many more bytes it
        #: needs before it is worth reading again: the rest of the frame once its header is in
        #: (so a large frame arriving in small pieces is collected, not re-read at each piece),
        #: else 1.
        self._buffer = bytearray()
        self._missing = 0
        self._bypass = False  # every byte goes to websockets from now on
        #: The fragmented message being received (None between messages), joined as it comes.
        self._fragments: bytearray | None = None
        self._fragment_opcode = Opcode.TEXT
        #: Reading is paused for either of two reasons, each lifted on its own: the inbox is
        #: full (INBOX_HIGH), or writing is (the peer is not taking what we send).
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._ended = False  # no more inbound messages: _END is in the inbox
        self._lost = False
        self._close_timer: asyncio.TimerHandle | None = None
        #: The peer's address, for logs.
        self.client = "unknown client"

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods.)
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)
        peer = self._transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = f"{peer[0]}:{peer[1]}"

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer:
            buffer += data
            self._missing -= len(data)
            if self._missing > 0:
                return  # still short of a whole frame: nothing to read yet
            data = bytes(buffer)
            buffer.clear()
        state = self._conn.state
        if self._bypass or (state is not State.OPEN and state is not State.CONNECTING):
            self._to_websockets(data)
        elif state is State.OPEN:
            self._read_frames(data)
        else:
            self._read_request(data)
        self._flush()
        if self._conn.state is not State.OPEN and self._conn.state is not State.CONNECTING:
            self._end_input()
        self._wake()

    def eof_received(self) -> bool | None:
        self._conn.receive_eof()
        self._flush()
        self._end_input()
        self._wake()
        # The transport closes itself once it has written what it holds; a peer that sent its
        # FIN but reads nothing (a zero window) would keep that wait, and the socket, for good.
        if self._close_timer is None and not self._lost:
            self._close_timer = self._loop.call_later(self._close_timeout, self._abort)
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._connections.discard(self)
        # Nothing more to deliver; and the session holds this socket while the socket holds
        # its handler (a bound method of the session): a cycle left for the garbage collector.
        self._handler = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._end_input()
        self._wake()
        self._resume_senders()

    def pause_writing(self) -> None:
        # Reading pauses too: websockets answers every ping it reads, and _flush() writes the
        # pong at once, so a peer pinging without reading would grow the write buffer unbounded.
        self._write_paused = True
        if not self._reading_paused and self._transport is not None and not self._lost:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._reading_paused and self._transport is not None and not self._lost:
            self._transport.resume_reading()  # unless the inbox still holds it paused
        self._resume_senders()

    def shutdown(self) -> None:
        """uvicorn's server is stopping: close the stream with 1012 (service restart)."""
        if self._conn.state is State.OPEN:
            self._conn.send_close(1012, "server shutting down")
            self._flush()
        elif self._conn.state is State.CONNECTING and self._transport is not None:
            self._transport.close()
        self._end_input()
        self._wake()

    # -- session.Transport ----------------------------------------------------------------

    async def receive(self) -> str | bytes | None:
        inbox = self._inbox
        self._reader_busy = False
        while not inbox:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = inbox[0] if inbox[0] is _END else inbox.popleft()
        self._reader_busy = True
        if self._reading_paused and len(inbox) <= INBOX_LOW and self._transport is not None:
            self._reading_paused = False
            if not self._write_paused:  # else resume_writing resumes it
                self._transport.resume_reading()
        return message

    async def send(self, text: str) -> None:
        # (Not send_all((text,)): one message is the steady state, every 100 ms of every call.)
        if self._conn.state is not State.OPEN or self._lost:
            raise TransportClosed("the media socket is closed")
        self._conn.send_text(text.encode())
        self._flush()
        if self._write_paused:
            await self._writable(1)

    async def send_all(self, texts: Sequence[str]) -> None:
        if self._conn.state is not State.OPEN or self._lost:
            raise TransportClosed("the media socket is closed")
        for text in texts:
            self._conn.send_text(text.encode())
        self._flush()
        if self._write_paused:
            await self._writable(len(texts))

    async def _writable(self, written: int) -> None:
        """Wait until the transport takes writes again (bounded: resume_writing or
        connection_lost resolves it); raises if the connection was lost meanwhile, after the
        ``written`` messages were written."""
        if self._drain is None:
            self._drain = self._loop.create_future()
        await asyncio.shield(self._drain)
        if self._lost:
            raise TransportClosed("the media socket closed while sending", sent=written)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._conn.state is State.OPEN:
            self._conn.send_close(code, reason)
            self._flush()
        self._end_input()
        self._wake()

    def deliver_to(self, handler: Handler) -> None:
        self._handler = handler

    # -- inside ---------------------------------------------------------------------------

    def _upgrade(self, request: Request) -> None:
        """Answer the upgrade: websockets' 4xx for a broken handshake, 403 if admission refuses
        it, else 101 and the call's task."""
        conn = self._conn
        # Every line of it, joined as uvicorn joins them: proxies in a chain may each add a line
        # (websockets' get() raises on a repeated header).
        forwarded = ", ".join(request.headers.get_all("X-Forwarded-For"))
        trusted = self._trusted_proxy
        if forwarded and trusted is not None and trusted(self.client.rpartition(":")[0]):
            host, port = forwarded_client(forwarded, trusted)
            if host:  # (an empty hop leaves the peer, as uvicorn leaves it)
                self.client = f"{host}:{port}"  # as uvicorn's ASGI scope has it
        response = conn.accept(request)
        if response.status_code == 101:
            refusal = self._admit(request, self.client)
            if refusal is not None:
                response = conn.reject(403, refusal.text)
        else:  # websockets names what was wrong in the body
            self._refusals_logged.warning(
                log,
                "bad handshake",
                "refused media stream from %s: bad WebSocket handshake (HTTP %d)",
                self.client,
                response.status_code,
            )
        conn.send_response(self._with_defaults(response))
        if response.status_code == 101:
            _uvicorn_log.info('%s - "WebSocket %s" [accepted]', self.client, request.path)
            try:
                serving = self._serve(self)
            except Exception:  # a bug: the socket must not stay open with nobody reading it
                log.exception("setting up the media stream from %s failed", self.client)
                conn.fail(1011, "internal error")
                self._end_input()
                return
            task = self._loop.create_task(serving, name=f"media-socket {self.client}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _with_defaults(self, response: Any) -> Any:
        headers: Headers = response.headers
        for raw_name, raw_value in self._default_headers:  # uvicorn's server, date…, as on HTTP
            name = raw_name.decode("latin-1")
            if name in headers:
                del headers[name]
            headers[name] = raw_value.decode("latin-1")
        return response

    def _read_request(self, data: bytes) -> None:
        """The upgrade request goes to websockets alone (uvicorn hands it over whole); frames a
        client sent right behind it are read once the handshake is answered."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_REQUEST_BYTES:
                self._bypass = True  # websockets refuses it
                self._to_websockets(data)
            else:
                self._keep(data, 1)
            return
        self._to_websockets(data[: end + 4])
        if self._conn.handshake_exc is not None:
            self._answer_unreadable()
        rest = data[end + 4 :]
        if rest and self._conn.state is State.OPEN:
            self._read_frames(rest)
        elif rest:
            self._to_websockets(rest)

    def _answer_unreadable(self) -> None:
        """A request websockets could not read (a body, ``Transfer-Encoding``, a non-ASCII
        target…) gets only its EOF from websockets: answer 400 ahead of it, as uvicorn's
        protocol does on every other WebSocket path."""
        writes = self._conn.data_to_send()
        if writes and not any(writes):  # the EOF alone: no response was made
            self._refusals_logged.warning(
                log,
                "bad handshake",
                "refused media stream from %s: unreadable upgrade request (%s)",
                self.client,
                exc.__cause__ or exc if (exc := self._conn.handshake_exc) else None,
            )
            response = self._conn.reject(
                400, "Failed to open a WebSocket connection: invalid request.\n"
            )
            writes = [self._with_defaults(response).serialize(), *writes]
        self._flush(writes)

    def _read_frames(self, data: bytes) -> None:
        """Whole masked text and binary frames are unmasked here; every other frame is handed to
        websockets whole, in order. Whatever follows a frame over ``max_size``, or anything once
        the connection is closing, goes to websockets as it comes."""
        pos, size, max_size, conn = 0, len(data), self._max_size, self._conn
        while (frame := frame_at(data, pos)) is not None:
            first, key, start, end = frame
            if max_size is not None and end - start > max_size:
                self._bypass = True  # websockets fails it with 1009 from its header
                break
            if end > size:
                break  # the rest is still arriving
            if (
                (first == WHOLE_TEXT or first == WHOLE_BINARY)
                and key >= 0
                and self._fragments is None
            ):
                self._message(
                    Opcode.TEXT if first == WHOLE_TEXT else Opcode.BINARY, unmask(data, frame)
                )
            else:
                self._to_websockets(data[pos:end])
            pos = end
            if conn.state is not State.OPEN:
                self._bypass = True
                break
        if self._bypass:
            self._to_websockets(data[pos:])
        elif pos < size:  # a frame's header still arriving, or (frame's end known) its payload
            self._keep(data[pos:], 1 if frame is None else frame[3] - size)

    def _keep(self, start: bytes, missing: int) -> None:
        """Keep ``start`` (of a frame or of the request) until ``missing`` more bytes arrive."""
        self._buffer += start
        self._missing = missing

    def _to_websockets(self, data: bytes) -> None:
        if not data:
            return
        self._conn.receive_data(data)
        for event in self._conn.events_received():
            if type(event) is Frame:
                self._frame(event)
            elif isinstance(event, Request):
                self._upgrade(event)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if not frame.fin:
                self._fragment_opcode = opcode
                self._fragments = bytearray(frame.data)
                return
            self._message(opcode, bytes(frame.data))
        elif opcode is Opcode.CONT and self._fragments is not None:  # (websockets refuses others)
            # Bytes, not a list of pieces: empty continuation frames must cost no memory.
            self._fragments += frame.data
            if frame.fin:
                data, self._fragments = bytes(self._fragments), None
                self._message(self._fragment_opcode, data)
        # PING is answered and CLOSE echoed by the protocol itself; PONG needs nothing.

    def _message(self, opcode: Opcode, data: bytes) -> None:
        if self._ended:
            return  # after our close frame: read on until the peer's, but deliver nothing
        message: str | bytes
        if opcode is Opcode.TEXT:
            try:
                message = data.decode()
            except UnicodeDecodeError:
                self._conn.fail(1007, "invalid UTF-8 in a text message")
                self._end_input()  # nothing after it is delivered
                return
        else:
            message = data
        inbox, handler = self._inbox, self._handler
        # Before the reader's first receive() too: the call's opening messages are then handled
        # in this callback, though its reader task has not run yet.
        if not inbox and handler is not None and not self._reader_busy:
            try:
                if handler(message):
                    return
            except Exception:  # a bug: end the call, as the reader task would
                log.exception("handling an inbound message failed; closing the stream")
                self._conn.fail(1011, "internal error")
                self._end_input()
                return
        inbox.append(message)
        if len(inbox) >= INBOX_HIGH and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            if not self._write_paused:  # else already paused for that
                self._transport.pause_reading()

    def _flush(self, writes: list[bytes] | None = None) -> None:
        """Write what websockets has to send (or ``writes``, taken from it already)."""
        if writes is None:
            writes = self._conn.data_to_send()
        transport = self._transport
        if transport is None or self._lost:
            return  # nowhere to write it (uvloop raises on a closed handle)
        # What is ready goes out in one write: frames written one by one may reach the peer
        # apart (see CallSession._send_audio). (A single frame, the steady state, is not
        # copied: joining one bytes object returns it.)
        ready: list[bytes] = []
        for data in writes:
            if data:
                ready.append(data)
                continue
            if ready:
                transport.write(b"".join(ready))
                ready = []
            if transport.can_write_eof():
                transport.write_eof()  # the server half-closes first (RFC 6455 §7.1.1)
            else:
                transport.close()
        if ready:
            transport.write(b"".join(ready))
        if self._conn.close_expected() and self._close_timer is None and not self._lost:
            self._close_timer = self._loop.call_later(self._close_timeout, self._abort)

    def _abort(self) -> None:
        self._close_timer = None
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def _end_input(self) -> None:
        if not self._ended:
            self._ended = True
            self._inbox.append(_END)
            if self._reading_paused and self._transport is not None and not self._lost:
                self._reading_paused = False
                # To see the peer's close and EOF; while writing is paused, once it resumes
                # (websockets still answers pings while closing).
                if not self._write_paused:
                    self._transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and self._inbox and not waiter.done():
            waiter.set_result(None)

    def _resume_senders(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
