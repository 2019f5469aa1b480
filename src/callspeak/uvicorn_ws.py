"""The protocol class ``callspeak serve`` gives uvicorn as ``ws=``: it reads the upgrade request
uvicorn hands over and passes the connection on for good — ``/twilio`` to a
:class:`~callspeak.media_socket.MediaSocket` (no ASGI), any other path to uvicorn's own
``websockets-sansio`` protocol and so to the ASGI app, as if this module did not exist.

It relies on what uvicorn does with a ``ws=`` class (0.54): builds it with ``config``,
``server_state`` and ``app_state``; hands it the whole request, re-serialized, in the first
``data_received``; then makes it the transport's protocol. ``server_state.connections`` and
``tasks`` are uvicorn's bookkeeping for graceful shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.http11 import Request

from callspeak.forwarded import trusted_proxies
from callspeak.media_socket import CLOSE_TIMEOUT, MediaSocket, log
from callspeak.server import STREAM_PATH, AppState, Refusal, admit_stream, open_stream
from callspeak.signatures import SIGNATURE_HEADER

__all__ = ["uvicorn_ws_protocol"]


class _Upgrade(asyncio.Protocol):
    """Reads the upgrade request uvicorn hands over, then passes the connection on for good:
    ``/twilio`` to a :class:`MediaSocket`, any other path to uvicorn's own WebSocket protocol
    (and so to the ASGI app)."""

    # Set on the subclass uvicorn_ws_protocol makes:
    state: AppState
    close_timeout: float
    #: The uvicorn config last seen and its trusted-proxy test (see _trusted_proxy).
    _trusted: tuple[Any, Callable[[str], bool]] | None = None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any]) -> None:
        self._config, self._server_state, self._app_state = config, server_state, app_state
        self._target: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._target is None:
            assert self._transport is not None
            self._target = self._choose(data)
            self._target.connection_made(self._transport)
        self._target.data_received(data)

    def _choose(self, request: bytes) -> asyncio.Protocol:
        # uvicorn hands over the whole request, re-serialized: "GET /path?query HTTP/1.1\r\n…".
        target = request.split(b" ", 2)[1] if request.count(b" ", 0, 2048) >= 2 else b""
        if target.partition(b"?")[0] == STREAM_PATH.encode():
            state = self.state

            def admit(request: Request, client: str) -> Refusal | None:
                # The first, as Starlette's headers give it on the ASGI route (websockets' get()
                # raises on a repeated header, which dropped the connection unanswered).
                signature = next(iter(request.headers.get_all(SIGNATURE_HEADER)), None)
                return admit_stream(state, signature, client)

            def serve(socket: MediaSocket) -> Coroutine[Any, Any, None]:
                # Set up here, in the callback that accepted the stream (see open_stream).
                return _served(state, socket, open_stream(state, socket))

            return MediaSocket(
                admit,
                serve,
                max_size=self._config.ws_max_size,
                connections=self._server_state.connections,
                tasks=self._server_state.tasks,
                default_headers=self._server_state.default_headers,
                close_timeout=self.close_timeout,
                trusted_proxy=self._trusted_proxy(),
                refusals_logged=state.refusals_logged,
            )
        from uvicorn.protocols.websockets.websockets_sansio_impl import (
            WebSocketsSansIOProtocol,
        )

        return WebSocketsSansIOProtocol(
            config=self._config, server_state=self._server_state, app_state=self._app_state
        )

    def _trusted_proxy(self) -> Callable[[str], bool] | None:
        """uvicorn's ``forwarded_allow_ips`` as a test, made once per server: parsing the
        networks for every upgrade was ~2 % of the server's CPU when 200 calls arrived
        together."""
        config = self._config
        if not config.proxy_headers:
            return None
        cached = type(self)._trusted
        if cached is None or cached[0] is not config:
            cached = (config, trusted_proxies(config.forwarded_allow_ips))
            type(self)._trusted = cached  # on the class uvicorn_ws_protocol made for this app
        return cached[1]

    # Everything else goes to the chosen protocol.
    def eof_received(self) -> bool | None:
        return self._target.eof_received() if self._target is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._target is not None:
            self._target.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._target is not None:
            self._target.pause_writing()

    def resume_writing(self) -> None:
        if self._target is not None:
            self._target.resume_writing()


async def _served(state: AppState, socket: MediaSocket, serving: Coroutine[Any, Any, None]) -> None:
    """Run a stream's ``serving`` coroutine; log a failure (through ASGI, uvicorn would) and
    close the stream; free its slot whatever happens."""
    try:
        await serving
    except Exception:  # a bug
        log.exception("media stream from %s failed", socket.client)
        await socket.close(1011, "internal error")
    finally:
        state.calls.release()


def uvicorn_ws_protocol(
    app: Any, *, close_timeout: float = CLOSE_TIMEOUT
) -> type[asyncio.Protocol]:
    """The class to give uvicorn as ``ws=`` for an app made by
    :func:`~callspeak.server.create_app`: ``/twilio`` served natively, every other WebSocket
    path by uvicorn's ``websockets-sansio`` protocol."""
    state = getattr(getattr(app, "state", None), "callspeak", None)
    if not isinstance(state, AppState):
        raise TypeError("uvicorn_ws_protocol needs an app made by callspeak.server.create_app")
    attributes = {"state": state, "close_timeout": close_timeout}
    return type("CallspeakUpgrade", (_Upgrade,), attributes)
