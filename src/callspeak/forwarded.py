"""Who the client is behind a reverse proxy: ``X-Forwarded-For`` read the way uvicorn's
proxy-headers middleware reads it, for the native ``/twilio`` socket's log lines (the ASGI routes
get the same answer from uvicorn itself)."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable

__all__ = ["forwarded_client", "trusted_proxies"]


def trusted_proxies(allowed: str | list[str] | None) -> Callable[[str], bool]:
    """uvicorn's ``forwarded_allow_ips`` (addresses, networks or ``*``) as a test of a host."""
    # As uvicorn's _TrustedHosts: "*" trusts all only as the whole setting ("127.0.0.1, *" is
    # a name), and a network with host bits set ("10.0.0.1/8") is no network, only a name.
    if allowed in ("*", ["*"]):
        return lambda host: True
    items = allowed.split(",") if isinstance(allowed, str) else list(allowed or [])
    names = {item.strip() for item in items if item.strip()}
    networks = []
    for name in names:
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.ip_network(name))

    def trusted(host: str) -> bool:
        if host in names:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in networks)

    return trusted


def forwarded_client(header: str, trusted: Callable[[str], bool]) -> tuple[str, int]:
    """The client an ``X-Forwarded-For`` chain names, as ``(host, port)``: the nearest hop that
    is not a trusted proxy (the first one if all are), as uvicorn's proxy-headers middleware
    picks it — a hop given as ``host:port`` or ``[v6]:port`` is judged by its host, and its port
    kept (0 when it has none)."""
    # Empty hops kept, as uvicorn keeps them ("a, " names an empty client, not "a").
    hops = [_host_port(hop.strip()) for hop in header.split(",")]
    for host, port in reversed(hops):
        if not trusted(host):
            return host, port
    return hops[0]


def _host_port(hop: str) -> tuple[str, int]:
    """``1.2.3.4:5678`` and ``[2001:db8::1]:5678`` split; anything else (a bare address, a
    malformed value) is the host as written, port 0, so it is not trusted by mistake."""
    if hop.startswith("["):
        host, bracket, rest = hop[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return hop, 0
        with contextlib.suppress(ValueError):
            return host, int(rest[1:]) if rest else 0
        return host, 0
    if hop.count(":") == 1:
        host, _, port = hop.partition(":")
        with contextlib.suppress(ValueError):
            return host, int(port)
    return hop, 0
