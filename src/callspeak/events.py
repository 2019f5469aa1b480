"""Events a call reports to applications: what started, what the caller heard, what they pressed.

Every event carries the call's ids and a wall-clock timestamp (seconds since the epoch), so a
consumer can order and correlate them across calls. Types:

``call.started`` · ``speech.started`` (first audio of an utterance sent; ``firstAudioMs`` from
its turn to speak, not from when it was asked for) · ``speech.heard`` (one
sentence fully played, from its mark) · ``speech.done`` (every sentence of an utterance played) ·
``speech.interrupted`` (cleared, or the call ended, while it was being heard: heard and unheard
text, and why: ``barge-in``, ``dtmf``, ``clear`` (the control API), ``app`` (a hook's
``Call.clear()``), ``call-ended``) · ``speech.failed`` · ``dtmf`` · ``caller.speaking`` (voice
activity started on the caller's side) · ``call.stopped``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CallEventRecord", "EventListener", "EventType"]

EventType = Literal[
    "call.started",
    "speech.started",
    "speech.heard",
    "speech.done",
    "speech.interrupted",
    "speech.failed",
    "dtmf",
    "caller.speaking",
    "call.stopped",
]


@dataclass(frozen=True, slots=True)
class CallEventRecord:
    type: EventType
    call_sid: str
    stream_sid: str
    timestamp: float
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "callSid": self.call_sid,
            "streamSid": self.stream_sid,
            "timestamp": self.timestamp,
            **dict(self.data),
        }


#: Called on the event loop for each event; must not block (hand work to a task or a queue).
EventListener = Callable[[CallEventRecord], None]
