"""Twilio → server: the events Twilio sends on a stream, and :func:`parse_message`.

:func:`parse_message` is liberal in what it accepts:

* Returns one of :class:`Connected`, :class:`Start`, :class:`Media`, :class:`Mark`,
  :class:`Dtmf`, :class:`Stop`, and raises nothing but :class:`ProtocolError`, whose ``reason``
  names the event and the field (``"media: field 'media.payload' is not valid base64"``).
* ``sequenceNumber``, ``media.chunk`` and ``media.timestamp`` arrive as JSON strings although the
  docs call them numbers; a JSON integer or a string of ASCII digits is accepted, anything else
  (``"abc"``, ``"-1"``, ``4.0``, ``true``) is rejected: all these counters are non-negative.
  ``sampleRate`` and ``channels`` (sent as numbers) follow the same rule.
* Unknown extra fields are ignored (Twilio may add some). Field types are checked.
* ``start.streamSid`` is the source of truth; the top-level ``streamSid`` of ``start`` may be
  absent, but if present it must agree.  ``start.tracks`` defaults to ``("inbound",)``,
  ``start.customParameters`` to an empty mapping.
* ``customParameters`` values must be strings: Twilio fills them from TwiML ``<Parameter
  value="…"/>`` attributes, which are always strings, so a number, bool, null or nested value can
  only come from something that is not Twilio. We reject it rather than invent a spelling for it
  (``True`` or ``true``? ``1e3`` or ``1000.0``?), which matters when a parameter carries a token.
* ``media.payload`` is strictly validated base64 and exposed decoded (raw μ-law bytes).
* ``dtmf.digit`` must be one of ``0-9 * # A-D``.
* SIDs (``streamSid``, ``callSid``, ``accountSid``) must be non-empty strings; their prefixes
  (``MZ``/``CA``/``AC``) are not checked.

Every inbound event also has ``to_json()``, producing Twilio's own shape (counters as strings),
so that ``parse_message(event.to_json()) == event``; the emulator speaks through it, and writes
its 50 ``media`` messages a second per call with :class:`MediaEncoder` (the same text, cheaper).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from callspeak.protocol._fields import (
    AccountSid,
    CallSid,
    ProtocolError,
    StreamSid,
    _b64encode,
    _error,
    _event_name,
    _int,
    _json_type,
    _JsonObject,
    _load_object,
    _obj,
    _payload,
    _quoted,
    _sid,
    _str,
)

#: The keys a ``dtmf`` event may report.
DTMF_DIGITS = frozenset("0123456789*#ABCD")


class CustomParameters(Mapping[str, str]):
    """A read-only, hashable ``str → str`` mapping: the ``<Parameter>``s of a stream.

    Compares equal to any mapping with the same items (including a plain ``dict``).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        # Private copy: nobody else holds a reference, so the mapping cannot change.
        self._items: dict[str, str] = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"CustomParameters({self._items!r})"


# --------------------------------------------------------------------------------------------
# Twilio -> server events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """First message on a stream; carries no ``streamSid`` and no ``sequenceNumber``."""

    event: ClassVar[str] = "connected"

    protocol: str
    version: str

    def to_json(self) -> str:
        return json.dumps(
            {"event": "connected", "protocol": self.protocol, "version": self.version}
        )


@dataclass(frozen=True, slots=True)
class MediaFormat:
    """``start.mediaFormat``; on Twilio always ``audio/x-mulaw``, 8000 Hz, 1 channel."""

    encoding: str
    sample_rate: int
    channels: int


@dataclass(frozen=True, slots=True)
class Start:
    """Sent once, right after :class:`Connected`: who the stream belongs to and its format.

    ``custom_parameters`` is always stored as a :class:`CustomParameters` and ``tracks`` as a
    tuple, whatever mapping/iterable the constructor was given.
    """

    event: ClassVar[str] = "start"

    sequence_number: int
    stream_sid: StreamSid
    account_sid: AccountSid
    call_sid: CallSid
    tracks: tuple[str, ...]
    custom_parameters: Mapping[str, str]
    media_format: MediaFormat

    def __post_init__(self) -> None:
        if not isinstance(self.custom_parameters, CustomParameters):
            object.__setattr__(self, "custom_parameters", CustomParameters(self.custom_parameters))
        object.__setattr__(self, "tracks", tuple(self.tracks))

    def to_json(self) -> str:
        fmt = self.media_format
        return json.dumps(
            {
                "event": "start",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": list(self.tracks),
                    "customParameters": dict(self.custom_parameters),
                    "mediaFormat": {
                        "encoding": fmt.encoding,
                        "sampleRate": fmt.sample_rate,
                        "channels": fmt.channels,
                    },
                },
            }
        )


