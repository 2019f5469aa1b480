"""Request and response bodies of the control API (``api.py``), as pydantic models.

Wire names are camelCase, like Twilio's and like :meth:`CallEventRecord.to_dict`. Requests are
strict (``"interruptible": "yes"`` is an error, not ``True``) and refuse unknown fields, so a typo
such as ``"interruptable"`` is reported instead of silently ignored. The upper bound on ``text``
is a setting, so it is passed at validation time as ``context={"max_text_chars": n}``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from callspeak.session import CallSession
from callspeak.speech import SpeechStatus, Utterance

__all__ = [
    "DEFAULT_MAX_TEXT_CHARS",
    "CallDetail",
    "CallList",
    "CallSummary",
    "ClearResponse",
    "ErrorBody",
    "ErrorDetail",
    "HangupRequest",
    "HangupResponse",
    "HeardRecordOut",
    "SayRequest",
    "UtteranceOut",
    "call_detail",
    "call_summary",
    "utterance_out",
]

#: Used when the settings do not (yet) say ``max_text_chars``.
DEFAULT_MAX_TEXT_CHARS = 5000


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def wire(self) -> dict[str, Any]:
        """The JSON-ready body, camelCase."""
        return self.model_dump(mode="json", by_alias=True)


# -- requests ---------------------------------------------------------------------------------


class SayRequest(BaseModel):
    """``POST /calls/{callSid}/say``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = Field(
        description="What to say; surrounding whitespace is stripped, then it must hold "
        "1..max_text_chars characters."
    )
    interruptible: bool = Field(
        True,
        description="Whether barge-in (the caller speaking, or an interrupt digit) may stop it; "
        "a clear stops all speech.",
    )

    @field_validator("text")
    @classmethod
    def _at_most_max_chars(cls, value: str, info: ValidationInfo) -> str:
        context = info.context if isinstance(info.context, dict) else {}
        limit = int(context.get("max_text_chars", DEFAULT_MAX_TEXT_CHARS))
        if len(value) > limit:
            raise PydanticCustomError(
                "string_too_long",
                "Text should have at most {max_length} characters, not {length}",
                {"max_length": limit, "length": len(value)},
            )
        return value


class HangupRequest(BaseModel):
    """``POST /calls/{callSid}/hangup``; the body is optional."""

    model_config = ConfigDict(strict=True, extra="forbid")

    after_speech: bool = Field(
        False,
        alias="afterSpeech",
        description="Hang up once queued speech, and any said meanwhile, has been heard (at most "
        "30 s), not at once.",
    )


# -- responses --------------------------------------------------------------------------------


class HeardRecordOut(_Wire):
    """What the caller heard of an utterance, from Twilio's mark echoes."""

    heard: list[str] = Field(description="Sentences played in full.")
    cut: str | None = Field(None, description="The sentence a clear cut off, if any.")
    cut_seconds: float | None = Field(None, description="Roughly how much of it played.")
    unheard: list[str] = Field(description="Sentences never played.")


class UtteranceOut(_Wire):
    """One ``say``: its sentences, status and — once final — what was heard."""

    id: int = Field(description="Unique within the call, increasing.")
    text: str
    status: Literal["queued", "speaking", "played", "interrupted", "cancelled", "failed"]
    interruptible: bool
    sentences: list[str]
    record: HeardRecordOut | None = Field(None, description="Present once the status is final.")
    error: str | None = None
    url: str = Field(description="This utterance's resource.")


class CallSummary(_Wire):
    call_sid: str
    stream_sid: str
    account_sid: str
    phase: Literal["connecting", "streaming", "stopped"]
    started_at: float | None = Field(description="When the stream started, epoch seconds.")
    parameters: dict[str, str] = Field(description="The stream's <Parameter>s.")
    speaking: UtteranceOut | None = Field(
        description="The utterance the caller is hearing now: the oldest whose status is "
        "`speaking` (all its audio may have been sent, up to a second ahead of the caller, "
        "while its last mark has not come back)."
    )
    url: str


class CallDetail(CallSummary):
    tracks: list[str]
    media_format: dict[str, str | int]
    utterances: list[UtteranceOut] = Field(
        description="Recent utterances, oldest first: unfinished ones and the last ones said "
        "through this API."
    )
    events_url: str


class CallList(_Wire):
    calls: list[CallSummary]


class ClearResponse(_Wire):
    call_sid: str
    cleared: list[UtteranceOut] = Field(description="The utterances stopped, with their records.")


class HangupResponse(_Wire):
    call_sid: str
    after_speech: bool


class ErrorDetail(_Wire):
    code: str = Field(description="Stable, machine-readable, e.g. unknown_call.")
    message: str = Field(description="For people.")
    errors: list[dict[str, Any]] | None = Field(
        None, description="For 422: pydantic's list of validation errors."
    )


class ErrorBody(_Wire):
    error: ErrorDetail


# -- from the session's objects -------------------------------------------------------------


def call_url(call_sid: str) -> str:
    return f"/calls/{call_sid}"


def utterance_out(call_sid: str, utterance: Utterance) -> UtteranceOut:
    url = f"{call_url(call_sid)}/utterances/{utterance.id}"
    return UtteranceOut.model_validate({**utterance.to_dict(), "url": url})


def heard_now(session: CallSession) -> Utterance | None:
    """The utterance the caller hears now: the oldest still ``speaking``. Not the session's
    :attr:`~callspeak.session.CallSession.speaking` (the one whose audio is being sent): that
    one is done once its last frame is sent, while the caller still hears it for as long as the
    audio was sent ahead, and by then the next one may be being sent."""
    return next((u for u in session.utterances if u.status is SpeechStatus.SPEAKING), None)


def _summary_fields(session: CallSession) -> dict[str, Any]:
    start = session.start
    speaking = heard_now(session)
    return {
        "call_sid": session.call_sid,
        "stream_sid": session.stream_sid,
        "account_sid": start.account_sid if start else "",
        "phase": session.phase.value,
        "started_at": session.started_at,
        "parameters": dict(start.custom_parameters) if start else {},
        "speaking": utterance_out(session.call_sid, speaking) if speaking else None,
        "url": call_url(session.call_sid),
    }


def call_summary(session: CallSession) -> CallSummary:
    return CallSummary(**_summary_fields(session))


def call_detail(session: CallSession, utterances: list[Utterance]) -> CallDetail:
    start = session.start
    fmt = start.media_format if start else None
    return CallDetail(
        **_summary_fields(session),
        tracks=list(start.tracks) if start else [],
        media_format=(
            {"encoding": fmt.encoding, "sampleRate": fmt.sample_rate, "channels": fmt.channels}
            if fmt
            else {}
        ),
        utterances=[utterance_out(session.call_sid, u) for u in utterances],
        events_url=f"{call_url(session.call_sid)}/events",
    )
