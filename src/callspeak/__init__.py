"""callspeak: speak text-to-speech into live phone calls over Twilio Media Streams."""

__version__ = "0.1.0"
