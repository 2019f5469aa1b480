"""Hooks for ``callspeak serve --hooks _first_frames:hooks``: when each utterance's first frame
left, and a reply to a key press.

bench/deepgram_latency.py runs the server with these hooks to time the provider's first byte to
*our* first media frame, apart from how late the emulated callers (on the same two cores) read
it. A listener on each call's events sees ``speech.started`` synchronously, just after the
utterance's first media message was written to the socket, and appends ``<callSid> <monotonic
seconds> <text>`` to the file named by ``$BENCH_FIRST_FRAMES``: the clock the fake Deepgram stamps
its first bytes with, shared by every process on the machine, and the text it keys them by.

A call whose stream has a ``reply`` parameter says it when a key is pressed, through ``on_dtmf``
as an application would: the benchmark's "calls in progress, answered in the same instant".

With ``$BENCH_GC_PAUSES`` set, each of the server's garbage collections is timed into that file
too (see :class:`CollectorPauses`).
"""

from __future__ import annotations

import gc
import os
import time

from callspeak.events import CallEventRecord
from callspeak.hooks import Call, CallHooks
from callspeak.session import CallSession


class FirstFrames(CallHooks):
    def __init__(self, path: str) -> None:
        super().__init__()
        self._out = open(path, "a", buffering=1)  # noqa: SIM115 - open while the server runs
        self.on_dtmf(self._reply)

    def attach(self, session: CallSession) -> None:
        super().attach(session)
        session.add_listener(self._event)

    def _event(self, event: CallEventRecord) -> None:
        if event.type == "speech.started":
            # A line per utterance: a few microseconds, once or twice per call in the benchmark.
            self._out.write(f"{event.call_sid} {time.monotonic()!r} {event.data['text']}\n")

    async def _reply(self, call: Call, digit: str) -> None:
        reply = call.parameters.get("reply")
        if reply:
            await call.say(reply)


class CollectorPauses:
    """Appends ``<monotonic start> <seconds> <generation>`` to ``path`` for each of the server's
    garbage collections (a collection pauses every call at once: one of the causes of a
    first-frame tail). Through ``gc.callbacks``: a few microseconds a pass, tens of passes a run."""

    def __init__(self, path: str) -> None:
        self._out = open(path, "a", buffering=1)  # noqa: SIM115 - open while the server runs
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.monotonic()
        else:
            took = time.monotonic() - self._began
            self._out.write(f"{self._began!r} {took!r} {info['generation']}\n")


hooks = FirstFrames(os.environ["BENCH_FIRST_FRAMES"])
if os.environ.get("BENCH_GC_PAUSES"):
    pauses = CollectorPauses(os.environ["BENCH_GC_PAUSES"])
