"""Run an ASGI app on a real loopback socket inside the current event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from uvicorn._types import ASGIApplication

__all__ = ["serve_asgi"]


@asynccontextmanager
async def serve_asgi(
    app: ASGIApplication | Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 10.0,
    **config: Any,
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on ``host:port`` (0 picks a free port) until the block exits.

    Yields the base URL, ``http://HOST:PORT`` (``https://`` when ``ssl_certfile`` is given).
    Extra keyword arguments go to :class:`uvicorn.Config` (``ws_max_size``, ``ssl_certfile``…).
    The socket is bound before the server starts, so the port is known and never raced for.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    config.setdefault("lifespan", "auto")
    # A stalled test peer must not hold the shutdown for long.
    config.setdefault("timeout_graceful_shutdown", 2)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=bound_port, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(startup_timeout):
            while not server.started:
                if task.done():
                    task.result()  # re-raise why it failed to start
                    raise RuntimeError("uvicorn exited before it started")
                await asyncio.sleep(0.005)
        scheme = "https" if config.get("ssl_certfile") else "http"
        yield f"{scheme}://{host}:{bound_port}"
    finally:
        server.should_exit = True
        try:
            async with asyncio.timeout(10):
                await task
        finally:
            sock.close()
