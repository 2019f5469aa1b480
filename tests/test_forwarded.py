"""X-Forwarded-For as uvicorn reads it (forwarded.py)."""

from __future__ import annotations

from typing import Any

import pytest

from callspeak.forwarded import forwarded_client, trusted_proxies


def uvicorns_trusted_hosts() -> Any:
    """The class the uvicorn installed reads ``forwarded_allow_ips`` with (private: the test
    using it is skipped if it is gone, rather than compared with a copy)."""
    from uvicorn.middleware import proxy_headers

    trusted_hosts = getattr(proxy_headers, "_TrustedHosts", None)
    if trusted_hosts is None:
        pytest.skip("uvicorn no longer has _TrustedHosts")
    return trusted_hosts


def test_forwarded_for_names_the_nearest_untrusted_hop() -> None:
    trusted = trusted_proxies("127.0.0.1, 10.0.0.0/8")
    assert trusted("127.0.0.1") and trusted("10.1.2.3") and not trusted("203.0.113.7")
    assert not trusted("not-an-address")
    chain = "198.51.100.9, 203.0.113.7, 10.0.0.5"
    assert forwarded_client(chain, trusted) == ("203.0.113.7", 0)
    assert forwarded_client("10.0.0.6, 10.0.0.5", trusted) == ("10.0.0.6", 0)
    assert trusted_proxies("*")("203.0.113.7")
    assert trusted_proxies(["192.0.2.1"])("192.0.2.1")
    # a name that is no address is trusted as written, as uvicorn trusts it
    named = trusted_proxies("proxy.internal, 10.0.0.0/8")
    assert named("proxy.internal") and not named("other.internal")
    assert forwarded_client("203.0.113.7, proxy.internal", named) == ("203.0.113.7", 0)


def test_hops_with_ports_are_judged_by_their_host_as_uvicorn_judges_them() -> None:
    trusted = trusted_proxies("127.0.0.1, ::1")
    assert forwarded_client("203.0.113.7:5678, 127.0.0.1:40000", trusted) == ("203.0.113.7", 5678)
    assert forwarded_client("[2001:db8::1]:443, [::1]:9", trusted) == ("2001:db8::1", 443)
    assert forwarded_client("2001:db8::2, ::1", trusted) == ("2001:db8::2", 0)  # bare v6
    assert forwarded_client("[2001:db8::3]", trusted) == ("2001:db8::3", 0)
    # malformed: the value as written, never trusted by mistake
    assert forwarded_client("127.0.0.1:x", trusted) == ("127.0.0.1:x", 0)
    assert forwarded_client("[::1]junk", trusted) == ("[::1]junk", 0)
    assert forwarded_client("203.0.113.7, ", trusted) == ("", 0)  # an empty hop, as uvicorn


@pytest.mark.parametrize(
    "header",
    [
        "203.0.113.7, ",
        "1.2.3.4:5678, 127.0.0.1:40000",
        "[2001:db8::1]:443, [::1]:9",
        "2001:db8::2, ::1",
        "[2001:db8::3]",
        "127.0.0.1:x",
        "[::1]junk",
        "10.0.0.6, 10.0.0.5",
        ",",
        " , 1.2.3.4",
        "[::1]:",
        "a:b:c",
        "10.1.1.1:80",
    ],
)
def test_the_client_is_the_one_uvicorns_asgi_routes_see(header: str) -> None:
    """The same answer as the uvicorn installed gives its ASGI routes."""
    uvicorns = uvicorns_trusted_hosts()
    allowed = ["127.0.0.1", "::1", "10.0.0.0/8"]
    expected = uvicorns(allowed).get_trusted_client_address(header)
    assert forwarded_client(header, trusted_proxies(allowed)) == expected


@pytest.mark.parametrize(
    "allowed",
    [
        "127.0.0.1, *",  # "*" among others is a name, not "trust all", to uvicorn
        ["127.0.0.1", "*"],
        "10.0.0.1/8",  # host bits set: no network to uvicorn, a name nothing matches
        "127.0.0.1, 10.0.0.0/8",
        "*",
        ["*"],
    ],
)
def test_proxies_are_trusted_as_uvicorn_trusts_them(allowed: str | list[str]) -> None:
    """uvicorn trusts every host only for the whole setting "*", and reads a network with host
    bits set as a name: a client's own X-Forwarded-For must not name it where uvicorn's would
    not."""
    uvicorns = uvicorns_trusted_hosts()
    header = "198.51.100.9, 10.2.3.4, 203.0.113.7"
    for host in ("10.2.3.4", "203.0.113.7", "127.0.0.1", "*"):
        assert trusted_proxies(allowed)(host) == (host in uvicorns(allowed)), host
    expected = uvicorns(allowed).get_trusted_client_address(header)
    assert forwarded_client(header, trusted_proxies(allowed)) == expected
