"""The Twilio bidirectional Media Streams wire protocol, as pure functions over strings.

No I/O happens here: text goes in, immutable event objects come out, and encoders turn outbound
messages into the exact JSON text to put in a WebSocket *text* frame. The reference is Twilio's
"Media Streams - WebSocket Messages" page:
https://www.twilio.com/docs/voice/media-streams/websocket-messages

Contracts
---------
Twilio → server (:func:`parse_message`), liberal in what it accepts:

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

Server → Twilio (:func:`encode_media`, :func:`encode_mark`, :func:`encode_clear`): exactly the
three messages Twilio accepts. Each encoder returns text equal to ``json.dumps`` of the message's
dict shape. :func:`parse_outbound` checks such text as strictly as Twilio does (anything it
rejects, Twilio answers with warning 31951): it exists for tests and the Twilio emulator.

Every inbound event also has ``to_json()``, producing Twilio's own shape (counters as strings),
so that ``parse_message(event.to_json()) == event``; the emulator speaks through it, and writes
its 50 ``media`` messages a second per call with :class:`MediaEncoder` (the same text, cheaper).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, NewType, TypeAlias

import orjson

__all__ = [
    "DTMF_DIGITS",
    "AccountSid",
    "CallSid",
    "Clear",
    "Connected",
    "CustomParameters",
    "Dtmf",
    "InboundMessage",
    "Mark",
    "Media",
    "MediaEncoder",
    "MediaFormat",
    "OutboundMark",
    "OutboundMedia",
    "OutboundMessage",
    "ProtocolError",
    "Start",
    "Stop",
    "StreamSid",
    "encode_clear",
    "encode_mark",
    "encode_media",
    "parse_message",
    "parse_outbound",
]

StreamSid = NewType("StreamSid", str)
CallSid = NewType("CallSid", str)
AccountSid = NewType("AccountSid", str)

#: The keys a ``dtmf`` event may report.
DTMF_DIGITS = frozenset("0123456789*#ABCD")

_JsonObject: TypeAlias = dict[str, object]


class ProtocolError(ValueError):
    """A message that does not follow the Media Streams protocol.

    ``reason`` is a human-readable sentence (also ``str(error)``); ``event`` is the message's
    ``event`` name when it could be read, else ``None``.
    """

    def __init__(self, reason: str, event: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event = event


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
# Server -> Twilio messages
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _quoted(text: str) -> str:
    """``text`` as a JSON string literal, exactly as ``json.dumps`` writes it (cached: a stream
    reuses its SID for every frame)."""
    return json.dumps(text)


def _b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _check_stream_sid(event: str, stream_sid: str) -> None:
    if not stream_sid:
        raise ProtocolError(f"{event}: field 'streamSid' is empty", event)


def encode_media(stream_sid: StreamSid, payload: bytes) -> str:
    """``{"event": "media", "streamSid": …, "media": {"payload": <base64>}}`` for raw μ-law.

    Hot path (≈50 calls a second per call): a template, no dict and no ``json.dumps`` per call.
    ``payload`` must be headerless 8 kHz mono μ-law; any length is allowed.
    """
    if not stream_sid:  # inlined _check_stream_sid: this is the hot path
        raise ProtocolError("media: field 'streamSid' is empty", "media")
    return (
        f'{{"event": "media", "streamSid": {_quoted(stream_sid)}, '
        f'"media": {{"payload": "{_b64encode(payload)}"}}}}'
    )


def encode_mark(stream_sid: StreamSid, name: str) -> str:
    """``{"event": "mark", "streamSid": …, "mark": {"name": …}}``; ``name`` must be non-empty."""
    _check_stream_sid("mark", stream_sid)
    if not name:
        raise ProtocolError("mark: field 'mark.name' is empty", "mark")
    return (
        f'{{"event": "mark", "streamSid": {_quoted(stream_sid)}, '
        f'"mark": {{"name": {json.dumps(name)}}}}}'
    )


def encode_clear(stream_sid: StreamSid) -> str:
    """``{"event": "clear", "streamSid": …}``: drop buffered audio; Twilio echoes pending marks."""
    _check_stream_sid("clear", stream_sid)
    return f'{{"event": "clear", "streamSid": {_quoted(stream_sid)}}}'


@dataclass(frozen=True, slots=True)
class OutboundMedia:
    """Audio to play: raw μ-law bytes (encoded to base64 on the wire)."""

    event: ClassVar[str] = "media"

    stream_sid: StreamSid
    payload: bytes

    def to_json(self) -> str:
        return encode_media(self.stream_sid, self.payload)


@dataclass(frozen=True, slots=True)
class OutboundMark:
    """Ask Twilio to echo ``name`` once everything queued before it has played."""

    event: ClassVar[str] = "mark"

    stream_sid: StreamSid
    name: str

    def to_json(self) -> str:
        return encode_mark(self.stream_sid, self.name)


@dataclass(frozen=True, slots=True)
class Clear:
    """Empty Twilio's playback buffer (barge-in)."""

    event: ClassVar[str] = "clear"

    stream_sid: StreamSid

    def to_json(self) -> str:
        return encode_clear(self.stream_sid)


OutboundMessage: TypeAlias = OutboundMedia | OutboundMark | Clear


# --------------------------------------------------------------------------------------------
# Field extraction. ``prefix`` is the dotted path of ``obj`` in the message ("" or "media."),
# used only to build error messages.
# --------------------------------------------------------------------------------------------