@dataclass(frozen=True, slots=True)
class Media:
    """Caller audio. ``payload`` is the base64-*decoded* μ-law; any length is accepted."""

    event: ClassVar[str] = "media"

    sequence_number: int
    stream_sid: StreamSid
    track: str
    chunk: int
    timestamp: int
    payload: bytes

    def to_json(self) -> str:
        return _media_text(
            self.sequence_number,
            _quoted(self.stream_sid),
            _quoted(self.track),
            self.chunk,
            self.timestamp,
            _b64encode(self.payload),
        )


def _media_text(
    sequence_number: int, sid: str, track: str, chunk: int, timestamp: int, payload: str
) -> str:
    """A ``media`` message from its parts: ``sid`` and ``track`` already JSON string literals,
    ``payload`` already base64.

    A template rather than json.dumps: the emulator sends this 50 times a second per call. The
    text is what json.dumps would write for the same dict (tests compare the two).
    """
    return (
        f'{{"event": "media", "sequenceNumber": "{sequence_number}", '
        f'"streamSid": {sid}, "media": {{"track": {track}, '
        f'"chunk": "{chunk}", "timestamp": "{timestamp}", "payload": "{payload}"}}}}'
    )


class MediaEncoder:
    """The ``media`` messages of one stream and track, for a sender of many (the emulator).

    ``encode(n, chunk, timestamp, payload)`` is ``Media(n, stream_sid, track, chunk, timestamp,
    payload).to_json()``, for less: the SID and track are quoted once, and a payload equal to the
    previous one (a caller's silence, frame after frame) is not base64-encoded again.
    """

    __slots__ = ("_last_base64", "_last_payload", "_sid", "_track")

    def __init__(self, stream_sid: StreamSid, track: str) -> None:
        self._sid = _quoted(stream_sid)
        self._track = _quoted(track)
        self._last_payload = b""
        self._last_base64 = ""

    def encode(self, sequence_number: int, chunk: int, timestamp: int, payload: bytes) -> str:
        if payload != self._last_payload:
            self._last_payload = bytes(payload)  # a copy if mutable: the cache must not change
            self._last_base64 = _b64encode(payload)
        return _media_text(
            sequence_number, self._sid, self._track, chunk, timestamp, self._last_base64
        )


@dataclass(frozen=True, slots=True)
class Mark:
    """Echo of a mark we sent: the audio queued before it has played — or was cleared."""

    event: ClassVar[str] = "mark"

    sequence_number: int
    stream_sid: StreamSid
    name: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "mark",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "mark": {"name": self.name},
            }
        )


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key the caller pressed; ``digit`` is one of :data:`DTMF_DIGITS`."""

    event: ClassVar[str] = "dtmf"

    sequence_number: int
    stream_sid: StreamSid
    track: str
    digit: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": str(self.sequence_number),
                "dtmf": {"track": self.track, "digit": self.digit},
            }
        )


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream has ended (call hung up, or the stream was stopped)."""

    event: ClassVar[str] = "stop"

    sequence_number: int
    stream_sid: StreamSid
    account_sid: AccountSid
    call_sid: CallSid

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "stop",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            }
        )


InboundMessage: TypeAlias = Connected | Start | Media | Mark | Dtmf | Stop


# --------------------------------------------------------------------------------------------
# Inbound parsing
# --------------------------------------------------------------------------------------------


def _tracks(obj: _JsonObject, event: str) -> tuple[str, ...]:
    value = obj.get("tracks")
    if value is None:
        return ("inbound",)
    if not isinstance(value, list) or not all(isinstance(track, str) for track in value):
        raise _error(event, "start.tracks", "is not an array of strings")
    return tuple(value)


def _custom_parameters(obj: _JsonObject, event: str) -> CustomParameters:
    value = obj.get("customParameters")
    if value is None:
        return CustomParameters()
    if not isinstance(value, dict):
        raise _error(event, "start.customParameters", f"is {_json_type(value)}, not an object")
    for name, param in value.items():
        if not isinstance(param, str):
            path = f"start.customParameters.{name}"
            raise _error(event, path, f"is {_json_type(param)}, not a string")
    return CustomParameters(value)


def _parse_connected(data: _JsonObject) -> Connected:
    return Connected(
        protocol=_str(data, "protocol", "connected"), version=_str(data, "version", "connected")
    )


