"""Barge-in: voice activity on the caller's side stops interruptible speech."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from callspeak.audio.mulaw import MULAW_SILENCE, decode, encode
from callspeak.bargein import SpeechOnsetDetector, is_dtmf_tone
from callspeak.config import Settings
from callspeak.emulator import DialOptions, dial
from callspeak.events import CallEventRecord
from callspeak.server import create_app
from callspeak.tts.piper import PiperService
from callspeak.tts.sentences import split_sentences
from tests.conftest import serve_app

SILENCE = bytes([MULAW_SILENCE]) * 160
# Short sentences: with up to a second of audio sent ahead, some sentence's mark is always
# pending when the caller speaks, so the clear always has stale marks to flush.
STORY = "One. Two. Three. Four. Five. Six. Seven. Eight. Nine. Ten. Eleven. Twelve."


@pytest.fixture(scope="module")
def caller_voice() -> bytes:
    """A caller saying "Sorry but I have a question about that.", as μ-law: real speech for the
    detector to find, rendered once by the offline voice and kept. Kept rather than rendered
    per run: Piper's renders differ run to run (its model draws noise), and over -20 dBFS hum
    the detector missed 2 of 30 of them, which made a test of the detector a lottery."""
    return (Path(__file__).parent / "data" / "caller_voice.ulaw").read_bytes()


def speech_onset(mulaw: bytes, threshold: float = 300.0) -> float:
    """Seconds into ``mulaw`` where the first 20 ms frame louder than ``threshold`` starts."""
    frames = decode(np.frombuffer(mulaw[: len(mulaw) // 160 * 160], np.uint8)).reshape(-1, 160)
    loud = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) > threshold
    return float(np.argmax(loud)) * 0.02


def test_detector_finds_speech_once_and_ignores_silence_and_clicks(caller_voice: bytes) -> None:
    detector = SpeechOnsetDetector(min_speech_ms=100)
    assert not any(detector.feed(SILENCE) for _ in range(50))
    click = bytes([0x00] * 40) + bytes([MULAW_SILENCE]) * 120
    assert not any(detector.feed(click + SILENCE * 10) for _ in range(5))
    assert not detector.feed(bytes([0x00]) * 160 * 2 + SILENCE * 10)  # 40 ms of loud noise
    onsets, in_speech = [], []
    for i in range(0, len(caller_voice), 333):
        onsets.append(detector.feed(caller_voice[i : i + 333]))
        in_speech.append(detector.in_speech)
    # One onset per stretch of speech, whatever the payload size (a long pause may start a second).
    assert 1 <= sum(onsets) <= 2
    onset_at = onsets.index(True) * 333 / 8000
    assert onset_at - speech_onset(caller_voice) <= 0.25
    # (Read at the onset: the voice's trailing silence varies from one rendering to the next.)
    assert in_speech[onsets.index(True)]
    for _ in range(20):
        detector.feed(SILENCE)
    assert not detector.in_speech


def test_loudness_floor_applies_to_whole_frames(caller_voice: bytes) -> None:
    """Speech whose every sample is under the floor never starts an onset (those frames skip the
    decoder); a frame with some samples over it is judged on its RMS, as before."""
    pcm = decode(np.frombuffer(caller_voice, np.uint8)).astype(np.float64)
    whisper = encode(np.round(pcm * (95.0 / np.abs(pcm).max())).astype(np.int16)).tobytes()
    assert np.abs(decode(np.frombuffer(whisper, np.uint8))).max() < 100
    assert not any(SpeechOnsetDetector(min_rms=100.0).feed(whisper) for _ in range(3))
    # Peaks over the floor but an RMS under it: decoded, and still not speech.
    sparse = (bytes([0x00]) + bytes([MULAW_SILENCE]) * 39) * 4 * 100
    assert not SpeechOnsetDetector(min_rms=8000.0).feed(sparse)
    # The same voice at its own level, and with the floor at zero, is found.
    assert SpeechOnsetDetector(min_rms=100.0).feed(caller_voice)
    assert SpeechOnsetDetector(min_rms=0.0).feed(caller_voice)


def test_detector_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        SpeechOnsetDetector(aggressiveness=4)
    with pytest.raises(ValueError):
        SpeechOnsetDetector(min_speech_ms=10)


async def test_caller_speaking_mid_sentence_gets_clear_fast_and_hears_no_more(
    piper: PiperService, caller_voice: bytes
) -> None:
    app = create_app(Settings(validate_signatures=False, greeting=STORY), tts=piper)
    events: list[CallEventRecord] = []
    async with serve_app(app) as url:
        state = app.state.callspeak

        async def watch() -> None:
            session = await state.calls.wait_for()
            session.add_listener(events.append)

        watcher = asyncio.create_task(watch())
        speak_at = 2.0  # inside the second sentence
        report = await dial(
            DialOptions(
                url=url.replace("http", "ws") + "/twilio",
                caller_audio=caller_voice,
                caller_audio_at=speak_at,
                quiet_seconds=1.5,
            )
        )
        await watcher
    onset = speak_at + speech_onset(caller_voice)
    timeline = report.timeline() + "\n" + "\n".join(f"{e.type} {dict(e.data)}" for e in events)
    assert len(report.clears) == 1, timeline
    latency = report.clears[0] - onset
    assert 0 < latency <= 0.25, f"clear {latency * 1000:.0f} ms after speech onset\n{timeline}"
    clear_tick = int(report.clears[0] / 0.02) + 1
    assert sum(report.played_per_tick[clear_tick:]) == 0  # nothing more of that speech
    sentences = split_sentences(STORY)
    heard = [e.data["text"] for e in events if e.type == "speech.heard"]
    (interrupted,) = [e for e in events if e.type == "speech.interrupted"]
    data = interrupted.data
    assert data["reason"] == "barge-in"
    k = len(heard)
    assert k >= 1 and heard == sentences[:k] == data["heard"], timeline
    if data["cut"] is None:  # the caller spoke right at a sentence boundary
        assert data["unheard"] == sentences[k:]
    else:
        assert data["cut"] == sentences[k] and 0 < data["cutSeconds"] < 3.0, timeline
        assert data["unheard"] == sentences[k + 1 :]
    # Marks pending at the clear came back flushed and never counted as heard.
    flushed = [m.name for m in report.marks if m.flushed]
    assert flushed, timeline
    assert all(int(name.rsplit(".s", 1)[1]) >= k for name in flushed)
    types = [e.type for e in events]
    assert types.index("caller.speaking") < types.index("speech.interrupted")
    assert "speech.done" not in types


# -- line noise and key tones, which WebRTC's VAD takes for speech ------------------------------

RATE = 8000
rng = np.random.default_rng(7)


def as_mulaw(samples: np.ndarray) -> bytes:
    return encode(np.clip(np.rint(samples), -32768, 32767).astype(np.int16)).tobytes()


def dbfs(level: float) -> float:
    return 32768 * 10 ** (level / 20)


def onsets_in(mulaw: bytes) -> tuple[list[float], SpeechOnsetDetector]:
    """Seconds (to the frame) at which a detector fed ``mulaw`` 20 ms at a time found onsets."""
    detector = SpeechOnsetDetector()
    found = [i / RATE for i in range(0, len(mulaw), 160) if detector.feed(mulaw[i : i + 160])]
    return found, detector


def hum(seconds: float, level: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    wave = np.sin(2 * np.pi * 60 * t) + 0.5 * np.sin(2 * np.pi * 180 * t)
    return dbfs(level) * wave / np.sqrt(np.mean(wave**2))


def white(seconds: float, level: float) -> np.ndarray:
    return rng.normal(0, dbfs(level), round(seconds * RATE))


@pytest.mark.parametrize("noise", ["white -30 dBFS", "hum -20 dBFS"])
def test_steady_line_noise_is_no_speech_and_speech_over_it_is(
    noise: str, caller_voice: bytes
) -> None:
    """The VAD took these for speech: one onset as the call began, then — the noise going on —
    one endless stretch of speech, and no barge-in for the rest of the call."""
    make = white if noise.startswith("white") else hum
    level = float(noise.split()[1])
    voice = decode(np.frombuffer(caller_voice, np.uint8)).astype(np.float64)
    line = make(3.0 + len(voice) / RATE, level)
    found, detector = onsets_in(as_mulaw(line[: 3 * RATE]))
    assert found == [] and not detector.in_speech
    line[3 * RATE :] += voice
    found, _ = onsets_in(as_mulaw(line))
    assert found, "speech over the noise was not found"
    assert 3.0 <= found[0] <= 3.0 + speech_onset(caller_voice) + 0.25


def test_noise_starting_mid_call_is_at_most_one_onset_then_speech_is_heard(
    caller_voice: bytes,
) -> None:
    voice = decode(np.frombuffer(caller_voice, np.uint8)).astype(np.float64)
    quiet = np.zeros(RATE)  # a second of a silent line, then loud noise for 8 s
    line = np.concatenate([quiet, white(8.0 + len(voice) / RATE, -30)])
    start = len(quiet) + 8 * RATE
    line[start:] += voice
    found, _ = onsets_in(as_mulaw(line))
    during_noise = [t for t in found if t < start / RATE]
    assert len(during_noise) <= 1
    assert any(start / RATE <= t <= start / RATE + speech_onset(caller_voice) + 0.25 for t in found)


def key(digit_freqs: tuple[float, float], seconds: float, off_pitch: float = 0.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    low, high = (f * (1 + off_pitch) for f in digit_freqs)
    return dbfs(-10) * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t)) / 2


KEYS = [(low, high) for low in (697, 770, 852, 941) for high in (1209, 1336, 1477, 1633)]


@pytest.mark.parametrize("off_pitch", [0.0, 0.015, -0.015])
def test_every_key_tone_is_known_for_one(off_pitch: float) -> None:
    """16 keys, 1.5 % off pitch either way (what DTMF receivers must accept), through μ-law."""
    for freqs in KEYS:
        tone = decode(np.frombuffer(as_mulaw(key(freqs, 0.02, off_pitch)), np.uint8))
        assert is_dtmf_tone(tone), freqs


def test_key_tones_within_dtmf_twist_are_keys() -> None:
    """Receivers accept the high tone up to 8 dB louder than the low one, or 4 dB quieter, a
    key up to 1.5 % off pitch (which costs a tone up to 1.4 dB in a 20 ms frame). Speech
    taken for a key was nearly always a strong harmonic near 700 Hz with a weaker one in the
    high group, 5 to 8 dB under it."""
    t = np.arange(160) / RATE

    def pair(high_db: float, off_pitch: float = 0.0) -> np.ndarray:
        low = np.sin(2 * np.pi * 770 * t)
        high = 10 ** (high_db / 20) * np.sin(2 * np.pi * 1336 * (1 + off_pitch) * t + 1.0)
        return decode(np.frombuffer(as_mulaw(4000 * (low + high)), np.uint8))

    for off_pitch in (0.0, 0.015, -0.015):
        assert all(is_dtmf_tone(pair(db, off_pitch)) for db in (-4.0, -3.0, 0.0, 4.0, 7.0))
    assert is_dtmf_tone(pair(8.0))
    assert not any(is_dtmf_tone(pair(db)) for db in (-7.0, -10.0, 12.0))


def test_speech_frames_are_seldom_taken_for_key_tones(caller_voice: bytes) -> None:
    """About one speech frame in a few thousand looks like a key: none of those ever gave
    an onset, which needs 5 voiced frames of 7 (the onset is checked with the others)."""
    voice = decode(np.frombuffer(caller_voice[: len(caller_voice) // 160 * 160], np.uint8))
    frames = [f for f in voice.reshape(-1, 160) if np.sqrt(np.mean(f.astype(float) ** 2)) > 300]
    assert len(frames) > 40
    assert sum(is_dtmf_tone(frame) for frame in frames) <= 2
    assert not is_dtmf_tone(np.zeros(160)) and not is_dtmf_tone(white(0.02, -20))


def test_keys_pressed_into_the_audio_are_no_barge_in() -> None:
    """A carrier may leave the tones in the audio: keys are the dtmf events' to act on
    (CALLSPEAK_INTERRUPT_DIGITS), not barge-in. A press of 120 ms or more was an onset."""
    gap = np.zeros(int(0.1 * RATE))
    for seconds in (0.12, 0.25, 0.5):
        found, _ = onsets_in(as_mulaw(np.concatenate([gap, key(KEYS[5], seconds), gap])))
        assert found == [], seconds
    presses = np.concatenate([np.concatenate([key(KEYS[k], 0.1), gap]) for k in (0, 5, 10, 10)])
    assert onsets_in(as_mulaw(presses))[0] == []


@pytest.mark.parametrize("on_off_ms", [40, 50, 60, 100])
def test_fast_key_sequences_are_no_barge_in(on_off_ms: int) -> None:
    """Ten keys as an auto-dialler sends them (40 ms on, 40 ms off and up), at any alignment
    with the 20 ms frames and at two levels: a key's frames never add up to an onset."""
    seconds = on_off_ms / 1000
    gap = np.zeros(round(seconds * RATE))
    for lead_ms in range(0, 20, 3):
        for level in (-10.0, -25.0):
            digits = [KEYS[k] for k in rng.integers(0, 16, 10)]
            presses = [
                np.concatenate([key(d, seconds) * 10 ** ((level + 10) / 20), gap]) for d in digits
            ]
            line = np.concatenate([np.zeros(round((0.1 + lead_ms / 1000) * RATE)), *presses])
            assert onsets_in(as_mulaw(line))[0] == [], (lead_ms, level)


def vowel(seconds: float) -> np.ndarray:
    """A sung vowel (harmonics of a wavering 140 Hz): voiced in every frame, for WebRTC's VAD."""
    t = np.arange(round(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(140 + 10 * np.sin(2 * np.pi * 3 * t)) / RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 25))
    return dbfs(-15) * wave / np.sqrt(np.mean(wave**2))


def test_speech_after_a_pause_needs_min_speech_ms_again() -> None:
    """When a stretch of speech ends, the frames counted for it are forgotten: the caller's next
    words are an onset only after ``min_speech_ms`` of them, not at their first frame because
    the last stretch's frames were still in the window."""
    detector = SpeechOnsetDetector(min_speech_ms=400, min_silence_ms=40)
    first = as_mulaw(np.concatenate([np.zeros(RATE // 5), vowel(0.6), np.zeros(160 * 2)]))
    found = [i for i in range(0, len(first), 160) if detector.feed(first[i : i + 160])]
    assert len(found) == 1 and not detector.in_speech
    again = as_mulaw(vowel(0.6))
    found = [i / RATE for i in range(0, len(again), 160) if detector.feed(again[i : i + 160])]
    assert found == [pytest.approx(0.38)]  # the 20th voiced frame: 400 ms of the new speech
