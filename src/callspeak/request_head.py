"""The HTTP protocol class ``callspeak serve`` gives uvicorn as ``http=``: uvicorn's own
(httptools) with a deadline on each request's head.

uvicorn closes a kept-alive connection left idle between requests, but sets no limit on a new
connection that sends nothing, nor on a request line and headers that arrive a byte every few
seconds (slowloris). Each such connection holds a file descriptor for good; enough of them and
a new call cannot connect. Here a connection has :data:`HEAD_SECONDS` from when it opens (after
TLS, which asyncio bounds itself) to finish its first request head, and each later head as long
from its first byte. Then it is closed: with a 408 if part of a head had come, silently if nothing
had. Between requests a kept-alive connection is idle, and uvicorn's keep-alive timeout bounds
that (``callspeak serve`` sets it, :data:`~callspeak.cli.KEEP_ALIVE_SECONDS`, longer than
clients keep an idle connection: one closed here as a client sends on it fails a request the
client does not send again, a ``POST /say`` above all).

The deadline ends with the head: a request body has its own bound
(:data:`~callspeak.api.BODY_SECONDS`), and a WebSocket upgraded from the request leaves this
protocol altogether.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HEAD_SECONDS", "MAX_HEAD_BYTES", "BoundedHeadProtocol"]

log = logging.getLogger("callspeak.server")

#: Seconds a connection has to send a whole request head (request line and headers).
HEAD_SECONDS = 10.0
#: Bytes a request head may take after the read it began in (httptools sets no bound; h11's is
#: 16 KiB). Twilio's heads are a few kB.
MAX_HEAD_BYTES = 64 * 1024


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request head is not complete
    :data:`HEAD_SECONDS` after the connection opened (its first request) or after the head's
    first byte came (a later request on the kept-alive connection)."""

    _head_timer: asyncio.TimerHandle | None = None
    #: Part of a request head has arrived (the parser began a message) and not all of it.
    _in_head = False
    #: Bytes read since the read the current head began in.
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        continued = self._in_head  # a head begun in an earlier read
        super().data_received(data)  # (cancels uvicorn's keep-alive timer, whatever the bytes)
        if continued and self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                log.debug("closed a connection from %s: request head too large", self.client)
                if self.cycle is None or self.cycle.response_complete:
                    self._refuse(
                        b"431 Request Header Fields Too Large",
                        f"request head over {MAX_HEAD_BYTES} bytes",
                    )
                else:  # (a head pipelined behind an answer still being written: no 431 into it)
                    self.transport.close()
                return
        # Bytes that begin no request (CRLF between requests) leave neither timer armed.
        if (
            self._head_timer is None
            and self.timeout_keep_alive_task is None
            and (self.cycle is None or self.cycle.response_complete)
            and not self.transport.is_closing()
            and self.transport.get_protocol() is self  # (not upgraded to a WebSocket)
        ):
            self._arm_head_timer()

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The connection is the WebSocket protocol's now, and this one is never called again.
        # uvicorn drops its parser (whose callbacks are this protocol's bound methods, a
        # reference cycle) in connection_lost, which an upgraded connection never reaches here.
        self.parser = None  # type: ignore[assignment]

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        idle = self.cycle is None or self.cycle.response_complete
        if self._head_timer is None and idle:  # a later request: its head's time starts now
            self._arm_head_timer()
        super().on_message_begin()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A head begun during the previous response: its time starts now.
        if self._in_head and self._head_timer is None and not self.transport.is_closing():
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        log.debug(
            "closed a connection from %s: %s within %g s",
            f"{self.client[0]}:{self.client[1]}" if self.client else "?",
            "request head not complete" if self._in_head else "no request",
            HEAD_SECONDS,
        )
        if self._in_head:
            self._refuse(
                b"408 Request Timeout", f"request head not received within {HEAD_SECONDS:g} s"
            )
        else:
            self.transport.close()

    def _refuse(self, status: bytes, text: str) -> None:
        """Answer ``status`` with ``text`` and close the connection."""
        self._cancel_head_timer()
        message = text.encode()
        self.transport.write(
            b"HTTP/1.1 %s\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (status, len(message), message)
        )
        self.transport.close()
