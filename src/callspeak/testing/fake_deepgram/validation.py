"""Request checks shared by the REST and WebSocket endpoints, with Deepgram's error codes.

Contract: each check returns what it validated or raises :class:`Reject`, which carries the HTTP
status and the ``err_code``/``err_msg`` of Deepgram's documented error body.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["MAX_CHARS", "Reject", "audio_params", "check_auth_and_model"]

#: Characters allowed in one REST request or one WebSocket ``Speak``.
MAX_CHARS = 2000
#: ``aura-<voice>-en`` (Aura: English only) and ``aura-2-<voice>-<language>`` in Aura-2's seven
#: languages (https://developers.deepgram.com/docs/tts-models).
_MODEL = re.compile(r"^(?:aura-[a-z]+-en|aura-2-[a-z]+-(?:en|es|de|fr|nl|it|ja))$")
_RATES = {
    "mulaw": (8000, 16000),
    "alaw": (8000, 16000),
    "linear16": (8000, 16000, 24000, 32000, 48000),
}
_DEFAULT_RATE = {"mulaw": 8000, "alaw": 8000, "linear16": 24000}


class Reject(Exception):
    """A refused request: ``status``, Deepgram's ``code`` and a human ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def check_auth_and_model(headers: Mapping[str, str], query: Mapping[str, str], api_key: str) -> str:
    """The model name, after checking ``Token KEY``/``Bearer KEY`` auth and the model's shape."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() not in ("token", "bearer") or token.strip() != api_key:
        raise Reject(401, "INVALID_AUTH", "Invalid credentials.")
    model = query.get("model", "aura-asteria-en")
    if not _MODEL.match(model):
        raise Reject(400, "Bad Request", f"No such model/version/tier combination found: {model}")
    return model


def audio_params(query: Mapping[str, str], *, websocket: bool) -> tuple[str, int, str]:
    """``(encoding, sample_rate, container)`` with Deepgram's defaults, or :class:`Reject`."""
    encoding = query.get("encoding", "linear16")
    if encoding not in _RATES:
        raise Reject(400, "INVALID_QUERY_PARAMETER", f"Unsupported encoding: {encoding!r}.")
    raw_rate = query.get("sample_rate", str(_DEFAULT_RATE[encoding]))
    if not raw_rate.isdigit() or int(raw_rate) not in _RATES[encoding]:
        raise Reject(
            400, "INVALID_QUERY_PARAMETER", f"sample_rate {raw_rate} is not valid for {encoding}."
        )
    container = query.get("container", "none" if websocket else "wav")
    if container not in (("none",) if websocket else ("none", "wav")):
        raise Reject(
            400, "INVALID_QUERY_PARAMETER", f"container {container!r} is not valid for {encoding}."
        )
    return encoding, int(raw_rate), container
