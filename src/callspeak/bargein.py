"""Barge-in: noticing that the caller started talking (pure, no I/O).

:class:`SpeechOnsetDetector` takes the caller's inbound μ-law audio, in payloads of any size, and
reports the frame at which caller speech *starts*: ``min_speech_ms`` of voiced 20 ms frames within
a window two frames longer, as judged by WebRTC's voice activity detector (``webrtcvad-wheels``)
at the configured aggressiveness (0 = least, 3 = most eager to call audio non-speech). After an
onset it stays quiet until ``min_silence_ms`` of non-speech has passed, so one utterance of the
caller is one onset.

Why several frames: a cough or a click is one or two voiced frames; a word is several (the window
lets an unvoiced consonant inside a word, a dip of a frame or two, not restart the count). A frame
counts as voiced only if the VAD says so *and* it is louder than a floor (``min_rms``, about
-50 dBFS): WebRTC's VAD keeps saying "speech" for ~80 ms after any loud sound (its hangover), and
those silent frames must not add up to an onset. The reaction time is ``min_speech_ms`` plus up to
one frame; with the default 100 ms a ``clear`` leaves well inside the 250 ms budget.

Two kinds of sound the VAD calls speech are not counted:

* **Steady noise** (a loud line, hum, a car): a frame must also be :data:`NOISE_MARGIN` louder
  than the line's noise floor, followed per frame — down quickly (half its energy a frame, so a
  pause between words brings it back to the noise under the speech), up slowly (2 % a frame, so
  speech does not raise it within a word, and noise that starts mid-call is under it within
  seconds: 20 dB in about 5 s). It starts at the first frame's loudness: a line noisy from the
  start is not an onset, and noise that starts later is at most one, after which the detector
  is ready again.
  Without it, noise the VAD took for speech was one endless stretch of speech: no barge-in for
  the rest of the call.
* **Key tones** (DTMF, when the carrier leaves them in the audio): a frame whose energy is mostly
  one low-group and one high-group DTMF frequency. Keys are the ``dtmf`` events'
  (``interrupt_digits``), not barge-in.
"""

from __future__ import annotations

import functools
from collections import deque

import numpy as np
import webrtcvad

from callspeak.audio.format import FRAME_BYTES
from callspeak.audio.framing import Framer
from callspeak.audio.mulaw import decode

__all__ = ["NOISE_MARGIN", "SpeechOnsetDetector", "is_dtmf_tone"]

_FRAME_MS = 20
_RATE = 8000
#: How much louder than the noise floor (in energy: 6 dB) a frame must be to count as speech.
NOISE_MARGIN = 4.0
#: The floor rises at most this factor a frame (2 %: about 4 dB a second) ...
_FLOOR_RISE = 1.02
#: ... and falls at most this one (3 dB a frame).
_FLOOR_FALL = 0.5
#: DTMF's frequencies (Hz): one of each group sounds while a key is held.
_DTMF_LOW = (697.0, 770.0, 852.0, 941.0)
_DTMF_HIGH = (1209.0, 1336.0, 1477.0, 1633.0)
#: A frame whose strongest low and high DTMF frequencies hold this share of its energy is a tone
#: (a key's frames hold 0.81 or more, 1.5 % off pitch through μ-law; speech rarely 0.7) ...
_DTMF_SHARE = 0.75
#: ... with the two tones' levels within DTMF's "twist" as receivers accept it (the high tone up
#: to 8 dB louder than the low one, or 4 dB quieter), plus 1.5 dB: a key 1.5 % off pitch loses
#: that much of a tone in one 20 ms frame. Speech taken for a key is nearly always a strong
#: harmonic near 700 Hz with a high-group one 5 to 8 dB under it.
_FORWARD_TWIST = 10 ** (9.5 / 10)
_REVERSE_TWIST = 10 ** (5.5 / 10)


@functools.lru_cache(maxsize=1)
def _dtmf_basis() -> tuple[np.ndarray, np.ndarray]:
    """A Hann-windowed DFT at the eight DTMF frequencies over one frame (cos and sin rows), and
    its scale: |X|² of a windowed sine at one of them is its share of the frame's energy."""
    n = np.arange(FRAME_BYTES)
    window = np.hanning(FRAME_BYTES)
    freqs = np.array(_DTMF_LOW + _DTMF_HIGH)[:, None]
    phase = 2 * np.pi * freqs * n / _RATE
    basis = np.concatenate([np.cos(phase) * window, np.sin(phase) * window])
    # A sine of amplitude A: its windowed DFT at its frequency is A·Σw/2, its energy in the frame
    # A²·N/2, so the energy is |X|²·2N/(Σw)².
    scale = np.full(1, 2.0 * FRAME_BYTES / window.sum() ** 2)
    return basis, scale


