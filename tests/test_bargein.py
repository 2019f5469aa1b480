"""Barge-in: voice activity on the caller's side stops interruptible speech."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from callspeak.audio.mulaw import MULAW_SILENCE, decode, encode
from callspeak.bargein import SpeechOnsetDetector
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
def caller_voice(piper: PiperService) -> bytes:
    """A caller saying something, as μ-law: real speech for the detector to find."""
    return piper.render_sentence("Sorry but I have a question about that.")


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
