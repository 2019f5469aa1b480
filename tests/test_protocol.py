"""Tests for callspeak.protocol: strings in, objects and strings out. No sockets, no event loop."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import random
from typing import Any

import pytest

from callspeak.protocol import (
    DTMF_DIGITS,
    AccountSid,
    CallSid,
    Clear,
    Connected,
    CustomParameters,
    Dtmf,
    InboundMessage,
    Mark,
    Media,
    MediaEncoder,
    MediaFormat,
    OutboundMark,
    OutboundMedia,
    OutboundMessage,
    ProtocolError,
    Start,
    Stop,
    StreamSid,
    encode_clear,
    encode_mark,
    encode_media,
    parse_message,
    parse_outbound,
)

STREAM = StreamSid("MZ18ad3ab5a668481ce02b83e7395059f0")
CALL = CallSid("CA362f0a4e9b6ad7b3bb8d2e1e7c6f2b8e")
ACCOUNT = AccountSid("AC25e16e9a716a4a1786a7c83f58e30482")
AUDIO = bytes(range(0x7F, 0xFF)) + bytes(range(0x20))  # 160 bytes: one 20 ms μ-law frame
AUDIO_B64 = base64.b64encode(AUDIO).decode("ascii")

# The reference doc's examples (shared/reference/twilio-media-streams.md), with real-looking SIDs.
CONNECTED: dict[str, Any] = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
START: dict[str, Any] = {
    "event": "start",
    "sequenceNumber": "1",
    "streamSid": STREAM,
    "start": {
        "accountSid": ACCOUNT,
        "streamSid": STREAM,
        "callSid": CALL,
        "tracks": ["inbound"],
        "customParameters": {"k": "v"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
}
MEDIA: dict[str, Any] = {
    "event": "media",
    "sequenceNumber": "4",
    "streamSid": STREAM,
    "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": AUDIO_B64},
}
DTMF: dict[str, Any] = {
    "event": "dtmf",
    "streamSid": STREAM,
    "sequenceNumber": "5",
    "dtmf": {"track": "inbound_track", "digit": "1"},
}
MARK: dict[str, Any] = {
    "event": "mark",
    "sequenceNumber": "6",
    "streamSid": STREAM,
    "mark": {"name": "utterance-1"},
}
STOP: dict[str, Any] = {
    "event": "stop",
    "sequenceNumber": "7",
    "streamSid": STREAM,
    "stop": {"accountSid": ACCOUNT, "callSid": CALL},
}
EXAMPLES = {
    "connected": CONNECTED,
    "start": START,
    "media": MEDIA,
    "dtmf": DTMF,
    "mark": MARK,
    "stop": STOP,
}

OUT_MEDIA: dict[str, Any] = {"event": "media", "streamSid": STREAM, "media": {"payload": AUDIO_B64}}
OUT_MARK: dict[str, Any] = {"event": "mark", "streamSid": STREAM, "mark": {"name": "utterance-1"}}
OUT_CLEAR: dict[str, Any] = {"event": "clear", "streamSid": STREAM}
OUT_EXAMPLES = {"media": OUT_MEDIA, "mark": OUT_MARK, "clear": OUT_CLEAR}

DELETE = object()


def changed(message: dict[str, Any], path: str, value: object) -> str:
    """``message`` as JSON with the dotted ``path`` set to ``value`` (or removed, for DELETE)."""
    result = copy.deepcopy(message)
    *parents, last = path.split(".")
    target = result
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return json.dumps(result)


def rejected(text: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_message(text)
    return info.value


def rejected_outbound(text: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_outbound(text)
    return info.value


# ------------------------------------------------------------------------------------------------
# Inbound: the examples parse to the expected events
# ------------------------------------------------------------------------------------------------


def test_connected() -> None:
    assert parse_message(json.dumps(CONNECTED)) == Connected(protocol="Call", version="1.0.0")


def test_start() -> None:
    event = parse_message(json.dumps(START))
    assert event == Start(
        sequence_number=1,
        stream_sid=STREAM,
        account_sid=ACCOUNT,
        call_sid=CALL,
        tracks=("inbound",),
        custom_parameters={"k": "v"},
        media_format=MediaFormat(encoding="audio/x-mulaw", sample_rate=8000, channels=1),
    )
    assert isinstance(event, Start)
    assert isinstance(event.custom_parameters, CustomParameters)
    assert event.custom_parameters["k"] == "v"


def test_media() -> None:
    assert parse_message(json.dumps(MEDIA)) == Media(
        sequence_number=4, stream_sid=STREAM, track="inbound", chunk=2, timestamp=5, payload=AUDIO
    )


def test_dtmf() -> None:
    assert parse_message(json.dumps(DTMF)) == Dtmf(
        sequence_number=5, stream_sid=STREAM, track="inbound_track", digit="1"
    )


def test_mark() -> None:
    assert parse_message(json.dumps(MARK)) == Mark(
        sequence_number=6, stream_sid=STREAM, name="utterance-1"
    )


def test_stop() -> None:
    assert parse_message(json.dumps(STOP)) == Stop(
        sequence_number=7, stream_sid=STREAM, account_sid=ACCOUNT, call_sid=CALL
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_bytes_are_accepted_like_text(name: str) -> None:
    text = json.dumps(EXAMPLES[name])
    assert parse_message(text.encode("utf-8")) == parse_message(text)


def test_event_class_names_match_the_wire() -> None:
    for name, example in EXAMPLES.items():
        assert parse_message(json.dumps(example)).event == name


# ------------------------------------------------------------------------------------------------
# Inbound: liberal acceptance
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_unknown_extra_fields_are_ignored(name: str) -> None:
    message = copy.deepcopy(EXAMPLES[name])
    message["futureField"] = {"anything": [1, 2]}
    for value in message.values():
        if isinstance(value, dict):
            value["alsoNew"] = None
    assert parse_message(json.dumps(message)) == parse_message(json.dumps(EXAMPLES[name]))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("4", 4), (4, 4), ("0", 0), (0, 0), ("007", 7), ("18446744073709551616", 2**64)],
)
def test_counters_accept_integers_and_digit_strings(value: object, expected: int) -> None:
    for path in ("sequenceNumber", "media.chunk", "media.timestamp"):
        event = parse_message(changed(MEDIA, path, value))
        assert isinstance(event, Media)
        got = {
            "sequenceNumber": event.sequence_number,
            "media.chunk": event.chunk,
            "media.timestamp": event.timestamp,
        }[path]
        assert got == expected


def test_media_format_numbers_may_also_be_strings() -> None:
    event = parse_message(changed(START, "start.mediaFormat.sampleRate", "8000"))
    assert isinstance(event, Start)
    assert event.media_format.sample_rate == 8000


def test_start_without_top_level_stream_sid_uses_start_stream_sid() -> None:
    event = parse_message(changed(START, "streamSid", DELETE))
    assert isinstance(event, Start)
    assert event.stream_sid == STREAM


def test_start_tracks_default_to_inbound() -> None:
    for value in (DELETE, None):
        event = parse_message(changed(START, "start.tracks", value))
        assert isinstance(event, Start)
        assert event.tracks == ("inbound",)


def test_start_tracks_may_list_several() -> None:
    event = parse_message(changed(START, "start.tracks", ["inbound", "outbound"]))
    assert isinstance(event, Start)
    assert event.tracks == ("inbound", "outbound")


def test_start_custom_parameters_default_to_empty() -> None:
    for value in (DELETE, None):
        event = parse_message(changed(START, "start.customParameters", value))
        assert isinstance(event, Start)
        assert event.custom_parameters == {}
        assert len(event.custom_parameters) == 0


def test_start_custom_parameters_keep_unicode_and_order() -> None:
    params = {"token": "s3cr3t", "name": "José ☎", "empty": ""}
    event = parse_message(changed(START, "start.customParameters", params))
    assert isinstance(event, Start)
    assert list(event.custom_parameters.items()) == list(params.items())


@pytest.mark.parametrize("digit", sorted(DTMF_DIGITS))
def test_every_dtmf_digit(digit: str) -> None:
    event = parse_message(changed(DTMF, "dtmf.digit", digit))
    assert isinstance(event, Dtmf)
    assert event.digit == digit


@pytest.mark.parametrize("payload", [b"", b"\xff", b"\x00\x01", bytes(1600)])
def test_media_payload_of_any_length(payload: bytes) -> None:
    event = parse_message(changed(MEDIA, "media.payload", base64.b64encode(payload).decode()))
    assert isinstance(event, Media)
    assert event.payload == payload


def test_empty_mark_name_echo_is_accepted() -> None:
    # We never send one (encode_mark refuses), but an echo is reported, not judged.
    event = parse_message(changed(MARK, "mark.name", ""))
    assert isinstance(event, Mark)
    assert event.name == ""


# ------------------------------------------------------------------------------------------------
# Inbound: precise rejection
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "message is not valid JSON: Input is a zero-length, empty document"),
        ("{", "message is not valid JSON: "),
        ('{"event": "media",}', "message is not valid JSON: "),
        ("[]", "message is not a JSON object but an array"),
        ('"media"', "message is not a JSON object but a string"),
        ("4", "message is not a JSON object but a number"),
        ("4.5", "message is not a JSON object but a number"),
        ("true", "message is not a JSON object but a boolean"),
        ("null", "message is not a JSON object but null"),
        ("{}", "message: field 'event' is missing"),
        ('{"event": null}', "message: field 'event' is missing"),
        ('{"event": 5}', "message: field 'event' is a number, not a string"),
        ('{"event": {}}', "message: field 'event' is an object, not a string"),
    ],
)
def test_rejects_what_is_not_a_message(text: str, reason: str) -> None:
    error = rejected(text)
    assert error.reason.startswith(reason)
    assert error.event is None


def test_rejects_invalid_utf8() -> None:
    assert rejected(b'{"event": "\xff"}').reason.startswith("message is not valid JSON")


def test_rejects_deep_nesting_without_recursion_error() -> None:
    assert rejected("[" * 100_000).reason.startswith("message is not valid JSON")


def test_rejects_oversized_integer_literal() -> None:
    text = '{"event": "media", "sequenceNumber": ' + "9" * 5000 + "}"
    assert rejected(text).reason.startswith("message is not valid JSON")


def test_rejects_unknown_event() -> None:
    error = rejected('{"event": "clear", "streamSid": "MZ1"}')
    assert error.reason == "unknown event 'clear'"
    assert error.event == "clear"


@pytest.mark.parametrize(
    ("example", "path", "value", "reason"),
    [
        # connected
        (CONNECTED, "protocol", DELETE, "connected: field 'protocol' is missing"),
        (CONNECTED, "version", 1, "connected: field 'version' is a number, not a string"),
        # start
        (START, "start", DELETE, "start: field 'start' is missing"),
        (START, "start", [], "start: field 'start' is an array, not an object"),
        (START, "sequenceNumber", DELETE, "start: field 'sequenceNumber' is missing"),
        (START, "start.streamSid", DELETE, "start: field 'start.streamSid' is missing"),
        (START, "start.streamSid", "", "start: field 'start.streamSid' is empty"),
        (
            START,
            "streamSid",
            "MZother",
            "start: field 'streamSid' does not match 'start.streamSid'",
        ),
        (START, "streamSid", 7, "start: field 'streamSid' does not match 'start.streamSid'"),
        (START, "start.accountSid", DELETE, "start: field 'start.accountSid' is missing"),
        (START, "start.callSid", None, "start: field 'start.callSid' is null, not a string"),
        (
            START,
            "start.tracks",
            "inbound",
            "start: field 'start.tracks' is not an array of strings",
        ),
        (
            START,
            "start.tracks",
            ["inbound", 1],
            "start: field 'start.tracks' is not an array of strings",
        ),
        (
            START,
            "start.customParameters",
            [],
            "start: field 'start.customParameters' is an array, not an object",
        ),
        (
            START,
            "start.customParameters",
            "k=v",
            "start: field 'start.customParameters' is a string, not an object",
        ),
        (
            START,
            "start.customParameters.k",
            1,
            "start: field 'start.customParameters.k' is a number, not a string",
        ),
        (
            START,
            "start.customParameters.k",
            True,
            "start: field 'start.customParameters.k' is a boolean, not a string",
        ),
        (
            START,
            "start.customParameters.k",
            None,
            "start: field 'start.customParameters.k' is null, not a string",
        ),
        (
            START,
            "start.customParameters.k",
            {"a": "b"},
            "start: field 'start.customParameters.k' is an object, not a string",
        ),
        (
            START,
            "start.customParameters.k",
            ["v"],
            "start: field 'start.customParameters.k' is an array, not a string",
        ),
        (START, "start.mediaFormat", DELETE, "start: field 'start.mediaFormat' is missing"),
        (
            START,
            "start.mediaFormat",
            "audio/x-mulaw",
            "start: field 'start.mediaFormat' is a string, not an object",
        ),
        (
            START,
            "start.mediaFormat.encoding",
            DELETE,
            "start: field 'start.mediaFormat.encoding' is missing",
        ),
        (
            START,
            "start.mediaFormat.sampleRate",
            8000.0,
            "start: field 'start.mediaFormat.sampleRate' is not a non-negative integer: 8000.0",
        ),
        (
            START,
            "start.mediaFormat.channels",
            DELETE,
            "start: field 'start.mediaFormat.channels' is missing",
        ),
        # media
        (MEDIA, "media", DELETE, "media: field 'media' is missing"),
        (MEDIA, "media", "payload", "media: field 'media' is a string, not an object"),
        (MEDIA, "streamSid", DELETE, "media: field 'streamSid' is missing"),
        (MEDIA, "streamSid", "", "media: field 'streamSid' is empty"),
        (MEDIA, "streamSid", 1, "media: field 'streamSid' is a number, not a string"),
        (MEDIA, "sequenceNumber", DELETE, "media: field 'sequenceNumber' is missing"),
        (MEDIA, "media.track", DELETE, "media: field 'media.track' is missing"),
        (MEDIA, "media.chunk", DELETE, "media: field 'media.chunk' is missing"),
        (MEDIA, "media.timestamp", DELETE, "media: field 'media.timestamp' is missing"),
        (MEDIA, "media.payload", DELETE, "media: field 'media.payload' is missing"),
        (MEDIA, "media.payload", 5, "media: field 'media.payload' is a number, not a string"),
        (MEDIA, "media.payload", [1, 2], "media: field 'media.payload' is an array, not a string"),
        (MEDIA, "media.payload", "abc", "media: field 'media.payload' is not valid base64"),
        # mark
        (MARK, "mark", DELETE, "mark: field 'mark' is missing"),
        (MARK, "mark", None, "mark: field 'mark' is null, not an object"),
        (MARK, "mark.name", DELETE, "mark: field 'mark.name' is missing"),
        (MARK, "mark.name", 1, "mark: field 'mark.name' is a number, not a string"),
        (MARK, "streamSid", DELETE, "mark: field 'streamSid' is missing"),
        (
            MARK,
            "sequenceNumber",
            "x",
            "mark: field 'sequenceNumber' is not a non-negative integer: 'x'",
        ),
        # dtmf
        (DTMF, "dtmf", DELETE, "dtmf: field 'dtmf' is missing"),
        (DTMF, "dtmf.digit", DELETE, "dtmf: field 'dtmf.digit' is missing"),
        (DTMF, "dtmf.digit", 1, "dtmf: field 'dtmf.digit' is a number, not a string"),
        (DTMF, "dtmf.track", DELETE, "dtmf: field 'dtmf.track' is missing"),
        (DTMF, "streamSid", DELETE, "dtmf: field 'streamSid' is missing"),
        (DTMF, "sequenceNumber", DELETE, "dtmf: field 'sequenceNumber' is missing"),
        # stop
        (STOP, "stop", DELETE, "stop: field 'stop' is missing"),
        (STOP, "stop", True, "stop: field 'stop' is a boolean, not an object"),
        (STOP, "stop.accountSid", DELETE, "stop: field 'stop.accountSid' is missing"),
        (STOP, "stop.callSid", "", "stop: field 'stop.callSid' is empty"),
        (STOP, "streamSid", DELETE, "stop: field 'streamSid' is missing"),
        (STOP, "sequenceNumber", DELETE, "stop: field 'sequenceNumber' is missing"),
    ],
)
def test_rejects_bad_fields(example: dict[str, Any], path: str, value: object, reason: str) -> None:
    error = rejected(changed(example, path, value))
    assert error.reason == reason
    assert str(error) == reason
    assert error.event == example["event"]


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "",
        " 4",
        "4 ",
        "+4",
        "-1",
        "4.0",
        "4_0",
        "0x4",
        "\u0664",
        "\u00b2",
        "1e3",
        4.0,
        4.5,
        -1,
        True,
        False,
        None,
        [],
        {},
        "9" * 5000,
    ],
)
@pytest.mark.parametrize("path", ["sequenceNumber", "media.chunk", "media.timestamp"])
def test_rejects_non_integer_counters(path: str, value: object) -> None:
    error = rejected(changed(MEDIA, path, value))
    assert error.reason.startswith(f"media: field '{path}' is not a non-negative integer: ")
    assert len(error.reason) < 120  # a huge value is truncated, not dumped into logs


@pytest.mark.parametrize(
    "payload",
    [
        "abc",
        "a",
        "ab=c",
        "a===",
        "ab==cd==",
        "=abc",
        " " + AUDIO_B64,
        AUDIO_B64 + "\n",
        AUDIO_B64[:-4] + "!!!!",
        AUDIO_B64.replace("+", "-"),
        "é" * 4,
    ],
)
def test_rejects_invalid_base64(payload: str) -> None:
    assert rejected(changed(MEDIA, "media.payload", payload)).reason == (
        "media: field 'media.payload' is not valid base64"
    )


@pytest.mark.parametrize("digit", ["", "a", "E", "11", "٣", "*#", " 1"])
def test_rejects_invalid_dtmf_digit(digit: str) -> None:
    error = rejected(changed(DTMF, "dtmf.digit", digit))
    assert error.reason == f"dtmf: field 'dtmf.digit' is not one of 0-9 * # A-D: {digit!r}"


def test_protocol_error_is_a_value_error() -> None:
    error = ProtocolError("media: oops", "media")
    assert isinstance(error, ValueError)
    assert (error.reason, error.event, str(error)) == ("media: oops", "media", "media: oops")
    assert ProtocolError("bad").event is None


# ------------------------------------------------------------------------------------------------
# Inbound: to_json is Twilio's shape, and round-trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_to_json_is_twilios_shape(name: str) -> None:
    """Counters come out as strings, sampleRate/channels as numbers, payload as base64."""
    event = parse_message(json.dumps(EXAMPLES[name]))
    assert json.loads(event.to_json()) == EXAMPLES[name]


@pytest.mark.parametrize("name", EXAMPLES)
def test_inbound_round_trip(name: str) -> None:
    event = parse_message(json.dumps(EXAMPLES[name]))
    assert parse_message(event.to_json()) == event


def test_round_trip_of_constructed_events() -> None:
    events: list[InboundMessage] = [
        Connected("Call", "1.0.0"),
        Start(
            sequence_number=1,
            stream_sid=StreamSid('MZ"\\\n☎'),
            account_sid=ACCOUNT,
            call_sid=CALL,
            tracks=("inbound", "outbound"),
            custom_parameters={"a": "1", "ü": "\u0000"},
            media_format=MediaFormat("audio/x-mulaw", 8000, 1),
        ),
        Media(2**40, STREAM, "inbound", 0, 123_456, b""),
        Media(3, STREAM, "inbound", 1, 20, AUDIO),
        Mark(9, STREAM, 'mark "with" quotes'),
        Dtmf(10, STREAM, "inbound_track", "#"),
        Stop(11, STREAM, ACCOUNT, CALL),
    ]
    for event in events:
        assert parse_message(event.to_json()) == event


@pytest.mark.parametrize(
    "sid, track", [(STREAM, "inbound"), (StreamSid('MZ"\\\n☎\u0000'), 'in"bound\t')]
)
def test_media_to_json_is_exactly_what_json_dumps_writes(sid: StreamSid, track: str) -> None:
    """The emulator's hot path uses a template; its text must equal the plain dict's dump."""
    media = Media(2**40, sid, track, 7, 140, AUDIO)
    assert media.to_json() == json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(2**40),
            "streamSid": sid,
            "media": {
                "track": track,
                "chunk": "7",
                "timestamp": "140",
                "payload": base64.b64encode(AUDIO).decode(),
            },
        }
    )


@pytest.mark.parametrize(
    "sid, track", [(STREAM, "inbound"), (StreamSid('MZ"\\\n☎\u0000'), 'in"bound\t')]
)
def test_media_encoder_writes_what_media_to_json_writes(sid: StreamSid, track: str) -> None:
    encoder = MediaEncoder(sid, track)
    silence = b"\xff" * 160
    payloads = [b"", silence, silence, b"\xff" * 160, AUDIO, silence, b"", b"\x01" * 80]
    for n, payload in enumerate(payloads):
        want = Media(n + 2, sid, track, n + 1, 20 * n, payload).to_json()
        assert encoder.encode(n + 2, n + 1, 20 * n, payload) == want
    assert encoder.encode(2**40, 7, 140, AUDIO) == Media(2**40, sid, track, 7, 140, AUDIO).to_json()


def test_media_encoders_base64_cache_follows_a_bytearray_changed_in_place() -> None:
    encoder = MediaEncoder(STREAM, "inbound")
    frame = bytearray(b"\x01" * 160)
    assert (
        encoder.encode(1, 1, 0, frame) == Media(1, STREAM, "inbound", 1, 0, bytes(frame)).to_json()
    )
    frame[0] = 0x02
    assert (
        encoder.encode(2, 2, 20, frame)
        == Media(2, STREAM, "inbound", 2, 20, bytes(frame)).to_json()
    )


def test_start_keeps_an_immutable_hashable_copy_of_custom_parameters() -> None:
    params = {"k": "v"}
    start = Start(1, STREAM, ACCOUNT, CALL, ["inbound"], params, MediaFormat("x", 8000, 1))  # type: ignore[arg-type]
    params["k"] = "changed"
    assert start.custom_parameters == {"k": "v"}
    assert start.tracks == ("inbound",)
    assert isinstance(start.custom_parameters, CustomParameters)
    assert not hasattr(start.custom_parameters, "__setitem__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        start.custom_parameters = {}  # type: ignore[misc]
    same = parse_message(start.to_json())
    assert hash(same) == hash(start)
    assert {start, same} == {start}


def test_custom_parameters_mapping() -> None:
    params = CustomParameters([("b", "2"), ("a", "1")])
    assert params == {"b": "2", "a": "1"} == CustomParameters({"a": "1", "b": "2"})
    assert hash(params) == hash(CustomParameters({"a": "1", "b": "2"}))
    assert list(params) == ["b", "a"]
    assert params.get("missing") is None
    assert repr(params) == "CustomParameters({'b': '2', 'a': '1'})"
    assert CustomParameters() == {}


def test_events_are_frozen() -> None:
    event = parse_message(json.dumps(MEDIA))
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.payload = b""  # type: ignore[misc, union-attr]


# ------------------------------------------------------------------------------------------------
# Outbound: encoders
# ------------------------------------------------------------------------------------------------

AWKWARD_SIDS = [
    STREAM,
    StreamSid('MZ"quote'),
    StreamSid("MZ\\back\nslash\t\u0001"),
    StreamSid("MZ☎é𝄞"),
]


@pytest.mark.parametrize("sid", AWKWARD_SIDS)
@pytest.mark.parametrize("payload", [b"", b"\xff", AUDIO, bytes(range(256)) * 4])
def test_encode_media_equals_json_dumps(sid: StreamSid, payload: bytes) -> None:
    text = encode_media(sid, payload)
    shape = {
        "event": "media",
        "streamSid": sid,
        "media": {"payload": base64.b64encode(payload).decode()},
    }
    assert text == json.dumps(shape)
    assert parse_outbound(text) == OutboundMedia(sid, payload)
    assert OutboundMedia(sid, payload).to_json() == text


@pytest.mark.parametrize("sid", AWKWARD_SIDS)
@pytest.mark.parametrize(
    "name", ["utterance-1", 'say "hi"', "back\\slash", "new\nline", "☎ 𝄞", "\u2028"]
)
def test_encode_mark_equals_json_dumps(sid: StreamSid, name: str) -> None:
    text = encode_mark(sid, name)
    assert text == json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}})
    assert parse_outbound(text) == OutboundMark(sid, name)
    assert OutboundMark(sid, name).to_json() == text


@pytest.mark.parametrize("sid", AWKWARD_SIDS)
def test_encode_clear_equals_json_dumps(sid: StreamSid) -> None:
    text = encode_clear(sid)
    assert text == json.dumps({"event": "clear", "streamSid": sid})
    assert parse_outbound(text) == Clear(sid)
    assert Clear(sid).to_json() == text


def test_encoders_match_the_reference_shapes() -> None:
    assert json.loads(encode_media(STREAM, AUDIO)) == OUT_MEDIA
    assert json.loads(encode_mark(STREAM, "utterance-1")) == OUT_MARK
    assert json.loads(encode_clear(STREAM)) == OUT_CLEAR


@pytest.mark.parametrize(
    ("encode", "reason"),
    [
        (lambda: encode_media(StreamSid(""), AUDIO), "media: field 'streamSid' is empty"),
        (lambda: encode_mark(StreamSid(""), "m"), "mark: field 'streamSid' is empty"),
        (lambda: encode_mark(STREAM, ""), "mark: field 'mark.name' is empty"),
        (lambda: encode_clear(StreamSid("")), "clear: field 'streamSid' is empty"),
        (lambda: OutboundMark(STREAM, "").to_json(), "mark: field 'mark.name' is empty"),
    ],
)
def test_encoders_refuse_what_twilio_would_reject(encode: Any, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        encode()
    assert info.value.reason == reason


# ------------------------------------------------------------------------------------------------
# Outbound: strict parsing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OUT_EXAMPLES)
def test_parse_outbound_examples(name: str) -> None:
    expectations: dict[str, OutboundMessage] = {
        "media": OutboundMedia(STREAM, AUDIO),
        "mark": OutboundMark(STREAM, "utterance-1"),
        "clear": Clear(STREAM),
    }
    expected = expectations[name]
    text = json.dumps(OUT_EXAMPLES[name])
    assert parse_outbound(text) == expected
    assert parse_outbound(text.encode()) == expected
    assert parse_outbound(expected.to_json()) == expected
    assert expected.event == name


@pytest.mark.parametrize(
    ("text", "reason", "event"),
    [
        ("not json", "message is not valid JSON: ", None),
        ("[1]", "message is not a JSON object but an array", None),
        ('{"streamSid": "MZ1"}', "message: field 'event' is missing", None),
        ('{"event": "start", "streamSid": "MZ1"}', "unknown event 'start'", "start"),
        ('{"event": "Media", "streamSid": "MZ1"}', "unknown event 'Media'", "Media"),
    ],
)
def test_parse_outbound_rejects_non_messages(text: str, reason: str, event: str | None) -> None:
    error = rejected_outbound(text)
    assert error.reason.startswith(reason)
    assert error.event == event


@pytest.mark.parametrize(
    ("example", "path", "value", "reason"),
    [
        (OUT_MEDIA, "streamSid", DELETE, "media: field 'streamSid' is missing"),
        (OUT_MEDIA, "streamSid", "", "media: field 'streamSid' is empty"),
        (OUT_MEDIA, "streamSid", None, "media: field 'streamSid' is null, not a string"),
        (OUT_MEDIA, "media", DELETE, "media: field 'media' is missing"),
        (OUT_MEDIA, "media", AUDIO_B64, "media: field 'media' is a string, not an object"),
        (OUT_MEDIA, "media.payload", DELETE, "media: field 'media.payload' is missing"),
        (OUT_MEDIA, "media.payload", [1], "media: field 'media.payload' is an array, not a string"),
        (OUT_MEDIA, "media.payload", "abc", "media: field 'media.payload' is not valid base64"),
        (OUT_MEDIA, "media.track", "outbound", "media: field 'media.track' is not allowed"),
        (OUT_MEDIA, "sequenceNumber", "1", "media: field 'sequenceNumber' is not allowed"),
        (OUT_MARK, "streamSid", DELETE, "mark: field 'streamSid' is missing"),
        (OUT_MARK, "mark", DELETE, "mark: field 'mark' is missing"),
        (OUT_MARK, "mark", "m", "mark: field 'mark' is a string, not an object"),
        (OUT_MARK, "mark.name", DELETE, "mark: field 'mark.name' is missing"),
        (OUT_MARK, "mark.name", "", "mark: field 'mark.name' is empty"),
        (OUT_MARK, "mark.name", 3, "mark: field 'mark.name' is a number, not a string"),
        (OUT_MARK, "mark.id", "x", "mark: field 'mark.id' is not allowed"),
        (OUT_MARK, "media", {}, "mark: field 'media' is not allowed"),
        (OUT_CLEAR, "streamSid", DELETE, "clear: field 'streamSid' is missing"),
        (OUT_CLEAR, "streamSid", 0, "clear: field 'streamSid' is a number, not a string"),
        (OUT_CLEAR, "mark", {"name": "m"}, "clear: field 'mark' is not allowed"),
    ],
)
def test_parse_outbound_rejects_bad_fields(
    example: dict[str, Any], path: str, value: object, reason: str
) -> None:
    error = rejected_outbound(changed(example, path, value))
    assert error.reason == reason
    assert error.event == example["event"]


def test_parse_outbound_names_extra_fields_deterministically() -> None:
    text = json.dumps({**OUT_CLEAR, "zeta": 1, "alpha": 2})
    assert rejected_outbound(text).reason == "clear: field 'alpha' is not allowed"


# ------------------------------------------------------------------------------------------------
# Fuzzing: parsers raise ProtocolError and nothing else; whatever parses round-trips
# ------------------------------------------------------------------------------------------------

_JUNK_VALUES: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**70,
    "",
    "0",
    "-1",
    "x",
    "AAAA",
    "=",
    "\u0000",
    "☎",
    [],
    [1],
    ["inbound"],
    {},
    {"a": 1},
    {"name": ""},
]
_JUNK_TEXT = [
    '"',
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\\",
    "\\u",
    "\\ud800",
    "null",
    "1e999",
    "NaN",
    "-",
    "0",
    "\x00",
    "é",
    " ",
]


def _paths(value: object, prefix: str = "") -> list[str]:
    if not isinstance(value, dict):
        return []
    paths = []
    for key, child in value.items():
        path = prefix + key
        paths.append(path)
        paths.extend(_paths(child, path + "."))
    return paths


def _check_inbound(text: str | bytes) -> None:
    try:
        event = parse_message(text)
    except ProtocolError as error:
        assert error.reason
        return
    assert parse_message(event.to_json()) == event
    hash(event)


def _check_outbound(text: str | bytes) -> None:
    try:
        message = parse_outbound(text)
    except ProtocolError as error:
        assert error.reason
        return
    assert parse_outbound(message.to_json()) == message


def test_fuzz_structural_mutations() -> None:
    """Every field of every example set to every junk value, or removed."""
    for examples, check in ((EXAMPLES, _check_inbound), (OUT_EXAMPLES, _check_outbound)):
        for example in examples.values():
            for path in _paths(example):
                check(changed(example, path, DELETE))
                for junk in _JUNK_VALUES:
                    check(changed(example, path, junk))


def _mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(text) + 1)
        choice = rng.random()
        if choice < 0.3:
            text = text[:position] + text[position + rng.randint(1, 8) :]
        elif choice < 0.6:
            text = text[:position] + rng.choice(_JUNK_TEXT) + text[position:]
        elif choice < 0.8:
            text = text[:position] + chr(rng.randrange(0x110000) & 0xFFFF) + text[position:]
        else:
            text = text[:position]
    return text


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_textual_mutations(seed: int) -> None:
    rng = random.Random(seed)
    texts = [json.dumps(example) for example in EXAMPLES.values()]
    out_texts = [json.dumps(example) for example in OUT_EXAMPLES.values()]
    for _ in range(2000):
        text = _mutate(rng, rng.choice(texts))
        _check_inbound(text)
        _check_inbound(text.encode("utf-8", "surrogatepass"))
        _check_outbound(_mutate(rng, rng.choice(out_texts)))


def test_fuzz_random_bytes() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        blob = rng.randbytes(rng.randrange(64))
        _check_inbound(blob)
        _check_outbound(blob)
