"""One media stream's protocol state, as a small pure state machine.

:class:`CallState` takes inbound Twilio messages (already parsed, or raw text) and returns the
domain events they mean; it never does I/O and never raises for bad input. A message that breaks
the protocol — bad JSON, an unknown event, media before ``start``, a second ``start``, a foreign
``streamSid``, anything after ``stop`` — becomes a :class:`Rejected` event and changes nothing, so
one bad message cannot end a call.

Phases::

    CONNECTING --start--> STREAMING --stop--> STOPPED

Marks: the sender registers each mark with :meth:`CallState.mark_sent` before sending it. Twilio
echoes a mark when the audio queued before it has played. On ``clear`` Twilio empties its buffer
and echoes *every* pending mark at once, although that audio was never heard; so
:meth:`CallState.cleared` moves all pending marks to a flushed set, and their echoes become
:class:`MarkFlushed`, never :class:`MarkPlayed`. (A mark whose audio ended just before Twilio saw
the ``clear`` is then reported as flushed too: the conservative error — it was probably heard.)
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from callspeak.protocol import (
    Connected,
    Dtmf,
    InboundMessage,
    Mark,
    Media,
    ProtocolError,
    Start,
    Stop,
    parse_message,
)

__all__ = [
    "CallEvent",
    "CallState",
    "DigitPressed",
    "MarkFlushed",
    "MarkPlayed",
    "MediaReceived",
    "Phase",
    "Rejected",
    "Started",
    "Stopped",
    "StreamConnected",
]


class Phase(enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class StreamConnected:
    """Twilio's first message: the socket is up, ``start`` follows."""

    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Started:
    start: Start


@dataclass(frozen=True, slots=True)
class MediaReceived:
    media: Media


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    """The audio before this mark has been played to the caller."""

    name: str


@dataclass(frozen=True, slots=True)
class MarkFlushed:
    """Echo of a mark that was pending when ``clear`` was sent: its audio was dropped unheard."""

    name: str


@dataclass(frozen=True, slots=True)
class DigitPressed:
    dtmf: Dtmf


@dataclass(frozen=True, slots=True)
class Stopped:
    stop: Stop


@dataclass(frozen=True, slots=True)
class Rejected:
    """An inbound message that broke the protocol; it was ignored."""

    reason: str
    event: str | None = None


CallEvent = (
    StreamConnected
    | Started
    | MediaReceived
    | MarkPlayed
    | MarkFlushed
    | DigitPressed
    | Stopped
    | Rejected
)


class CallState:
    def __init__(self) -> None:
        self.phase = Phase.CONNECTING
        self.start: Start | None = None
        self._connected = False
        # Insertion-ordered: Twilio echoes marks in the order they were sent.
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._flushed: set[str] = set()

    @property
    def pending_marks(self) -> tuple[str, ...]:
        """Marks sent and not yet echoed, oldest first (excluding flushed ones)."""
        return tuple(self._pending)

    def receive_text(self, text: str | bytes) -> CallEvent:
        """Parse one WebSocket text message and apply it."""
        try:
            message = parse_message(text)
        except ProtocolError as exc:
            return Rejected(exc.reason, exc.event)
        return self.receive(message)

    def receive(self, message: InboundMessage) -> CallEvent:
        """Apply one parsed inbound message; returns what it means for the call."""
        # The common case first (~50 media messages a second per call): the general checks
        # below would reach the same answer through five type tests.
        if (
            type(message) is Media
            and self.phase is Phase.STREAMING
            and self.start is not None
            and message.stream_sid == self.start.stream_sid
        ):
            return MediaReceived(message)
        if self.phase is Phase.STOPPED:
            return Rejected(f"'{_event_name(message)}' after stop", _event_name(message))
        if isinstance(message, Connected):
            if self._connected:
                return Rejected("duplicate 'connected'", "connected")
            if self.phase is not Phase.CONNECTING:
                return Rejected("'connected' after 'start'", "connected")
            self._connected = True
            return StreamConnected(message.protocol, message.version)
        if isinstance(message, Start):
            if self.phase is not Phase.CONNECTING:
                return Rejected("duplicate 'start'", "start")
            self.phase = Phase.STREAMING
            self.start = message
            return Started(message)
        name = _event_name(message)
        if self.start is None:
            return Rejected(f"'{name}' before 'start'", name)
        if message.stream_sid != self.start.stream_sid:
            return Rejected(
                f"'{name}' for streamSid {message.stream_sid!r:.60}, not this stream's "
                f"{self.start.stream_sid!r}",
                name,
            )
        if isinstance(message, Media):
            return MediaReceived(message)
        if isinstance(message, Mark):
            return self._mark_echoed(message.name)
        if isinstance(message, Dtmf):
            return DigitPressed(message)
        self.phase = Phase.STOPPED
        return Stopped(message)

    def mark_sent(self, name: str) -> None:
        """Register a mark about to be sent. A name may not be reused while its echo is still
        due (pending, or flushed by a clear and not echoed yet); once echoed it is free again."""
        if name in self._pending:
            raise ValueError(f"mark name {name!r} is already pending")
        if name in self._flushed:
            raise ValueError(f"mark name {name!r} was dropped by a clear; its echo is still due")
        self._pending[name] = None

    def cleared(self) -> tuple[str, ...]:
        """Register that ``clear`` is being sent; returns the marks whose audio is now dropped."""
        dropped = tuple(self._pending)
        self._flushed.update(dropped)
        self._pending.clear()
        return dropped

    def _mark_echoed(self, name: str) -> CallEvent:
        if name in self._flushed:
            self._flushed.discard(name)
            return MarkFlushed(name)
        if name not in self._pending:
            return Rejected(
                f"echo of mark {name!r:.60} not awaited (never sent, or echoed already)", "mark"
            )
        del self._pending[name]
        return MarkPlayed(name)


def _event_name(message: InboundMessage) -> str:
    return type(message).__name__.lower()
