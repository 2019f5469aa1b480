"""One host name's addresses, looked up once for every socket opened to it within a few seconds.

websockets resolves the URI's host on every ``connect()``, through the loop's ``getaddrinfo`` (a
thread pool of a few workers). One Deepgram socket per call means that 200 calls arriving together
make 200 lookups of the same name, queued on those threads, each on the path to the call's first
audio. aiohttp, which the REST voice uses, keeps a DNS cache for the same reason (10 s by
default); :class:`ResolvedHost` is that for the WebSocket voice.

Contract of :meth:`ResolvedHost.addresses`:

* The first call looks the name up; calls made while that lookup runs wait for the same lookup
  (one lookup however many sockets open at once). A caller that is cancelled does not cancel the
  lookup for the others.
* The answer is kept for ``ttl`` seconds on the injected ``clock``; the first call after that looks
  it up again. A failed lookup raises its ``OSError`` to every waiter and is not kept.
* ``failed(address)`` (after a connect to it failed) moves it to the end of the kept answer, so
  the sockets opened next try the others first; ``forget()`` (after none could be reached) drops
  the kept answer, so the next call looks the name up afresh.
* ``aclose()`` ends a lookup in flight; its waiters get an ``OSError`` (never a
  ``CancelledError`` they did not ask for).
* An answer with no address is a failed lookup (``socket.gaierror``). Addresses come in the
  resolver's order (RFC 6724 for ``getaddrinfo``); trying them in turn is the caller's job.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = ["DEFAULT_TTL", "AddrInfo", "Resolve", "ResolvedHost", "getaddrinfo_tcp", "needs_lookup"]

#: One of ``getaddrinfo``'s answers: family, type, protocol, canonical name, socket address.
AddrInfo = tuple[int | socket.AddressFamily, int | socket.SocketKind, int, str, tuple[Any, ...]]

#: Seconds an answer is kept: aiohttp's default for its DNS cache.
DEFAULT_TTL = 10.0

#: ``resolve(host, port)`` → ``getaddrinfo``-style TCP addresses; raises ``OSError`` for none.
Resolve = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


async def getaddrinfo_tcp(host: str, port: int) -> Sequence[AddrInfo]:
    """``host``'s TCP addresses from the running loop's ``getaddrinfo``, in its order."""
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


def needs_lookup(host: str) -> bool:
    """False when ``host`` is already an IP address (nothing to resolve)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True
    return False


class ResolvedHost:
    """``host``'s addresses, shared by every socket opened to it. See the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ttl: float = DEFAULT_TTL,
        resolve: Resolve = getaddrinfo_tcp,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.port, self.ttl = host, port, ttl
        self._resolve, self._clock = resolve, clock
        self._addresses: Sequence[AddrInfo] | None = None
        self._expires = 0.0
        self._lookup: asyncio.Future[Sequence[AddrInfo]] | None = None
        self.lookups = 0  #: lookups started, for logs and tests

    async def addresses(self) -> Sequence[AddrInfo]:
        """The addresses to connect to now (looked up, or kept from a recent lookup)."""
        if self._addresses is not None and self._clock() < self._expires:
            return self._addresses
        lookup = self._lookup
        if lookup is None:
            self.lookups += 1
            lookup = self._lookup = asyncio.ensure_future(self._look_up())
            lookup.add_done_callback(_retrieved)  # seen even if every waiter gave up
        try:
            # shield: one waiter's timeout or cancellation must not end the lookup others share
            return await asyncio.shield(lookup)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if lookup.cancelled() and task is not None and not task.cancelling():
                raise OSError(f"the lookup of {self.host} was stopped (closing)") from None
            raise

    def failed(self, address: AddrInfo) -> None:
        """A connect to ``address`` failed: put it last in the kept answer, if it is there."""
        kept = self._addresses
        if kept is not None and address in kept:
            self._addresses = [*(info for info in kept if info != address), address]

    def forget(self) -> None:
        """None of the kept addresses could be reached: look the name up again next time."""
        self._addresses = None

    async def aclose(self) -> None:
        """Cancel a lookup in flight (its waiters get an ``OSError``). Idempotent."""
        lookup = self._lookup
        if lookup is not None:
            lookup.cancel()
            await asyncio.wait({lookup})

    async def _look_up(self) -> Sequence[AddrInfo]:
        try:
            addresses = await self._resolve(self.host, self.port)
        finally:
            self._lookup = None
        if not addresses:
            raise socket.gaierror(f"no address for {self.host!r}")
        self._addresses, self._expires = addresses, self._clock() + self.ttl
        return addresses


def _retrieved(lookup: asyncio.Future[Sequence[AddrInfo]]) -> None:
    if not lookup.cancelled():
        lookup.exception()  # each waiter raises it; this keeps asyncio from calling it unseen
