"""A call's events as Server-Sent Events: one bounded queue per subscriber, never blocking a call.

Wire format (https://html.spec.whatwg.org/multipage/server-sent-events.html), one frame per
:class:`~callspeak.events.CallEventRecord`, in the order the call emitted them::

    id: 3
    event: speech.heard
    data: {"type": "speech.heard", "callSid": "CA…", "streamSid": "MZ…", "timestamp": …, …}

``id`` counts the frames of this subscription from 1 (there is no replay, so ``Last-Event-ID``
is not honoured). A comment line ``: ping`` is sent when nothing happened for ``heartbeat``
seconds, so proxies and clients can tell a quiet call from a dead connection. The stream ends
after ``call.stopped``. A subscriber that falls ``limit`` events behind is dropped: it gets a
final ``overflow`` event and the stream ends — the call itself never waits for a reader.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from callspeak.events import CallEventRecord, EventListener

__all__ = ["EventSource", "EventSubscription", "sse_frame"]

#: Events a subscriber may fall behind before it is dropped.
DEFAULT_QUEUE_LIMIT = 1000
#: Seconds of quiet before a ``: ping`` comment.
DEFAULT_HEARTBEAT = 15.0


class EventSource(Protocol):
    """What a subscription needs of a call (a :class:`~callspeak.session.CallSession`)."""

    def add_listener(self, listener: EventListener) -> None: ...

    def remove_listener(self, listener: EventListener) -> None: ...


def sse_frame(event: str, data: Mapping[str, Any], event_id: int | None = None) -> bytes:
    """One SSE frame. ``json.dumps`` escapes newlines, so ``data`` is always a single line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"{head}event: {event}\ndata: {body}\n\n".encode()


PING = b": ping\n\n"


class EventSubscription:
    """One reader of one call's events. Subscribes on construction; :meth:`close` (idempotent,
    also run when :meth:`frames` ends or is closed) unsubscribes."""

    def __init__(
        self,
        source: EventSource,
        *,
        limit: int = DEFAULT_QUEUE_LIMIT,
        first: CallEventRecord | None = None,
    ) -> None:
        """``first``: an event emitted before this subscription, shown ahead of the rest (the
        call's ``call.started``, emitted before the call could be found)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._source = source
        self._limit = limit
        # One slot more than the limit, so the overflow marker (None) always fits.
        self._queue: asyncio.Queue[CallEventRecord | None] = asyncio.Queue(limit + 1)
        if first is not None:
            self._queue.put_nowait(first)
        self.overflowed = False
        self.closed = False
        source.add_listener(self._on_event)

    def _on_event(self, record: CallEventRecord) -> None:
        # Runs synchronously inside the call's event emission: must never block or raise.
        if self.closed:
            return
        if self._queue.qsize() >= self._limit:
            self.overflowed = True
            self.close()
            self._queue.put_nowait(None)
            return
        self._queue.put_nowait(record)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._source.remove_listener(self._on_event)

    async def frames(
        self,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        alive: Callable[[], bool] = lambda: True,
    ) -> AsyncIterator[bytes]:
        """SSE frames until ``call.stopped``, an overflow, or — checked at each heartbeat —
        ``alive()`` turning False (a call that ended before this subscription saw it end)."""
        sent = 0
        try:
            while True:
                try:
                    async with asyncio.timeout(heartbeat):
                        record = await self._queue.get()
                except TimeoutError:
                    if not alive():
                        return
                    yield PING
                    continue
                sent += 1
                if record is None:
                    yield sse_frame(
                        "overflow",
                        {
                            "message": f"this subscriber fell {self._limit} events behind and "
                            "was dropped; events after the previous id were lost",
                            "limit": self._limit,
                        },
                        sent,
                    )
                    return
                yield sse_frame(record.type, record.to_dict(), sent)
                if record.type == "call.stopped":
                    return
        finally:
            self.close()