def _error(event: str, path: str, problem: str) -> ProtocolError:
    return ProtocolError(f"{event}: field '{path}' {problem}", event)


def _load_object(text: str | bytes) -> _JsonObject:
    # orjson rather than json: ~3.5x faster on a media message (1.7 vs 5.9 µs), which is most of
    # what the server reads. It is stricter (no NaN, no lone surrogates, integers within 64
    # bits): none of that is in a message Twilio sends.
    try:
        data = orjson.loads(text)
    # orjson.JSONDecodeError is a ValueError; RecursionError kept for safety on deep nesting.
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"message is not a JSON object but {_json_type(data)}")
    return data


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _event_name(data: _JsonObject) -> str:
    event = data.get("event")
    if event is None:
        raise ProtocolError("message: field 'event' is missing")
    if not isinstance(event, str):
        raise ProtocolError(f"message: field 'event' is {_json_type(event)}, not a string")
    return event


def _require(obj: _JsonObject, key: str, event: str, prefix: str) -> object:
    try:
        return obj[key]
    except KeyError:
        raise _error(event, prefix + key, "is missing") from None


def _str(obj: _JsonObject, key: str, event: str, prefix: str = "") -> str:
    value = _require(obj, key, event, prefix)
    if not isinstance(value, str):
        raise _error(event, prefix + key, f"is {_json_type(value)}, not a string")
    return value


def _sid(obj: _JsonObject, key: str, event: str, prefix: str = "") -> str:
    value = _str(obj, key, event, prefix)
    if not value:
        raise _error(event, prefix + key, "is empty")
    return value


def _int(obj: _JsonObject, key: str, event: str, prefix: str = "") -> int:
    """A non-negative integer sent as a JSON integer or as a string of ASCII digits."""
    value = _require(obj, key, event, prefix)
    if type(value) is int:  # ``type`` rather than isinstance: bool is an int subclass
        if value >= 0:
            return value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        try:
            return int(value)
        except ValueError:  # more digits than sys.get_int_max_str_digits()
            pass
    raise _error(event, prefix + key, f"is not a non-negative integer: {value!r:.40}")


def _obj(obj: _JsonObject, key: str, event: str, prefix: str = "") -> _JsonObject:
    value = _require(obj, key, event, prefix)
    if not isinstance(value, dict):
        raise _error(event, prefix + key, f"is {_json_type(value)}, not an object")
    return value


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


def _payload(obj: _JsonObject, event: str, prefix: str) -> bytes:
    encoded = _str(obj, "payload", event, prefix)
    try:
        return binascii.a2b_base64(encoded, strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise _error(event, prefix + "payload", "is not valid base64") from None


# --------------------------------------------------------------------------------------------
# Inbound parsing
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Outbound parsing (strict, as Twilio is)
# --------------------------------------------------------------------------------------------


def _exact_keys(obj: _JsonObject, allowed: frozenset[str], event: str, prefix: str) -> None:
    extra = obj.keys() - allowed
    if extra:
        raise _error(event, prefix + min(extra), "is not allowed")


_MEDIA_KEYS = frozenset({"event", "streamSid", "media"})
_MARK_KEYS = frozenset({"event", "streamSid", "mark"})
_CLEAR_KEYS = frozenset({"event", "streamSid"})
_PAYLOAD_KEYS = frozenset({"payload"})
_NAME_KEYS = frozenset({"name"})


def _parse_outbound_media(data: _JsonObject) -> OutboundMedia:
    ev = "media"
    _exact_keys(data, _MEDIA_KEYS, ev, "")
    stream_sid = _sid(data, "streamSid", ev)
    media = _obj(data, "media", ev)
    _exact_keys(media, _PAYLOAD_KEYS, ev, "media.")
    return OutboundMedia(StreamSid(stream_sid), _payload(media, ev, "media."))


def _parse_outbound_mark(data: _JsonObject) -> OutboundMark:
    ev = "mark"
    _exact_keys(data, _MARK_KEYS, ev, "")
    stream_sid = _sid(data, "streamSid", ev)
    mark = _obj(data, "mark", ev)
    _exact_keys(mark, _NAME_KEYS, ev, "mark.")
    name = _str(mark, "name", ev, "mark.")
    if not name:
        raise _error(ev, "mark.name", "is empty")
    return OutboundMark(StreamSid(stream_sid), name)


def _parse_clear(data: _JsonObject) -> Clear:
    _exact_keys(data, _CLEAR_KEYS, "clear", "")
    return Clear(StreamSid(_sid(data, "streamSid", "clear")))


_OUTBOUND_PARSERS: dict[str, Callable[[_JsonObject], OutboundMessage]] = {
    "media": _parse_outbound_media,
    "mark": _parse_outbound_mark,
    "clear": _parse_clear,
}


def parse_outbound(text: str | bytes) -> OutboundMessage:
    """Parse a server → Twilio message as strictly as Twilio does (else warning 31951).

    Rejects bad JSON, unknown events, missing or extra fields, an empty or non-string
    ``streamSid``, a non-string or invalid base64 ``payload``, and an empty mark ``name``.
    Raises :class:`ProtocolError` and nothing else.
    """
    data = _load_object(text)
    event = _event_name(data)
    parser = _OUTBOUND_PARSERS.get(event)
    if parser is None:
        raise ProtocolError(f"unknown event {event!r:.60}", event)
    return parser(data)
