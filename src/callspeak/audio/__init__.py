"""The pure audio path: μ-law, resampling, framing, WAV headers and conversion to Twilio frames.

No I/O and no event loop here (except :func:`write_wav` / :func:`read_wav`); everything is bytes or
numpy arrays in, bytes or arrays out, so it can be tested without a call.
"""

from callspeak.audio.convert import TwilioAudioConverter, convert_all
from callspeak.audio.format import FRAME_BYTES, FRAME_SECONDS, TWILIO_FORMAT, AudioFormat, Encoding
from callspeak.audio.framing import Framer, SampleAligner
from callspeak.audio.mulaw import (
    MULAW_SILENCE,
    decode,
    encode,
    float_to_mulaw,
    mulaw_to_pcm16,
    pcm16_to_mulaw,
)
from callspeak.audio.resample import StreamResampler, resample_once
from callspeak.audio.wav import (
    WavError,
    WavHeaderStripper,
    WavInfo,
    looks_like_wav,
    parse_wav_header,
    read_wav,
    write_wav,
)

__all__ = [
    "FRAME_BYTES",
    "FRAME_SECONDS",
    "MULAW_SILENCE",
    "TWILIO_FORMAT",
    "AudioFormat",
    "Encoding",
    "Framer",
    "SampleAligner",
    "StreamResampler",
    "TwilioAudioConverter",
    "WavError",
    "WavHeaderStripper",
    "WavInfo",
    "convert_all",
    "decode",
    "encode",
    "float_to_mulaw",
    "looks_like_wav",
    "mulaw_to_pcm16",
    "parse_wav_header",
    "pcm16_to_mulaw",
    "read_wav",
    "resample_once",
    "write_wav",
]