def is_dtmf_tone(samples: np.ndarray) -> bool:
    """True when one 20 ms frame of 8 kHz samples is mostly a DTMF key's two tones."""
    basis, scale = _dtmf_basis()
    x = samples.astype(np.float64)
    energy = float(np.dot(x, x))
    if energy <= 0.0:
        return False
    parts = basis @ x
    power = (parts[:8] ** 2 + parts[8:] ** 2) * scale[0]
    low, high = float(power[:4].max()), float(power[4:].max())
    return (
        low + high >= _DTMF_SHARE * energy
        and high <= _FORWARD_TWIST * low
        and low <= _REVERSE_TWIST * high
    )


@functools.lru_cache(maxsize=8)
def _quiet_codes(min_rms: float) -> bytes:
    """The μ-law codes of samples quieter than ``min_rms``. A frame made only of them has an RMS
    under the floor too, so it is judged without decoding (most inbound frames are such silence,
    ~50 a second per call: this cuts them from ~25 µs to ~3 µs). Cached: every call asks."""
    codes = np.arange(256, dtype=np.uint8)
    return codes[np.abs(decode(codes).astype(np.float64)) < min_rms].tobytes()


class SpeechOnsetDetector:
    def __init__(
        self,
        *,
        aggressiveness: int = 2,
        min_speech_ms: int = 100,
        min_silence_ms: int = 300,
        min_rms: float = 100.0,
    ) -> None:
        if not 0 <= aggressiveness <= 3:
            raise ValueError(f"aggressiveness is 0..3, not {aggressiveness}")
        if min_speech_ms < _FRAME_MS:
            raise ValueError(f"min_speech_ms must be at least {_FRAME_MS}")
        self._vad = webrtcvad.Vad(aggressiveness)
        self._min_square = min_rms * min_rms
        self._quiet_codes = _quiet_codes(min_rms)
        self._framer = Framer(FRAME_BYTES)
        self._need_voiced = -(-min_speech_ms // _FRAME_MS)
        self._need_silent = max(1, -(-min_silence_ms // _FRAME_MS))
        self._window: deque[bool] = deque(maxlen=self._need_voiced + 2)
        self._silent = 0
        self._in_speech = False
        self._min_energy = float(min_rms * min_rms)
        #: Mean square of the line's noise, per sample (None until the first frame).
        self._floor: float | None = None
        self.frames_seen = 0

    @property
    def in_speech(self) -> bool:
        """True between an onset and the silence that ends that stretch of speech."""
        return self._in_speech

    def feed(self, mulaw: bytes) -> bool:
        """Take inbound audio; True if caller speech started within it."""
        onset = False
        for frame in self._framer.push(mulaw):
            onset = self._frame(frame) or onset
        return onset

    def _frame(self, frame: bytes) -> bool:
        self.frames_seen += 1
        if frame.translate(None, self._quiet_codes):  # some sample at or over the floor
            samples = decode(np.frombuffer(frame, np.uint8))
            energy = float(np.mean(samples.astype(np.float64) ** 2))
            floor = self._follow_floor(energy)
            # (A frame of speech looks like a key about once in a few thousand: one unvoiced
            # frame among the speech around it changes no onset. Counting a key's first frame,
            # to spare that one, made fast key sequences add up to onsets.)
            voiced = (
                energy >= self._min_square
                and energy >= NOISE_MARGIN * floor
                and bool(self._vad.is_speech(samples.tobytes(), _RATE))
                and not is_dtmf_tone(samples)
            )
        else:
            if self._floor != self._min_energy:  # (a quiet line's floor rests there: no call)
                self._follow_floor(0.0)
            voiced = False
        self._window.append(voiced)
        self._silent = 0 if voiced else self._silent + 1
        if self._in_speech:
            if self._silent >= self._need_silent:
                self._in_speech = False
                self._window.clear()
            return False
        if sum(self._window) >= self._need_voiced:
            self._in_speech = True
            return True
        return False

    def _follow_floor(self, energy: float) -> float:
        """The noise floor before this frame (what the frame is judged against), then moved
        towards ``energy``, within the rise and fall allowed a frame."""
        floor = self._floor
        if floor is None:
            floor = max(energy, self._min_energy)
        low = max(self._min_energy, floor * _FLOOR_FALL)
        self._floor = min(max(energy, low), floor * _FLOOR_RISE)
        return floor
