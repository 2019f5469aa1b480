"""What an emulated caller experienced: timings, marks, gaps, and the audio heard."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from callspeak.audio.format import FRAME_BYTES
from callspeak.audio.wav import write_wav

__all__ = ["CallReport", "Gap", "MarkRecord"]

_BYTES_PER_SECOND = 8000


@dataclass
class MarkRecord:
    name: str
    received_at: float  # seconds since the call's start message
    echoed_at: float | None = None
    flushed: bool = False  # echoed because of a clear, not because its audio played


@dataclass(frozen=True)
class Gap:
    """Caller heard silence while speech had started and more speech followed."""

    at: float  # seconds since start
    seconds: float


@dataclass
class CallReport:
    call_sid: str
    stream_sid: str
    parameters: dict[str, str] = field(default_factory=dict)
    #: The emulator's clock reading when ``start`` was sent; other times are relative to it.
    started_at: float = 0.0
    first_audio_at: float | None = None  # first media message received, seconds since start
    #: When each run of the server's audio began arriving, seconds since start: the first media
    #: message, and each one received while nothing of the server's was left to play (a reply
    #: after silence; or the end of an underrun, see gaps()).
    audio_starts: list[float] = field(default_factory=list)
    marks: list[MarkRecord] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    dtmf_sent: list[tuple[float, str]] = field(default_factory=list)
    #: (seconds since start, text), e.g. Twilio's 31951 for a message it would refuse.
    warnings: list[tuple[float, str]] = field(default_factory=list)
    media_messages: int = 0
    audio_bytes_received: int = 0
    #: Media messages whose payload was not whole 20 ms frames (a multiple of 160 bytes).
    #: Twilio plays them, but a server that frames its audio should send none.
    partial_frame_messages: int = 0
    #: What the caller heard, μ-law 8 kHz, one 160-byte frame per 20 ms tick since start.
    heard: bytearray = field(default_factory=bytearray)
    #: The server's audio as played, without the silence of underruns (what it sent, in order,
    #: minus what a clear dropped).
    played: bytearray = field(default_factory=bytearray)
    #: Per tick: bytes of real (server) audio played in it.
    played_per_tick: list[int] = field(default_factory=list)
    ended_by: str = ""
    #: The WebSocket close code and reason the call ended with (whoever closed), once closed.
    close_code: int | None = None
    close_reason: str = ""
    duration: float = 0.0

    @property
    def time_to_first_audio(self) -> float | None:
        return self.first_audio_at

    @property
    def seconds_heard(self) -> float:
        """Seconds of the server's audio the caller heard (silence padding excluded)."""
        return sum(self.played_per_tick) / _BYTES_PER_SECOND

    @property
    def speech(self) -> bytes:
        """The heard audio from the first to the last tick that played server audio."""
        ticks = [i for i, n in enumerate(self.played_per_tick) if n]
        if not ticks:
            return b""
        return bytes(self.heard[ticks[0] * FRAME_BYTES : (ticks[-1] + 1) * FRAME_BYTES])

    def gaps(self, *, min_seconds: float = 0.0) -> list[Gap]:
        """Silences between the first and the last played server audio — underruns, and also
        pauses when the server had nothing to say (between two replies), which the emulator
        cannot tell apart — excluding the moments right after a ``clear`` (an intended stop)."""
        ticks = self.played_per_tick
        played = [i for i, n in enumerate(ticks) if n]
        if not played:
            return []
        clear_ticks = {int(at / 0.02) for at in self.clears}
        gaps: list[Gap] = []
        missing = 0
        run_start: int | None = None
        last = played[-1]
        for i in range(played[0], last + 1):
            # The last frame of audio is often partial: that is where the speech ends, not a gap.
            short = FRAME_BYTES - ticks[i] if i != last else 0
            if short and not any(c <= i <= c + 1 for c in clear_ticks):
                if run_start is None:
                    run_start = i
                missing += short
            elif run_start is not None:
                # (Also when the run ends at a clear: that silence came before it, and was heard.)
                gaps.append(Gap(run_start * 0.02, missing / _BYTES_PER_SECOND))
                run_start, missing = None, 0
        return [g for g in gaps if g.seconds > min_seconds]

    def _close(self) -> str:
        """`` (close 1008 'reason')`` when the server ended the call with an unusual code."""
        if self.ended_by != "server" or self.close_code in (None, 1000):
            return ""
        reason = f" {self.close_reason!r}" if self.close_reason else ""
        return f" (close {self.close_code}{reason})"

    def write_wav(self, path: str | os.PathLike[str]) -> None:
        write_wav(path, bytes(self.heard))

    def timeline(self) -> str:
        """A human-readable account of the call."""
        lines = [f"call {self.call_sid} stream {self.stream_sid}"]
        events: list[tuple[float, str]] = []
        if self.first_audio_at is not None:
            ms = self.first_audio_at * 1000
            events.append((self.first_audio_at, f"first audio (time to first audio {ms:.0f} ms)"))
        for mark in self.marks:
            events.append((mark.received_at, f"mark {mark.name} sent by server"))
            if mark.echoed_at is not None:
                how = "flushed by clear" if mark.flushed else "played"
                events.append((mark.echoed_at, f"mark {mark.name} echoed ({how})"))
        events += [(at, "clear: buffered audio dropped") for at in self.clears]
        events += [(at, f"dtmf {digit} pressed") for at, digit in self.dtmf_sent]
        events += [(at, f"warning {text}") for at, text in self.warnings]
        for at, text in sorted(events, key=lambda e: e[0]):
            lines.append(f"  {at:7.3f}s  {text}")
        gaps = self.gaps(min_seconds=0.0)
        longest = max((g.seconds for g in gaps), default=0.0)
        ttfa = "none" if self.first_audio_at is None else f"{self.first_audio_at * 1000:.0f} ms"
        lines.append(
            f"summary: time to first audio {ttfa}; heard {self.seconds_heard:.2f} s of speech in "
            f"{self.duration:.2f} s; {len(gaps)} gaps (longest {longest * 1000:.0f} ms); "
            f"{len(self.marks)} marks; {len(self.clears)} clears; {len(self.warnings)} warnings; "
            f"ended by {self.ended_by or 'unknown'}{self._close()}"
        )
        return "\n".join(lines)
