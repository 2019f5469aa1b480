"""Prometheus metrics for one server.

Each server has its own registry, so several servers (tests, benchmarks) can share a process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.calls_started = Counter(
            "callspeak_calls_started", "Media streams started.", registry=r
        )
        self.calls_active = Gauge("callspeak_calls_active", "Media streams open now.", registry=r)
        self.calls_refused = Counter(
            "callspeak_calls_refused", "Media streams refused.", ["reason"], registry=r
        )
        self.protocol_errors = Counter(
            "callspeak_protocol_errors",
            "Inbound messages that broke the Media Streams protocol (ignored).",
            ["reason"],
            registry=r,
        )
        self.frames_sent = Counter("callspeak_media_frames_sent", "Media frames sent.", registry=r)
        self.first_audio = Histogram(
            "callspeak_first_audio_seconds",
            "From an utterance's turn to speak (asked for, or the speech queued before it "
            "done) to its first media frame being sent.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.tts_errors = Counter(
            "callspeak_tts_errors", "Text-to-speech failures.", ["provider", "kind"], registry=r
        )
        self.signature_refusals = Counter(
            "callspeak_signature_refusals",
            "Requests refused for a bad Twilio signature.",
            ["path"],
            registry=r,
        )
