"""Settings, from environment variables (``CALLSPEAK_*``) and ``callspeak serve`` flags.

Flags win over environment variables, which win over defaults. Credentials keep the names their
vendors use: ``DEEPGRAM_API_KEY``, ``TWILIO_ACCOUNT_SID``, ``TWILIO_AUTH_TOKEN``.

Twilio signature checks fail closed. With ``validate_signatures`` on (the default) a server needs
``TWILIO_AUTH_TOKEN`` *and* ``CALLSPEAK_PUBLIC_URL`` (the URLs Twilio signs are rebuilt from it),
and :meth:`Settings.signature_problem` names what is missing so ``callspeak serve`` and
:func:`callspeak.server.create_app` refuse to start rather than run an open media socket. Local
development turns the check off explicitly (``--no-validate-signatures`` /
``CALLSPEAK_VALIDATE_SIGNATURES=false``); ``callspeak demo``, which only ever talks to its own
emulator on loopback, does so itself, so it keeps working without a Twilio account.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_GREETING", "ConfigError", "Settings", "TTSChoice"]

DEFAULT_GREETING = "Hello, how are you today?"

TTSChoice = Literal["auto", "piper", "deepgram", "deepgram-ws"]


class ConfigError(ValueError):
    """Settings that are each valid but cannot serve together (the message says how to fix it)."""


class Settings(BaseSettings):
    """Everything a callspeak server can be told. See the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="CALLSPEAK_", extra="forbid", populate_by_name=True, frozen=True
    )

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(5000, ge=0, le=65535, description="Port to listen on (0 picks one).")
    public_url: str | None = Field(
        None,
        description="The URL Twilio reaches this server at, e.g. https://example.ngrok.app. "
        "TwiML and signature checks are built from it, never from request headers.",
    )
    greeting: str = Field(DEFAULT_GREETING, description="Spoken when a call starts without 'say'.")
    notice: str | None = Field(None, description="Optional <Say> text played before connecting.")
    tts: TTSChoice = Field(
        "auto",
        description="Voice engine; auto = deepgram when DEEPGRAM_API_KEY is set, else piper.",
    )
    piper_model: str | None = Field(None, description="Path to a Piper .onnx voice (default: joe).")
    synth_workers: int = Field(0, ge=0, description="Synthesis threads; 0 = one per CPU core.")
    deepgram_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("deepgram_api_key", "DEEPGRAM_API_KEY")
    )
    deepgram_model: str = Field("aura-2-thalia-en", description="Deepgram Aura model.")
    deepgram_url: str = Field("https://api.deepgram.com", description="Deepgram REST base URL.")
    deepgram_ws_url: str = Field("wss://api.deepgram.com", description="Deepgram WebSocket base.")
    max_lead_ms: int = Field(
        1000, ge=40, le=60_000, description="How far audio may run ahead of the caller's playback."
    )
    max_message_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest WebSocket message the session handles; bigger ones are logged and "
        "ignored (uvicorn closes the socket, 1009, beyond 16 times this or 1 MiB).",
    )
    twilio_account_sid: str | None = Field(
        None,
        validation_alias=AliasChoices("twilio_account_sid", "TWILIO_ACCOUNT_SID"),
        description="Twilio account SID (AC…), for `callspeak call` and `hangup`.",
    )
    twilio_auth_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("twilio_auth_token", "TWILIO_AUTH_TOKEN"),
        description="Twilio auth token: signs webhooks and stream upgrades; REST password.",
    )
    twilio_api_url: str = Field(
        "https://api.twilio.com", description="Twilio REST base URL (a fake's URL in tests)."
    )
    validate_signatures: bool = Field(
        True,
        description="Refuse requests without a valid X-Twilio-Signature (needs TWILIO_AUTH_TOKEN "
        "and CALLSPEAK_PUBLIC_URL). Turn off only for local development.",
    )
    call_token: bool = Field(
        False,
        description="/voice adds a one-time callspeak_token <Parameter>; a stream whose start "
        "lacks an unused one is closed (1008).",
    )
    max_calls: int = Field(
        100, ge=1, description="Concurrent media streams; more are refused (HTTP 403) at upgrade."
    )
    idle_timeout: float = Field(
        30.0,
        gt=0,
        description="Close a media stream after this many seconds without any inbound message "
        "(Twilio sends media every 20 ms, so silence means a dead peer).",
    )
    max_text_chars: int = Field(
        5000,
        ge=1,
        description="Longest text spoken in one request: 'say' parameter, greeting, notice, "
        "`callspeak call --say`. Longer text is refused, not truncated.",
    )
    certfile: str | None = Field(None, description="TLS certificate (PEM) to serve wss:// itself.")
    keyfile: str | None = Field(None, description="TLS private key (PEM) for certfile.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("public_url must start with https:// (or http:// for local tests)")
        if "?" in value or "#" in value:
            raise ValueError("public_url must not carry a query string or fragment")
        return value.rstrip("/")

    @field_validator("deepgram_url", "deepgram_ws_url", "twilio_api_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError(
                "certfile and keyfile go together: give both (to serve wss://) or neither"
            )
        for name in ("greeting", "notice"):
            text = getattr(self, name)
            if text is not None and len(text) > self.max_text_chars:
                raise ValueError(
                    f"{name} is {len(text)} characters, over max_text_chars={self.max_text_chars}"
                )
        return self

    def signature_problem(self) -> str | None:
        """Why a server with these settings must not start, or None when it may.

        Signature checking is on by default and fails closed: it needs the auth token (the HMAC
        key) and the public URL (the URLs Twilio signs; request headers are never trusted to
        rebuild them). Off is an explicit choice for local development.
        """
        if not self.validate_signatures:
            return None
        if self.twilio_auth_token is None or not self.twilio_auth_token.get_secret_value():
            return (
                "Twilio signature validation is on but no auth token is set: set "
                "TWILIO_AUTH_TOKEN, or pass --no-validate-signatures "
                "(CALLSPEAK_VALIDATE_SIGNATURES=false) for local development"
            )
        if self.public_url is None:
            return (
                "Twilio signature validation needs the URL Twilio calls: set CALLSPEAK_PUBLIC_URL "
                "(or --public-url), e.g. https://example.ngrok.app"
            )
        return None

    def resolved_tts(self) -> Literal["piper", "deepgram", "deepgram-ws"]:
        """The engine ``auto`` stands for, given the credentials present."""
        if self.tts != "auto":
            return self.tts
        return "deepgram" if self.deepgram_api_key else "piper"
