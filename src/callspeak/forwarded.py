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
    items = allowed.split(",") if isinstance(allowed, str) else list(allowed or [])
    names = {item.strip() for item in items if item.strip()}
    if "*" in names:
        return lambda host: True
    networks = []
    for name in names:
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.ip_network(name, strict=False))

    def trusted(host: str) -> bool:
        if host in names:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in networks)

    return trusted


def forwarded_client(header: str, trusted: Callable[[str], bool]) -> str:
    """The client an ``X-Forwarded-For`` chain names: the nearest hop that is not a trusted
    proxy (the first one if all are), as uvicorn's proxy-headers middleware picks it."""
    hosts = [host.strip() for host in header.split(",") if host.strip()]
    for host in reversed(hosts):
        if not trusted(host):
            return host
    return hosts[0] if hosts else "unknown client"
