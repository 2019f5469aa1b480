"""Queued fault injections (package-internal; tests use :class:`FakeDeepgram`'s methods).

Contract: faults wait in one queue in the order they were added. :func:`take` hands out the first
one of the requested kinds and consumes one use of it; a fault whose ``remaining`` reaches zero
leaves the queue, and one with ``remaining=None`` stays until ``clear_faults()``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["Fault", "take"]


@dataclass(slots=True)
class Fault:
    """One injected fault; which fields matter depends on ``kind``.

    ``fail``/``refuse``: ``status``, ``body``, ``content_type``.
    ``stall``/``cut``/``ws_close``/``ws_stall``: ``n_bytes`` of audio first.
    ``ws_close``/``ws_close_flushed``: close ``code`` and ``reason``.
    ``ws_warn``: ``body`` is the description and ``reason`` the warning code.
    ``ws_silent``: none.
    ``wav``: ``reason`` an encoding and ``n_bytes`` a sample rate to answer in instead ("", 0: as
    asked).
    """

    kind: str
    remaining: int | None
    status: int = 0
    body: bytes = b""
    content_type: str = "application/json"
    n_bytes: int = 0
    code: int = 1011
    reason: str = ""


def take(faults: deque[Fault], *kinds: str) -> Fault | None:
    """The first queued fault of one of ``kinds``, with one use consumed, or None."""
    for fault in faults:
        if fault.kind in kinds:
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    faults.remove(fault)
            return fault
    return None
