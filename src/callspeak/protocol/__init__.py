"""The Twilio bidirectional Media Streams wire protocol, as pure functions over strings.

No I/O happens here: text goes in, immutable event objects come out, and encoders turn outbound
messages into the exact JSON text to put in a WebSocket *text* frame. The reference is Twilio's
"Media Streams - WebSocket Messages" page:
https://www.twilio.com/docs/voice/media-streams/websocket-messages

Contracts
---------
* Twilio → server (:func:`parse_message`, liberal in what it accepts):
  :mod:`callspeak.protocol.inbound`, whose docstring lists what is accepted and what is rejected.
* Server → Twilio (:func:`encode_media`, :func:`encode_mark`, :func:`encode_clear`, and
  :func:`parse_outbound`, as strict as Twilio): :mod:`callspeak.protocol.outbound`.
* Both raise nothing but :class:`ProtocolError`; it and the SID types live in the private
  ``_fields`` module with the JSON and field helpers the two directions share.

Import from here: every public name of the package is re-exported below.
"""

from callspeak.protocol._fields import AccountSid, CallSid, ProtocolError, StreamSid
from callspeak.protocol.inbound import (
    DTMF_DIGITS,
    Connected,
    CustomParameters,
    Dtmf,
    InboundMessage,
    Mark,
    Media,
    MediaEncoder,
    MediaFormat,
    Start,
    Stop,
    parse_message,
)
from callspeak.protocol.outbound import (
    Clear,
    OutboundMark,
    OutboundMedia,
    OutboundMessage,
    encode_clear,
    encode_mark,
    encode_media,
    parse_outbound,
)

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
