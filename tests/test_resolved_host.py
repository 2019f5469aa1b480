"""ResolvedHost: one lookup shared by every socket opened to a host within its TTL."""

from __future__ import annotations

import asyncio
import socket

import pytest

from callspeak.tts.resolved_host import (
    AddrInfo,
    ResolvedHost,
    getaddrinfo_tcp,
    needs_lookup,
)
from tests.fakes import SettableClock


def at(*ips: str, port: int = 443) -> list[AddrInfo]:
    """``getaddrinfo``'s answer for ``ips`` (IPv4 or IPv6), in that order."""
    return [
        (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
        for ip in ips
    ]


class Resolver:
    """Answers from a script of addresses (or errors), each lookup held until ``release``."""

    def __init__(self, *answers: list[AddrInfo] | OSError) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, host: str, port: int) -> list[AddrInfo]:
        self.asked.append((host, port))
        await self.gate.wait()
        answer = self.answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer


async def test_callers_during_a_lookup_share_it() -> None:
    resolver = Resolver(at("10.0.0.7"))
    resolver.gate.clear()
    host = ResolvedHost("api.example.test", 443, resolve=resolver)
    waiters = [asyncio.create_task(host.addresses()) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    resolver.gate.set()
    assert await asyncio.gather(*waiters) == [at("10.0.0.7")] * 50
    assert resolver.asked == [("api.example.test", 443)] and host.lookups == 1


async def test_an_answer_is_kept_for_the_ttl_then_looked_up_again() -> None:
    clock = SettableClock()
    resolver = Resolver(at("10.0.0.1"), at("10.0.0.2"))
    host = ResolvedHost("api.example.test", 443, ttl=10.0, resolve=resolver, clock=clock)
    assert await host.addresses() == at("10.0.0.1")
    clock.now += 9.9
    assert await host.addresses() == at("10.0.0.1")
    clock.now += 0.1
    assert await host.addresses() == at("10.0.0.2")
    assert host.lookups == 2


async def test_a_failed_lookup_reaches_every_waiter_and_is_not_kept() -> None:
    resolver = Resolver(socket.gaierror("no such host"), at("10.0.0.3"))
    resolver.gate.clear()
    host = ResolvedHost("api.example.test", 443, resolve=resolver)
    waiters = [asyncio.create_task(host.addresses()) for _ in range(3)]
    await asyncio.sleep(0)
    resolver.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, socket.gaierror) for r in results)
    assert await host.addresses() == at("10.0.0.3")  # looked up afresh
    assert host.lookups == 2


async def test_a_cancelled_waiter_leaves_the_lookup_to_the_others() -> None:
    resolver = Resolver(at("10.0.0.4"))
    resolver.gate.clear()
    host = ResolvedHost("api.example.test", 443, resolve=resolver)
    impatient = asyncio.create_task(host.addresses())
    patient = asyncio.create_task(host.addresses())
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await impatient
    resolver.gate.set()
    assert await patient == at("10.0.0.4") and host.lookups == 1


async def test_a_failed_address_goes_last_and_forget_drops_the_answer() -> None:
    resolver = Resolver(at("10.0.0.5", "10.0.0.6", "10.0.0.7"), at("10.0.0.8"))
    host = ResolvedHost("api.example.test", 443, resolve=resolver)
    first, second, third = await host.addresses()
    host.failed(first)
    assert await host.addresses() == [second, third, first]
    host.failed(at("10.9.9.9")[0])  # not in the answer (an older one's): nothing changes
    assert await host.addresses() == [second, third, first] and host.lookups == 1
    host.forget()
    assert await host.addresses() == at("10.0.0.8") and host.lookups == 2


async def test_aclose_ends_a_lookup_in_flight_with_an_error_for_its_waiters() -> None:
    resolver = Resolver(at("10.0.0.8"))
    resolver.gate.clear()
    host = ResolvedHost("api.example.test", 443, resolve=resolver)
    waiter = asyncio.create_task(host.addresses())
    await asyncio.sleep(0)
    await asyncio.wait_for(host.aclose(), 1)
    with pytest.raises(OSError, match="stopped"):  # not a CancelledError it did not ask for
        await waiter
    await host.aclose()  # idempotent


async def test_getaddrinfo_tcp_resolves_through_the_loop() -> None:
    assert [info[4][:2] for info in await getaddrinfo_tcp("127.0.0.1", 80)] == [("127.0.0.1", 80)]
    answer = await getaddrinfo_tcp("localhost", 80)  # /etc/hosts
    assert {info[4][0] for info in answer} <= {"127.0.0.1", "::1"}
    assert all(info[1] == socket.SOCK_STREAM for info in answer)


def test_ip_addresses_need_no_lookup() -> None:
    assert not needs_lookup("127.0.0.1") and not needs_lookup("::1")
    assert not needs_lookup("[2001:db8::1]")
    assert needs_lookup("api.deepgram.com") and needs_lookup("localhost")


async def test_an_answer_with_no_address_is_a_failed_lookup() -> None:
    host = ResolvedHost("api.example.test", 443, resolve=Resolver(at(), at("10.0.0.9")))
    with pytest.raises(socket.gaierror, match="no address"):
        await host.addresses()
    assert await host.addresses() == at("10.0.0.9")
