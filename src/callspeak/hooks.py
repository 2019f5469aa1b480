"""Scripting calls in Python: register coroutines for what happens in a call.

    hooks = CallHooks()

    @hooks.on_start
    async def greet(call: Call) -> None:
        await call.say("Press 1 for sales, 2 for support.")

    @hooks.on_dtmf
    async def pressed(call: Call, digit: str) -> None:
        await call.clear()
        await call.say(f"You pressed {digit}.")

    app = create_app(settings, hooks=hooks)   # or: callspeak serve --hooks mymodule:hooks

A call's handlers run one at a time, in the order of their events (and, for one event, of
registration), in a task owned by the call: cancelled when the call ends; an exception is logged
and does not end the call. So no two handlers of a call ever race on its state — and a handler
that waits (``say(..., wait=True)``, a slow request) holds the events after it: a digit pressed
while ``on_start`` waits for its menu to be heard reaches ``on_dtmf`` only once ``on_start``
returns. Say a menu without waiting, as above, for digits to be handled while it plays
(``CALLSPEAK_INTERRUPT_DIGITS`` stops the speech itself at once either way). At most 64 events
wait; beyond that they are dropped with a warning. When any ``on_start`` handler is registered,
the server does not speak its greeting or the ``say`` parameter: the handler decides.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from callspeak.events import CallEventRecord
from callspeak.logs import printable_id
from callspeak.session import CallSession
from callspeak.speech import Utterance

__all__ = ["Call", "CallHooks"]

log = logging.getLogger("callspeak.hooks")

StartHandler = Callable[["Call"], Awaitable[None]]
DigitHandler = Callable[["Call", str], Awaitable[None]]
EventHandler = Callable[["Call", CallEventRecord], Awaitable[None]]


class Call:
    """What a handler can do with its call."""

    def __init__(self, session: CallSession) -> None:
        self._session = session

    @property
    def call_sid(self) -> str:
        return self._session.call_sid

    @property
    def stream_sid(self) -> str:
        return self._session.stream_sid

    @property
    def parameters(self) -> Mapping[str, str]:
        """The stream's custom parameters (TwiML ``<Parameter>``s)."""
        start = self._session.start
        return start.custom_parameters if start else {}

    @property
    def session(self) -> CallSession:
        return self._session

    async def say(self, text: str, *, interruptible: bool = True, wait: bool = False) -> Utterance:
        """Queue ``text``; with ``wait``, return once it was heard, interrupted or failed."""
        utterance = self._session.say(text, interruptible=interruptible)
        if wait:
            await utterance.wait()
        return utterance

    async def clear(self) -> list[Utterance]:
        """Stop all speech now (see :meth:`CallSession.clear`)."""
        return await self._session.clear(reason="app")

    async def hangup(self, *, after_speech: bool = True) -> None:
        """End the media stream, by default once queued speech has been heard."""
        await self._session.hangup(after_speech=after_speech)


class CallHooks:
    def __init__(self) -> None:
        self._start: list[StartHandler] = []
        self._dtmf: list[DigitHandler] = []
        self._interrupted: list[EventHandler] = []

    @property
    def handles_start(self) -> bool:
        return bool(self._start)

    def on_start(self, fn: StartHandler) -> StartHandler:
        self._start.append(fn)
        return fn

    def on_dtmf(self, fn: DigitHandler) -> DigitHandler:
        self._dtmf.append(fn)
        return fn

    def on_interrupted(self, fn: EventHandler) -> EventHandler:
        """Called with the ``speech.interrupted`` event (heard and unheard text, reason) — not
        for reason ``call-ended``: the call's handlers end with the call."""
        self._interrupted.append(fn)
        return fn

    def attach(self, session: CallSession) -> None:
        """Wire the handlers to one call's events."""
        call = Call(session)
        # One lane per call: handlers run in event order, never two at once for the same call,
        # so a digit pressed during on_start waits for on_start to finish.
        lane: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue(maxsize=64)

        async def run_lane() -> None:
            while True:
                job = await lane.get()
                try:
                    await job()
                except asyncio.CancelledError:
                    if _being_cancelled():  # the call is ending: this lane with it
                        raise
                    # The handler's own: it awaited something cancelled (a task, a gather). A
                    # failure of that handler, like any other; the lane goes on.
                    log.exception("call handler failed")
                except Exception:
                    log.exception("call handler failed")  # (with the call's ids: see spawn)

        def enqueue(job: Callable[[], Awaitable[None]]) -> None:
            try:
                lane.put_nowait(job)
            except asyncio.QueueFull:  # a handler is stuck; dropping beats growing unbounded
                log.warning(
                    "call handlers are 64 events behind; event dropped",
                    extra={"call_sid": call.call_sid, "stream_sid": session.stream_sid or "-"},
                )

        def listener(event: CallEventRecord) -> None:
            if event.type == "call.started":
                session.spawn(run_lane(), name=f"hooks-{printable_id(event.call_sid)}")
                for start_fn in self._start:
                    enqueue(_bind(start_fn, call))
            elif event.type == "dtmf":
                digit = str(event.data.get("digit", ""))
                for dtmf_fn in self._dtmf:
                    enqueue(_bind(dtmf_fn, call, digit))
            elif event.type == "speech.interrupted" and event.data.get("reason") != "call-ended":
                # (Not for speech the end of the call stopped, as on_interrupted says: a socket
                # dropped under a send ends it so while this call's lane still runs.)
                for int_fn in self._interrupted:
                    enqueue(_bind(int_fn, call, event))

        session.add_listener(listener)


def _bind(fn: Callable[..., Awaitable[None]], *args: Any) -> Callable[[], Awaitable[None]]:
    return lambda: fn(*args)


def _being_cancelled() -> bool:
    """Whether the running task is being cancelled (not only seeing a CancelledError that
    something it awaited raised). A function of its own: a task held in a local variable of
    its own coroutine is a reference cycle, which kept the call's objects for the collector."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