def _parse_start(data: _JsonObject) -> Start:
    ev = "start"
    start = _obj(data, "start", ev)
    stream_sid = _sid(start, "streamSid", ev, "start.")
    top_sid = data.get("streamSid")
    if top_sid is not None and top_sid != stream_sid:
        raise _error(ev, "streamSid", "does not match 'start.streamSid'")
    fmt = _obj(start, "mediaFormat", ev, "start.")
    return Start(
        sequence_number=_int(data, "sequenceNumber", ev),
        stream_sid=StreamSid(stream_sid),
        account_sid=AccountSid(_sid(start, "accountSid", ev, "start.")),
        call_sid=CallSid(_sid(start, "callSid", ev, "start.")),
        tracks=_tracks(start, ev),
        custom_parameters=_custom_parameters(start, ev),
        media_format=MediaFormat(
            encoding=_str(fmt, "encoding", ev, "start.mediaFormat."),
            sample_rate=_int(fmt, "sampleRate", ev, "start.mediaFormat."),
            channels=_int(fmt, "channels", ev, "start.mediaFormat."),
        ),
    )


def _parse_media(data: _JsonObject) -> Media:
    fast = _media_fast(data)
    if fast is not None:
        return fast
    ev = "media"
    media = _obj(data, "media", ev)
    return Media(
        sequence_number=_int(data, "sequenceNumber", ev),
        stream_sid=StreamSid(_sid(data, "streamSid", ev)),
        track=_str(media, "track", ev, "media."),
        chunk=_int(media, "chunk", ev, "media."),
        timestamp=_int(media, "timestamp", ev, "media."),
        payload=_payload(media, ev, "media."),
    )


def _counter(value: object) -> int | None:
    """Twilio's form of a counter (a short string of ASCII digits) as an int, else None."""
    if type(value) is str and 0 < len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return None


def _media_fast(data: _JsonObject) -> Media | None:
    """A media message in exactly Twilio's form, or None to let the general path (which names
    the problem, or accepts the rarer forms such as JSON-number counters) decide.

    Media is ~50 messages a second per call, nearly all the server reads, so the common shape is
    checked inline rather than through the general field helpers.
    """
    media = data.get("media")
    if type(media) is not dict:
        return None
    sid, track, payload = data.get("streamSid"), media.get("track"), media.get("payload")
    seq = _counter(data.get("sequenceNumber"))
    chunk, timestamp = _counter(media.get("chunk")), _counter(media.get("timestamp"))
    if (
        type(sid) is not str
        or not sid
        or type(track) is not str
        or type(payload) is not str
        or seq is None
        or chunk is None
        or timestamp is None
    ):
        return None
    try:
        audio = binascii.a2b_base64(payload, strict_mode=True)
    except ValueError:
        return None
    return Media(seq, StreamSid(sid), track, chunk, timestamp, audio)


def _parse_mark(data: _JsonObject) -> Mark:
    ev = "mark"
    mark = _obj(data, "mark", ev)
    return Mark(
        sequence_number=_int(data, "sequenceNumber", ev),
        stream_sid=StreamSid(_sid(data, "streamSid", ev)),
        name=_str(mark, "name", ev, "mark."),
    )


def _parse_dtmf(data: _JsonObject) -> Dtmf:
    ev = "dtmf"
    dtmf = _obj(data, "dtmf", ev)
    digit = _str(dtmf, "digit", ev, "dtmf.")
    if digit not in DTMF_DIGITS:
        raise _error(ev, "dtmf.digit", f"is not one of 0-9 * # A-D: {digit!r:.40}")
    return Dtmf(
        sequence_number=_int(data, "sequenceNumber", ev),
        stream_sid=StreamSid(_sid(data, "streamSid", ev)),
        track=_str(dtmf, "track", ev, "dtmf."),
        digit=digit,
    )


def _parse_stop(data: _JsonObject) -> Stop:
    ev = "stop"
    stop = _obj(data, "stop", ev)
    return Stop(
        sequence_number=_int(data, "sequenceNumber", ev),
        stream_sid=StreamSid(_sid(data, "streamSid", ev)),
        account_sid=AccountSid(_sid(stop, "accountSid", ev, "stop.")),
        call_sid=CallSid(_sid(stop, "callSid", ev, "stop.")),
    )


_INBOUND_PARSERS: dict[str, Callable[[_JsonObject], InboundMessage]] = {
    "connected": _parse_connected,
    "start": _parse_start,
    "media": _parse_media,
    "mark": _parse_mark,
    "dtmf": _parse_dtmf,
    "stop": _parse_stop,
}


def parse_message(text: str | bytes) -> InboundMessage:
    """Parse one text frame from Twilio. Raises :class:`ProtocolError` and nothing else."""
    data = _load_object(text)
    event = _event_name(data)
    parser = _INBOUND_PARSERS.get(event)
    if parser is None:
        raise ProtocolError(f"unknown event {event!r:.60}", event)
    return parser(data)
