"""One-time per-call tokens: issued by ``/voice`` in a ``<Parameter>``, redeemed on ``start``.

Defence in depth behind the signature on the WebSocket upgrade (whose exact form Twilio does not
document): a stream is admitted only if its ``start`` carries a token this process issued, that
has not expired and that no other stream has used. The store is bounded (the oldest token is
dropped when full) and tokens expire, so a flood of webhooks cannot grow memory.

Tokens are kept by their SHA-256 digest, so a lookup's timing depends on a hash of the guess and
never on how much of a real token it matched.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Final

from callspeak.clock import Clock, MonotonicClock
from callspeak.signatures import new_call_token

__all__ = ["TOKEN_PARAMETER", "CallTokenStore"]

TOKEN_PARAMETER: Final = "callspeak_token"
"""The ``<Parameter>`` name the token travels in (``start.customParameters``)."""


class CallTokenStore:
    """Issue and redeem one-time tokens.

    ``ttl`` is how long a token stays redeemable (seconds on ``clock``): from the webhook to the
    stream's ``start`` Twilio needs well under a second, plus any ``<Say>`` before ``<Connect>``.
    ``capacity`` bounds how many unredeemed tokens are kept; issuing beyond it drops the oldest.
    """

    def __init__(
        self, *, ttl: float = 600.0, capacity: int = 10_000, clock: Clock | None = None
    ) -> None:
        if ttl <= 0 or capacity < 1:
            raise ValueError("ttl must be positive and capacity at least 1")
        self._ttl = ttl
        self._capacity = capacity
        self._clock = clock or MonotonicClock()
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # digest → expiry, oldest first

    def __len__(self) -> int:
        return len(self._expiry)

    def issue(self) -> str:
        """A fresh token, redeemable once until ``ttl`` has passed."""
        now = self._clock.now()
        self._expire(now)
        while len(self._expiry) >= self._capacity:
            self._expiry.popitem(last=False)
        token = new_call_token()
        self._expiry[_digest(token)] = now + self._ttl
        return token

    def redeem(self, token: str | None) -> bool:
        """True once for an issued, unexpired token; False for anything else (and ever after)."""
        if not token:
            return False
        now = self._clock.now()
        self._expire(now)
        expiry = self._expiry.pop(_digest(token), None)
        return expiry is not None and expiry > now

    def _expire(self, now: float) -> None:
        # Insertion order is expiry order (one ttl for all), so expired tokens are at the front.
        while self._expiry:
            digest, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return
            del self._expiry[digest]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
