"""Server → Twilio (:func:`encode_media`, :func:`encode_mark`, :func:`encode_clear`).

Exactly the three messages Twilio accepts. Each encoder returns text equal to ``json.dumps`` of
the message's dict shape. :func:`parse_outbound` checks such text as strictly as Twilio does
(anything it rejects, Twilio answers with warning 31951): it exists for tests and the Twilio
emulator.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from callspeak.protocol._fields import (
    ProtocolError,
    StreamSid,
    _b64encode,
    _error,
    _event_name,
    _JsonObject,
    _load_object,
    _obj,
    _payload,
    _quoted,
    _sid,
    _str,
)

# --------------------------------------------------------------------------------------------
# Server -> Twilio messages
# --------------------------------------------------------------------------------------------


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
