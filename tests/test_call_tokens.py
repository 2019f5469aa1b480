"""One-time per-call tokens: issued once, redeemed once, expiring, bounded."""

from __future__ import annotations

import pytest

from callspeak.call_tokens import CallTokenStore


class SteppedClock:
    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


def test_a_token_is_redeemed_once() -> None:
    store = CallTokenStore()
    token = store.issue()
    assert len(token) >= 40 and store.issue() != token
    assert store.redeem(token)
    assert not store.redeem(token)


@pytest.mark.parametrize("given", [None, "", "not-a-token"])
def test_missing_or_unknown_tokens_are_refused(given: str | None) -> None:
    store = CallTokenStore()
    store.issue()
    assert not store.redeem(given)
    assert len(store) == 1


def test_tokens_expire_after_ttl_and_are_forgotten() -> None:
    clock = SteppedClock()
    store = CallTokenStore(ttl=10, clock=clock)
    old = store.issue()
    clock.t += 5
    young = store.issue()
    clock.t += 5  # old is exactly ttl old: expired
    assert not store.redeem(old)
    assert len(store) == 1
    assert store.redeem(young)


def test_the_store_is_bounded_and_drops_the_oldest() -> None:
    store = CallTokenStore(capacity=3)
    tokens = [store.issue() for _ in range(5)]
    assert len(store) == 3
    assert not store.redeem(tokens[0]) and not store.redeem(tokens[1])
    assert all(store.redeem(t) for t in tokens[2:])


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        CallTokenStore(ttl=0)
    with pytest.raises(ValueError):
        CallTokenStore(capacity=0)
