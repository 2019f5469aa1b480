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

import difflib
from collections.abc import Mapping
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from callspeak.base_urls import checked_base_url
from callspeak.twiml import say_problem, xml_text_problem

__all__ = [
    "DEFAULT_GREETING",
    "OTHER_CALLSPEAK_VARIABLES",
    "ConfigError",
    "Settings",
    "TTSChoice",
    "unknown_variables",
]

DEFAULT_GREETING = "Hello, how are you today?"

TTSChoice = Literal["auto", "piper", "deepgram", "deepgram-ws"]


class ConfigError(ValueError):
    """Settings that are each valid but cannot serve together (the message says how to fix it)."""


class Settings(BaseSettings):
    """Everything a callspeak server can be told. See the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="CALLSPEAK_",
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        # "inf" and "nan" parse as floats: an infinite idle timeout never closed a stream, and
        # an infinite cache size was an OverflowError traceback when the voice was built.
        allow_inf_nan=False,
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
    piper_cache_mb: float = Field(
        8.0,
        ge=0,
        le=1024 * 1024,  # a TiB: beyond ~1e302 the size in bytes overflowed to inf
        description="Memory for rendered sentences of the offline voice (0 = no cache).",
    )
    deepgram_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("deepgram_api_key", "DEEPGRAM_API_KEY")
    )
    deepgram_model: str = Field("aura-2-thalia-en", description="Deepgram Aura model.")
    deepgram_url: str = Field("https://api.deepgram.com", description="Deepgram REST base URL.")
    deepgram_ws_url: str = Field("wss://api.deepgram.com", description="Deepgram WebSocket base.")
    deepgram_first_byte_timeout: float = Field(
        2.0, gt=0, description="Seconds to wait for Deepgram's first audio byte."
    )
    deepgram_stall_timeout: float = Field(
        1.5, gt=0, description="Seconds Deepgram may go silent mid-stream before we give up."
    )
    deepgram_connect_timeout: float = Field(
        2.5,
        gt=0,
        description="Seconds for one attempt to open the WebSocket voice's socket (TCP, TLS, "
        "upgrade); a text waits twice that at most before the fallback voice speaks.",
    )
    deepgram_auth_recheck: float = Field(
        60.0,
        gt=0,
        description="Seconds after Deepgram refuses the key (401/403) before a call tries it "
        "again; meanwhile calls skip to the fallback voice and /healthz says degraded.",
    )
    deepgram_max_concurrent: int = Field(
        15,
        ge=0,
        description="Requests to Deepgram in progress at once at most, per voice (REST requests; "
        "WebSocket sockets open), as the project's concurrency limit allows: 15 on Deepgram's "
        "Pay as You Go and Growth plans. Past it, REST speech waits for a request to end (a "
        "second, or while the call still has audio to play) and a call finding every socket "
        "taken uses the next voice, rather than Deepgram answering 429. 0 = no limit.",
    )
    fallback: str = Field(
        "piper",
        description="Comma-separated voices to fall back to, in order, when the chosen one "
        "fails ('none' for none); the pre-rendered apology always comes last.",
    )
    max_lead_ms: int = Field(
        1000, ge=40, le=60_000, description="How far audio may run ahead of the caller's playback."
    )
    barge_in: bool = Field(True, description="Stop interruptible speech when the caller talks.")
    vad_aggressiveness: int = Field(
        2, ge=0, le=3, description="WebRTC VAD aggressiveness, 0 (lenient) to 3 (strict)."
    )
    min_speech_ms: int = Field(
        100, ge=20, le=2000, description="Caller speech needed before it counts as barge-in."
    )
    interrupt_digits: str = Field(
        "", description="DTMF digits that stop interruptible speech, e.g. '#' or '0123456789*#'."
    )
    max_message_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest WebSocket message the session handles; bigger ones are logged and "
        "ignored (uvicorn closes the socket, 1009, beyond 16 times this or 1 MiB).",
    )
    api_token: SecretStr | None = Field(
        None,
        description="Bearer token for the control API (/calls); without one the API serves "
        "loopback clients only.",
    )

    twilio_account_sid: str | None = Field(
        None,
        validation_alias=AliasChoices("twilio_account_sid", "TWILIO_ACCOUNT_SID"),
        description="Twilio account SID (AC…), for `callspeak call` and `end-call`.",
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

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        # CALLSPEAK_LOG_LEVEL=INFO (as Python and uvicorn spell levels) was refused.
        return value.lower() if isinstance(value, str) else value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        # https:// only, local tests included: TwiML's <Stream> must be wss:// (built from this
        # URL), and the emulator dials ws:// on loopback while signing wss:// as Twilio does.
        if not value.startswith("https://"):
            raise ValueError(
                "public_url must start with https:// (Twilio only opens wss:// media streams); "
                "for local tests use e.g. https://127.0.0.1:5000, or leave it unset with "
                "--no-validate-signatures"
            )
        return checked_base_url("public_url", value, "https", "e.g. https://example.ngrok.app")

    @field_validator("deepgram_url")
    @classmethod
    def _check_deepgram_url(cls, value: str) -> str:
        # Checked here, not at the first call: "api.deepgram.com" (no scheme) started a server
        # on which every call failed over to the fallback voice.
        return checked_base_url("deepgram_url", value, "http(s)", "e.g. https://api.deepgram.com")

    @field_validator("deepgram_ws_url")
    @classmethod
    def _check_deepgram_ws_url(cls, value: str) -> str:
        # An http:// URL here was a websockets InvalidURI traceback at start-up.
        return checked_base_url("deepgram_ws_url", value, "ws(s)", "e.g. wss://api.deepgram.com")

    @field_validator("twilio_api_url")
    @classmethod
    def _check_twilio_api_url(cls, value: str) -> str:
        # At least TwilioCredentials' rule for api_base_url, checked here so `callspeak call` and
        # `end-call` refuse a bad CALLSPEAK_TWILIO_API_URL as a setting, before any request.
        return checked_base_url("twilio_api_url", value, "http(s)", "e.g. https://api.twilio.com")

    @field_validator("interrupt_digits")
    @classmethod
    def _check_digits(cls, value: str) -> str:
        bad = sorted(set(value) - set("0123456789*#ABCD"))
        if bad:
            raise ValueError(f"interrupt_digits may hold 0-9 * # A-D only, not {bad}")
        return value

    @field_validator("fallback")
    @classmethod
    def _check_fallback(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        if names == ["none"] or not names:
            return "none"
        unknown = [n for n in names if n not in ("piper", "deepgram", "deepgram-ws")]
        if unknown:
            raise ValueError(
                f"unknown fallback voice(s) {unknown}: use piper, deepgram, deepgram-ws"
            )
        return ",".join(names)

    def fallback_chain(self) -> list[Literal["piper", "deepgram", "deepgram-ws"]]:
        """The voices after the chosen one, without repeats or the chosen one itself."""
        if self.fallback == "none":
            return []
        chain: list[Literal["piper", "deepgram", "deepgram-ws"]] = []
        for name in self.fallback.split(","):
            if name != self.resolved_tts() and name not in chain:
                chain.append(name)  # type: ignore[arg-type]
        return chain

    @field_validator("twilio_auth_token", "deepgram_api_key")
    @classmethod
    def _strip_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # A secret read from a file (a Kubernetes or Docker secret) often ends in a newline:
        # kept, every Twilio signature failed to match, and every Deepgram request was refused.
        token = value.get_secret_value().strip() if value is not None else ""
        return SecretStr(token) if token else None

    @field_validator("twilio_account_sid")
    @classmethod
    def _strip_account_sid(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("api_token")
    @classmethod
    def _no_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        # CALLSPEAK_API_TOKEN= (set but empty or blank) must not become a token that matches
        # "Bearer ": it means no token. Surrounding spaces are dropped, as they are from the
        # token a client presents (a header value cannot carry them).
        token = value.get_secret_value().strip() if value is not None else ""
        return SecretStr(token) if token else None

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
        if self.notice is not None and (problem := xml_text_problem(self.notice)) is not None:
            raise ValueError(f"notice (spoken by Twilio's <Say>) {problem}")
        if self.notice is not None and (problem := say_problem(self.notice)) is not None:
            raise ValueError(f"notice {problem}: shorten it, or make it the greeting")
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


#: CALLSPEAK_* variables read outside :class:`Settings`: the control API client's server URL.
OTHER_CALLSPEAK_VARIABLES = frozenset({"CALLSPEAK_SERVER"})


def _known_variables() -> set[str]:
    """Every CALLSPEAK_* name callspeak reads, upper case (a setting's with a vendor's name,
    ``DEEPGRAM_API_KEY`` say, is read with the prefix too)."""
    prefix = str(Settings.model_config.get("env_prefix", "")).upper()
    return {f"{prefix}{name.upper()}" for name in Settings.model_fields} | OTHER_CALLSPEAK_VARIABLES


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each CALLSPEAK_* variable in ``environ`` that nothing in callspeak reads (names are
    matched in any case, as settings are read), with the known name closest to it if one is
    close (a misspelling), else None; sorted by name. Values are never looked at."""
    known = _known_variables()
    # Compared without the prefix they share, which would make any two names look alike.
    suffixes = {name.removeprefix("CALLSPEAK_"): name for name in known}
    unknown = []
    for variable in sorted(environ):
        upper = variable.upper()
        if upper.startswith("CALLSPEAK_") and upper not in known:
            close = difflib.get_close_matches(upper.removeprefix("CALLSPEAK_"), suffixes, 1, 0.75)
            unknown.append((variable, suffixes[close[0]] if close else None))
    return unknown
