"""X-Forwarded-For as uvicorn reads it (forwarded.py)."""

from __future__ import annotations

from callspeak.forwarded import forwarded_client, trusted_proxies


def test_forwarded_for_names_the_nearest_untrusted_hop() -> None:
    trusted = trusted_proxies("127.0.0.1, 10.0.0.0/8")
    assert trusted("127.0.0.1") and trusted("10.1.2.3") and not trusted("203.0.113.7")
    assert not trusted("not-an-address")
    assert forwarded_client("198.51.100.9, 203.0.113.7, 10.0.0.5", trusted) == "203.0.113.7"
    assert forwarded_client("10.0.0.6, 10.0.0.5", trusted) == "10.0.0.6"
    assert trusted_proxies("*")("203.0.113.7")
    assert trusted_proxies(["192.0.2.1"])("192.0.2.1")
