"""Choosing the voice engine from the settings."""

from __future__ import annotations

from pathlib import Path

from callspeak.config import Settings
from callspeak.tts.base import TTSService

__all__ = ["make_tts_service"]


def make_tts_service(settings: Settings) -> TTSService:
    """The engine ``settings.tts`` names (``auto``: Deepgram when a key is set, else Piper)."""
    choice = settings.resolved_tts()
    if choice == "piper":
        from callspeak.tts.piper import PiperService

        model = Path(settings.piper_model) if settings.piper_model else None
        return PiperService(model, workers=settings.synth_workers or None)
    raise NotImplementedError(f"voice engine {choice!r} is not available yet")
