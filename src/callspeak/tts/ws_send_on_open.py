"""A websockets client connection that sends its handshake, and then its first frames, from the
callbacks that can send them — not from the coroutines that await them.

With websockets' own flow, each step of opening waits for a coroutine to resume: the TCP connection
is made in a callback, but ``connect()`` writes the upgrade request only once it has resumed after
that callback; the response is read in a callback, but the first frame can go out only once the
handshake, ``connect()`` and whatever awaits them have resumed — three or more loop iterations
later. An iteration is microseconds on a quiet loop and tens of milliseconds when hundreds of calls
arrive together, and every call's first ``Speak`` waits on these. :class:`SendOnOpenConnection`
writes the request in ``connection_made`` and the first frames in the callback that accepts the
response (RFC 6455 §4.1: a client sends frames only once it has read the response).

Contract:

* The upgrade request, with ``additional_headers`` and ``user_agent_header`` given to the class
  (not to ``connect()``, whose own are not used), is written in ``connection_made``; ``connect()``
  then only waits for the response, and raises what websockets raises for it. Credentials
  (``Authorization``, ``Cookie``, ``Proxy-Authorization``) go only to ``origin``'s scheme, host
  and port: a connection that websockets opens after a redirect elsewhere goes without them, as
  websockets' own redirects do.
* When the response is accepted (the protocol is ``OPEN``), ``on_open(self)`` is called once, from
  ``data_received``, before any coroutine sees the connection; each text it returns is written at
  once as one text frame, in order. A refused or failed handshake never calls it.
* A write that fails aborts the connection: the handshake then fails at once (or, after it, the
  next ``send``/``recv`` does), rather than waiting for a response to a request never sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.datastructures import Headers, HeadersLike
from websockets.http11 import USER_AGENT
from websockets.protocol import Event, State
from websockets.uri import WebSocketURI

__all__ = ["OnOpen", "SendOnOpenConnection"]

#: Called with the connection the moment it opens; returns the texts to write on it then.
OnOpen = Callable[[ClientConnection], Sequence[str]]


class SendOnOpenConnection(ClientConnection):
    """A :class:`ClientConnection` that asks ``on_open`` for its first frames (module docstring).

    Give it to ``websockets.asyncio.client.connect`` as ``create_connection``, bound to its
    ``on_open`` with :func:`functools.partial` (websockets' documented "wrapper or subclass").
    """

    def __init__(
        self,
        protocol: ClientProtocol,
        *,
        on_open: OnOpen,
        origin: WebSocketURI,
        additional_headers: HeadersLike | None = None,
        user_agent_header: str | None = USER_AGENT,
        **kwargs: Any,
    ) -> None:
        super().__init__(protocol, **kwargs)
        self._on_open: OnOpen | None = on_open
        self._headers = Headers(additional_headers or ())
        if not _same_origin(protocol.uri, origin):
            self._headers = Headers(
                (name, value)
                for name, value in self._headers.raw_items()
                if name.lower() not in _CREDENTIALS
            )
        self._user_agent = user_agent_header

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # What ClientConnection.handshake() does first, done here rather than once it resumes.
        self.request = self.protocol.connect()
        self.request.headers.update(self._headers)
        if self._user_agent is not None:
            self.request.headers.setdefault("User-Agent", self._user_agent)
        self.protocol.send_request(self.request)
        self._write()

    def _write(self) -> None:
        try:
            self.send_data()
        except Exception as exc:  # kept as websockets keeps its own write errors, and ended
            self.set_connection_exc(exc)
            self.transport.abort()

    async def handshake(
        self,
        additional_headers: HeadersLike | None = None,
        user_agent_header: str | None = USER_AGENT,
    ) -> None:
        """Wait for the response to the request ``connection_made`` sent (the arguments, which
        ``connect()`` passes, are not used: see the module docstring)."""
        await asyncio.wait(
            [self.response_rcvd, self.connection_lost_waiter],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    def process_event(self, event: Event) -> None:
        super().process_event(event)
        on_open = self._on_open
        if on_open is None or self.response is None:
            return  # already asked, or this is not the handshake's event yet
        self._on_open = None
        if self.protocol.state is not State.OPEN:
            return  # refused: connect() raises the handshake's error
        texts = on_open(self)
        if not texts:
            return
        for text in texts:
            self.protocol.send_text(text.encode())
        self._write()


_CREDENTIALS = ("authorization", "cookie", "proxy-authorization")


def _same_origin(a: WebSocketURI, b: WebSocketURI) -> bool:
    return (a.secure, a.host, a.port) == (b.secure, b.host, b.port)
