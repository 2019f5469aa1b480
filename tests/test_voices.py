"""Choosing the voice engines from the settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from callspeak.config import Settings
from callspeak.tts.deepgram_rest import DeepgramRestService
from callspeak.tts.deepgram_ws import STREAM_MIN_CHARS, DeepgramWebSocketService
from callspeak.tts.fallback import FallbackService
from callspeak.tts.piper import bundled_voice_paths
from callspeak.voices import VoiceSetupError, make_engine, make_tts_service


def settings(**overrides: object) -> Settings:
    return Settings(validate_signatures=False, **overrides)  # type: ignore[arg-type]


def test_deepgram_rest_is_configured_from_the_settings() -> None:
    s = settings(
        deepgram_api_key="k",
        deepgram_model="aura-asteria-en",
        deepgram_url="https://api.eu.deepgram.com/",
        max_calls=350,
        deepgram_first_byte_timeout=2.5,
        deepgram_stall_timeout=1.5,
    )
    engine = make_engine(s, "deepgram")
    assert isinstance(engine, DeepgramRestService)
    assert (engine.model, engine.base_url) == ("aura-asteria-en", "https://api.eu.deepgram.com")
    assert (engine.first_byte_timeout, engine.stall_timeout) == (2.5, 1.5)
    # one socket per call: 350 calls never queue for a pooled connection
    assert engine.max_connections == 350


def test_deepgram_ws_and_missing_key() -> None:
    engine = make_engine(settings(deepgram_api_key="k"), "deepgram-ws")
    assert isinstance(engine, DeepgramWebSocketService)
    # it asks for texts long enough that continuous speech stays under 20 flushes a minute
    assert engine.open().stream_min_chars == STREAM_MIN_CHARS == 48
    chain = make_tts_service(settings(deepgram_api_key="k", tts="deepgram-ws"))
    assert getattr(chain.open(), "stream_min_chars", 0) == STREAM_MIN_CHARS  # piper after it: 0
    rest = make_tts_service(settings(deepgram_api_key="k", tts="deepgram"))
    assert getattr(rest.open(), "stream_min_chars", 0) == 0
    # the defaults: first byte, mid-stream silence, one connect attempt
    assert (engine.receive_timeout, engine.stall_timeout, engine.connect_timeout) == (2.0, 1.5, 2.5)
    tuned = settings(deepgram_api_key="k", deepgram_connect_timeout=4.0, deepgram_stall_timeout=0.5)
    engine = make_engine(tuned, "deepgram-ws")
    assert isinstance(engine, DeepgramWebSocketService)
    assert (engine.connect_timeout, engine.stall_timeout) == (4.0, 0.5)
    with pytest.raises(VoiceSetupError, match="DEEPGRAM_API_KEY"):
        make_engine(settings(), "deepgram")


def test_fallback_chain_skips_voices_it_cannot_build(caplog: pytest.LogCaptureFixture) -> None:
    service = make_tts_service(settings(tts="piper", fallback="deepgram"))
    assert isinstance(service, FallbackService) and service.name == "piper"
    assert "fallback voice deepgram skipped" in caplog.text
    assert service.missing == ["deepgram"] and not service.healthy  # /healthz: degraded
    chained = make_tts_service(settings(tts="piper", fallback="deepgram", deepgram_api_key="k"))
    assert chained.name == "piper > deepgram"
    assert isinstance(chained, FallbackService) and chained.missing == []


def test_a_piper_model_without_its_config_beside_it_is_refused(tmp_path: Path) -> None:
    """Only the .onnx was checked: a copy without its .onnx.json failed in the server's start-up
    with a 25-line traceback."""
    model = tmp_path / "joe.onnx"
    shutil.copy(bundled_voice_paths()[0], model)
    with pytest.raises(VoiceSetupError) as refused:
        make_engine(settings(piper_model=str(model)), "piper")
    message = str(refused.value)
    assert f"piper_model {str(model)!r} has no 'joe.onnx.json' beside it" in message
    assert "--piper-model / CALLSPEAK_PIPER_MODEL" in message
    shutil.copy(bundled_voice_paths()[1], f"{model}.json")
    assert make_engine(settings(piper_model=str(model)), "piper").name == "piper"


def test_piper_without_the_local_extra_is_refused_when_chosen_and_skipped_as_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the extra the voice failed in the server's start-up, with a traceback."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "piper" else real_find_spec(name, *a),
    )
    with pytest.raises(VoiceSetupError, match=r"needs the 'local' extra.*--tts / CALLSPEAK_TTS"):
        make_engine(settings(), "piper")
    service = make_tts_service(settings(tts="deepgram", deepgram_api_key="k"))
    assert service.name == "deepgram" and "fallback voice piper skipped" in caplog.text
