"""A Twilio stand-in: place a call against a callspeak server and keep what the caller heard.

It behaves as Twilio's bidirectional Media Streams do (see ``shared/reference``): ``connected``,
``start`` with custom parameters, inbound ``media`` every 20 ms, optional ``dtmf``, ``stop``; it
plays the server's audio on a real-time clock, echoes each ``mark`` only once the audio queued
before it has played (at once when nothing is queued), and on ``clear`` drops queued audio and
echoes the pending marks. It is strict like Twilio about what the server sends (a bad message is
a 31951 warning in the report).
"""

from callspeak.emulator.caller import DialOptions, EmulatedCall, dial
from callspeak.emulator.playback import PlaybackBuffer
from callspeak.emulator.report import CallReport, Gap, MarkRecord

__all__ = [
    "CallReport",
    "DialOptions",
    "EmulatedCall",
    "Gap",
    "MarkRecord",
    "PlaybackBuffer",
    "dial",
]
