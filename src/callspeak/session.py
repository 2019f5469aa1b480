"""One live call: the Media Stream socket loop, speech queue, pacing and marks.

:class:`CallSession` owns every task of a call. ``run()`` reads Twilio's messages until ``stop``
or the socket closes; a speaker task speaks queued utterances one at a time. For each utterance a
producer streams audio from the TTS provider sentence by sentence into a bounded frame queue
(synthesis of the next sentence overlaps playback of this one), and the sender drains that queue
to Twilio in 20 ms frames, paced so that the audio sent runs at most ``max_lead`` seconds ahead of
the caller's playback, with a mark after each sentence. When ``run()`` returns, every task of the
call has been cancelled and awaited and the provider closed.

Latency: the voice is warmed up (``warm_up()``) in ``open()``, as the stream is accepted and before
``start``, and from then on a transport that can (:class:`DirectDelivery`) hands ``start`` and media
to the session in the callback that read them. Speech
queued while the call has nothing to speak starts synthesising in ``say()`` itself (its producer
is started with :func:`~callspeak.tasks.start_task`: on Python 3.12+ it starts asking the voice
before ``say()`` returns — the request is written then when the voice has a connection ready —
on 3.11 a loop iteration later), and audio the
sender is idle waiting for is sent by the producer as it arrives — each a loop iteration saved,
which a server busy with hundreds of calls would spend in tens of milliseconds.

I/O is injected: a :class:`Transport` (one WebSocket), a :class:`~callspeak.tts.base.TTSProvider`,
a :class:`~callspeak.clock.Clock`. Nothing here blocks the event loop.

Limits: ``max_text_chars`` bounds every text spoken (``say()`` refuses longer text; an over-long
``say`` parameter or greeting is logged and not spoken, and the call stays open);
``idle_timeout`` closes the stream when no inbound message at all arrived for that long (Twilio
sends media every 20 ms, so a silent socket is a dead peer); ``start_timeout`` closes it (1008)
when no ``start`` came that long after it opened, whatever else arrived (Twilio sends ``start``
right after ``connected``: without it nothing can be served, yet a peer sending only media would
keep the stream, a call slot and a voice's connection); ``max_message_bytes`` is the soft
message-size limit (bigger messages are logged and ignored). ``admit`` sees the ``start`` message
before anything is spoken and may refuse the stream (closed with 1008 and the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from callspeak.audio.convert import TwilioAudioConverter
from callspeak.audio.format import FRAME_SECONDS
from callspeak.bargein import SpeechOnsetDetector
from callspeak.call_state import (
    CallState,
    DigitPressed,
    MarkFlushed,
    MarkPlayed,
    MediaReceived,
    Phase,
    Rejected,
    Started,
    Stopped,
    StreamConnected,
)
from callspeak.clock import Clock, MonotonicClock
from callspeak.events import CallEventRecord, EventListener, EventType
from callspeak.logs import CallIds, log_as_call, printable_id
from callspeak.metrics import Metrics
from callspeak.pacing import Pacer
from callspeak.protocol import (
    Connected,
    Mark,
    Media,
    ProtocolError,
    Start,
    StreamSid,
    encode_clear,
    encode_mark,
    encode_media,
    parse_message,
)
from callspeak.speech import SpeechStatus, Utterance, mark_name, parse_mark_name
from callspeak.tasks import start_task, wait_cancelled
from callspeak.tts.base import (
    APOLOGY,
    TTSError,
    TTSProvider,
    aclose_stream,
    prefetch,
    warm_up,
)
from callspeak.tts.sentences import group_sentences, split_sentences

__all__ = [
    "Admission",
    "CallSession",
    "DirectDelivery",
    "SessionClosed",
    "SpeechQueueFull",
    "TextTooLong",
    "Transport",
    "TransportClosed",
]

log = logging.getLogger("callspeak.call")

#: Frames a producer may run ahead of the sender (10 s of audio): bounds memory per call.
FRAME_BUFFER = 500
#: Frames one media message carries at most: 100 ms of audio (Twilio takes any size).
MAX_FRAMES_PER_MESSAGE = 5
#: Utterances that may wait behind the one being spoken.
MAX_QUEUED_UTTERANCES = 32
#: Close code for a stream refused at ``start`` (RFC 6455: policy violation).
POLICY_VIOLATION: Final = 1008
#: Inbound messages ignored in a call that are each logged; after them, one in every
#: REJECTS_LOGGED_EVERY is (all are counted in ``callspeak_protocol_errors_total``).
REJECTS_LOGGED = 5
REJECTS_LOGGED_EVERY = 100
#: Seconds a stream may go without a ``start`` after it opened (Twilio sends it at once).
START_TIMEOUT: Final = 10.0

#: Decides whether a started stream may go on: None admits it, a string refuses it (the reason,
#: logged and sent as the close reason — keep it free of secrets).
Admission = Callable[[Start], str | None]


class Transport(Protocol):
    """One Media Streams WebSocket, as the session sees it."""

    async def receive(self) -> str | bytes | None:
        """The next message (text or binary), or None once the peer has closed."""
        ...

    async def send(self, text: str) -> None:
        """Send one text message. Raises if the socket is closed."""
        ...

    async def send_all(self, texts: Sequence[str]) -> None:
        """Send ``texts`` in order, as one write to the socket where the transport can (the
        native ``/twilio`` socket; through ASGI, one by one): what is sent together then
        travels together (see :meth:`CallSession._send_audio`). Raises
        :class:`TransportClosed` if the socket is closed, its ``sent`` saying how many of
        ``texts`` were written before."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket (idempotent)."""
        ...


@runtime_checkable
class DirectDelivery(Protocol):
    """A :class:`Transport` that can hand inbound messages to the session as they arrive, with
    no task switch, instead of queueing them for ``receive()``. Optional: the session offers its
    handler in ``open()``; transports without this method are only read."""

    def deliver_to(self, handler: Callable[[str | bytes], bool]) -> None:
        """Offer each later inbound message to ``handler`` first — but only while the reader
        is not busy with one (a ``receive()`` is waiting, or none was made yet) and nothing is
        queued ahead of it, so messages are still seen in order. ``handler`` returns True when it
        dealt with the message completely; False leaves it untouched, and it is queued for
        ``receive()`` as usual."""
        ...


class TransportClosed(ConnectionError):
    """The media socket closed under a send; the receive loop will end the call. From
    :meth:`Transport.send_all`, ``sent`` is how many of its messages were written first."""

    def __init__(self, message: str, *, sent: int = 0) -> None:
        super().__init__(message)
        self.sent = sent


class SpeechQueueFull(RuntimeError):
    """Too many utterances are waiting in this call."""


class _SpeechFailed(RuntimeError):
    """An utterance's synthesis failed: what the sender raises, once the producer logged why."""


class SessionClosed(RuntimeError):
    """The call has ended; it cannot speak any more."""


class TextTooLong(ValueError):
    """Text over the session's ``max_text_chars``: refused whole, never truncated."""


_END_OF_UTTERANCE = -1
_FAILED = -2
_SOCKET_CLOSED = -3

#: One utterance's audio on its way: frames (index, frame; (index, None) ends a sentence) and
#: the producer task filling them.
_Production = tuple[asyncio.Queue[tuple[int, bytes | None]], "asyncio.Task[None]"]


@dataclass(slots=True)
class _StillPlaying:
    """A failed utterance whose audio is still in Twilio's buffer."""

    utterance: Utterance
    last_mark: str  # once this echoes, all it sent has played
    whole: int  # sentences before this one were sent whole: their marks echoed played, heard


#: Events Twilio sends: the only event names a metric label may carry.
_TWILIO_EVENTS = frozenset(("connected", "start", "media", "mark", "dtmf", "stop"))


def _utf8_size(text: str) -> int:
    """``text``'s size in bytes as it came off the socket (UTF-8). ``isascii`` is a flag check:
    every message Twilio sends but a start with non-ASCII parameters costs no encoding."""
    return len(text) if text.isascii() else len(text.encode(errors="surrogatepass"))


def _error_kind(reason: str, event: str | None) -> str:
    """The ``callspeak_protocol_errors`` label for a message refused for ``reason``: the name of
    the Twilio event it was, or one of a few fixed kinds — never text from the message, since
    every distinct label is a time series the registry keeps for good."""
    if event is not None:
        return event if event in _TWILIO_EVENTS else "unknown_event"
    if reason.startswith("binary frame"):
        return "binary_frame"
    if reason.startswith("message of "):
        return "too_large"
    return "malformed"


class CallSession:
    #: Seconds the end of a call waits for the tasks it owns (hooks' included) to end once
    #: cancelled.
    task_grace: float = 5.0

    def __init__(
        self,
        transport: Transport,
        provider: TTSProvider,
        *,
        greeting: str | None,
        speak_parameter: bool = True,
        max_lead: float = 1.0,
        max_message_bytes: int = 64 * 1024,
        max_text_chars: int = 5000,
        idle_timeout: float | None = None,
        start_timeout: float = START_TIMEOUT,
        admit: Admission | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        on_event: EventListener | None = None,
        barge_in: SpeechOnsetDetector | None = None,
        interrupt_digits: str = "",
    ) -> None:
        self._transport = transport
        self._provider = provider
        self._greeting = greeting
        self._speak_parameter = speak_parameter
        self._clock = clock or MonotonicClock()
        self._metrics = metrics or Metrics()
        self._max_message_bytes = max_message_bytes
        self._max_text_chars = max_text_chars
        self._idle_timeout = idle_timeout
        self._start_timeout = start_timeout
        #: The ids the voice's lines carry (see log_as_call): filled in at start.
        self._log_ids = CallIds()
        self._admit = admit
        self._last_inbound = self._clock.now()
        #: Why the server ended the stream itself ("idle timeout", a refusal…), or None.
        self.closed_because: str | None = None
        #: The ``call.started`` event once emitted: emitted before the call can be looked up by
        #: its callSid, it is what a later event subscriber is shown first.
        self.started_event: CallEventRecord | None = None
        self._pacer = Pacer(max_lead)
        #: Frames the sender waits to have room for: a whole message, or what max_lead holds
        #: when that is less (room for more never comes). 1e-9: 0.06 / 0.02 is 2.99999…
        self._message_frames = max(
            1, min(MAX_FRAMES_PER_MESSAGE, int(max_lead / FRAME_SECONDS + 1e-9))
        )
        self._state = CallState()
        self._listeners: list[EventListener] = [on_event] if on_event else []
        self._ended = False  # the call is over: no more events, listeners let go
        self._queue: asyncio.Queue[Utterance] = asyncio.Queue(MAX_QUEUED_UTTERANCES)
        self._utterances: dict[int, Utterance] = {}
        #: Failed utterances whose audio is still in Twilio's buffer, by id: what they sent
        #: still plays (up to the failure, or the apology), so clear() still stops it, barge-in
        #: spares it if it is not interruptible, hangup(after_speech) waits for it, and its
        #: whole sentences are reported heard as their marks echo. ``_drained``: there are none.
        self._draining: dict[int, _StillPlaying] = {}
        self._drained = asyncio.Event()
        self._drained.set()
        self._next_id = 0
        self._generation = 0
        self._current: Utterance | None = None
        #: What the speaker took from the queue and holds while a clear() finishes: it is next,
        #: whatever say() queues meanwhile.
        self._held: Utterance | None = None
        self._current_task: asyncio.Task[None] | None = None
        self._speaker: asyncio.Task[None] | None = None
        #: The next utterance, already being synthesised: started by say() when the call had
        #: nothing to speak, so the voice is asked at once rather than after the speaker's
        #: task switches. The speaker adopts it; clear() and the end of the call cancel it.
        self._early: tuple[Utterance, _Production] | None = None
        #: The frame queue the sender is waiting on while it is empty and nothing is pending:
        #: audio for it may be sent by its producer at once (see _produce).
        self._sender_waits_on: asyncio.Queue[tuple[int, bytes | None]] | None = None
        #: clear() calls under way, and set while there are none: speech queued meanwhile is
        #: synthesised only once they are over, since the voice's clear at their end would cut
        #: it short (its sentence then marked as heard with no audio).
        self._clearing = 0
        self._no_clear = asyncio.Event()
        self._no_clear.set()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._opened = False
        self._started = asyncio.Event()
        self._barge_in = barge_in
        self._interrupt_digits = interrupt_digits
        self._tasks: set[asyncio.Task[Any]] = set()
        #: A barge-in clear started by :meth:`_handle_now`; the reader waits for it before it
        #: handles another message, as if it had run inline.
        self._followup: asyncio.Task[None] | None = None
        self.rejected = 0
        self.frames_sent = 0
        #: Wall-clock time (epoch seconds) the ``start`` message arrived; None before it.
        self.started_at: float | None = None

    # -- what applications see -------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The media socket this call runs on."""
        return self._transport

    @property
    def phase(self) -> Phase:
        return self._state.phase

    @property
    def start(self) -> Start | None:
        return self._state.start

    @property
    def call_sid(self) -> str:
        return self._state.start.call_sid if self._state.start else ""

    @property
    def stream_sid(self) -> str:
        return self._state.start.stream_sid if self._state.start else ""

    @property
    def speaking(self) -> Utterance | None:
        return self._current

    @property
    def utterances(self) -> list[Utterance]:
        return list(self._utterances.values())

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener`` with each event of the call, ``call.stopped`` the last; listeners
        are let go once the call has ended."""
        if not self._ended:
            self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def wait_started(self) -> Start:
        await self._started.wait()
        assert self._state.start is not None
        return self._state.start

    def say(self, text: str, *, interruptible: bool = True) -> Utterance:
        """Queue ``text`` to be spoken after what is already queued; returns its record.

        Raises :class:`SessionClosed` after the call ended, :class:`SpeechQueueFull` when
        ``MAX_QUEUED_UTTERANCES`` are waiting, ``ValueError`` for text with nothing to say and
        :class:`TextTooLong` (a ``ValueError``) for text over ``max_text_chars``.
        """
        if self._closed or self._state.phase is Phase.STOPPED:
            raise SessionClosed("the call has ended")
        if len(text) > self._max_text_chars:
            raise TextTooLong(
                f"text of {len(text)} characters is over the {self._max_text_chars}-character "
                "limit (max_text_chars)"
            )
        # A voice limited in texts a minute gets short sentences grouped (one mark a group).
        min_chars: int = getattr(self._provider, "stream_min_chars", 0)
        sentences = tuple(group_sentences(split_sentences(text), min_chars))
        if not sentences:
            raise ValueError("nothing to say: the text is empty")
        self._next_id += 1
        utterance = Utterance(
            self._next_id, text, sentences, interruptible, requested_at=self._clock.now()
        )
        try:
            self._queue.put_nowait(utterance)
        except asyncio.QueueFull:
            raise SpeechQueueFull(
                f"{MAX_QUEUED_UTTERANCES} utterances are already waiting in this call"
            ) from None
        self._utterances[utterance.id] = utterance
        if (
            self._speaker is not None
            and self._current is None
            and self._held is None  # (it speaks before this one: nothing to start early)
            and self._early is None
            and not self._clearing
            and self._queue.qsize() == 1
        ):
            self._early = (utterance, self._begin(utterance))
        return utterance

    async def clear(
        self, *, only_interruptible: bool = False, reason: str = "clear"
    ) -> list[Utterance]:
        """Stop speech now: cancel synthesis, drop queued text, send ``clear``.

        Stops every utterance not yet finished — the one being synthesised, ones whose audio is
        still playing in Twilio's buffer (their last mark has not come back), and queued ones —
        and what failed speech sent before failing, if it is still playing (that speech stays
        ``failed``). With ``only_interruptible`` (barge-in), nothing happens while a
        non-interruptible utterance (or what one sent before failing) is playing, and queued
        non-interruptible ones stay queued. ``reason`` is
        reported in the ``speech.interrupted`` events. Returns the utterances stopped.
        """
        active = [u for u in self._utterances.values() if not u.status.final]
        if only_interruptible and (
            any(u.status is SpeechStatus.SPEAKING and not u.interruptible for u in active)
            or any(not p.utterance.interruptible for p in self._draining.values())
        ):
            return []
        stopped = [u for u in active if u.interruptible or not only_interruptible]
        if not stopped and not self._draining:
            return []
        self._clearing += 1
        self._no_clear.clear()
        try:
            return await self._clear(stopped, reason)
        finally:
            self._clearing -= 1
            if not self._clearing:
                self._no_clear.set()

    async def _clear(self, stopped: list[Utterance], reason: str) -> list[Utterance]:
        # Kept (non-interruptible) utterances stay queued, in order, ahead of anything said
        # while this clear waits below. None of their audio can go out before the clear and be
        # dropped by it: the speaker waits for _no_clear before speaking what it takes.
        kept: list[Utterance] = []
        while not self._queue.empty():
            queued = self._queue.get_nowait()
            if queued not in stopped:
                kept.append(queued)
        for queued in kept:
            self._queue.put_nowait(queued)
        # Even when its utterance is kept: the voice's clear below may drop what it was making
        # (one Deepgram socket per call); the speaker makes it afresh when it gets there.
        await self._drop_early()
        task = self._current_task
        if task is not None and not task.done() and self._current in stopped:
            task.cancel()
            # Waited for, not awaited: how it ended is the speaker's to handle (it may end with
            # the error it was already raising — a socket closed under a send — when the
            # cancellation reaches it in its `finally`), not the clearer's to raise.
            await asyncio.wait({task})
        # One may have ended while this waited: played (its last mark echoed) or failed. It
        # keeps that end, and is not reported stopped. (Echoes after the clear count as flushed.)
        stopped = [u for u in stopped if not u.status.final]
        if self._state.start is None or self._closed:
            for utterance in stopped:
                if self._closed:
                    self._end_with_call(utterance)
                else:  # (before start: nothing was sent)
                    utterance.finish(SpeechStatus.CANCELLED)
            return stopped
        now = self._clock.now()
        self._state.cleared()
        self._stop_draining()  # their audio is dropped with the rest
        self._generation += 1
        self._pacer.reset()
        with contextlib.suppress(TransportClosed):
            await self._send(encode_clear(StreamSid(self.stream_sid)))
        with contextlib.suppress(TTSError):
            await self._provider.clear()
        stopped = [u for u in stopped if not u.status.final]  # the speaker ended it meanwhile
        for utterance in stopped:
            self._interrupt(utterance, now, reason)
            self._forget(utterance)
        return stopped

    async def hangup(self, *, after_speech: bool = False, grace: float = 30.0) -> None:
        """Close the media stream; with ``after_speech``, once no speech is left unfinished —
        what was queued, and what is said while this waits (a goodbye answering a hook's event)
        — and what failed speech sent has played, waiting at most ``grace`` seconds in all."""
        if after_speech:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    while True:
                        unfinished = [u for u in self._utterances.values() if not u.status.final]
                        for utterance in unfinished:
                            await utterance.wait()
                        if unfinished:
                            continue  # more may have been said meanwhile
                        if not self._draining:
                            break
                        await self._drained.wait()  # the audio of failed speech, still playing
        self._closed = True
        await self._transport.close(1000, "hangup")

    # -- the socket loop -------------------------------------------------------------------

    def open(self) -> None:
        """Begin the call ahead of :meth:`run`, from the callback that accepted its stream:
        warm the voice up and take inbound messages as they arrive (a :class:`DirectDelivery`
        transport), so ``connected`` and ``start`` are handled as they are read and the first
        words asked for then, rather than once ``run()``'s tasks have had their first turns —
        which, with hundreds of calls arriving together, is tens of milliseconds per turn.
        Idempotent; ``run()`` calls it. A session opened must then be run: ``run()`` is what
        ends the tasks a ``start`` handled here begins."""
        if self._opened:
            return
        self._opened = True
        if self._admit is None:
            # The voice opens its connection (if it keeps one per call) while Twilio is still
            # sending connected and start. (A stream that admission judges warms up once
            # admitted: a refused one should not cost a connection to the voice.)
            self._warm_up()
        # getattr, not isinstance: a runtime Protocol check costs tens of microseconds a call.
        deliver_to = getattr(self._transport, "deliver_to", None)
        if deliver_to is not None:
            deliver_to(self._handle_now)

    async def run(self) -> None:
        """Serve the call until ``stop``, the socket closes, the idle timeout or a refusal at
        ``start``; then release everything."""
        self.open()
        # The reader runs in its own task so the idle watchdog can end a receive that a dead peer
        # would leave pending until TCP gives up.
        reader = asyncio.create_task(self._read_loop(), name="media-reader")
        watchdog = asyncio.create_task(self._watch(), name="media-watchdog")
        try:
            await asyncio.wait({reader, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if watchdog.done() and not reader.done():
                if watchdog.result() == "no start":
                    self.closed_because = "no start"
                    log.warning(
                        "no start from Twilio within %.1f s of the stream opening: closing it",
                        self._start_timeout,
                        extra=self._ids(),
                    )
                    await self._transport.close(POLICY_VIOLATION, "no start")
                else:
                    self.closed_because = "idle timeout"
                    log.warning(
                        "no message from Twilio for %.1f s: closing the stream (idle_timeout)",
                        self._idle_timeout,
                        extra=self._ids(),
                    )
                    await self._transport.close(1000, "idle timeout")
            if reader.done():
                reader.result()  # a bug in the loop surfaces here, not as a lost task
        finally:
            for task in (reader, watchdog):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self._shutdown()

    async def _read_loop(self) -> None:
        while True:
            message = await self._transport.receive()
            if message is None:
                return
            self._last_inbound = self._clock.now()
            if self._followup is not None:
                await asyncio.wait({self._followup})
            if not await self._handle_message(message):
                return

    def _handle_now(self, message: str | bytes) -> bool:
        """Handle ``message`` at once if it is media or a mark (all but a few messages of a
        call), ``connected``, or a ``start`` that needs no admission; anything else, or
        anything while a barge-in clear is still running, is left for the reader (False). See
        :class:`DirectDelivery` for when a transport calls this."""
        if self._followup is not None or self._closed or type(message) is not str:
            return False
        if _utf8_size(message) > self._max_message_bytes:
            return False
        try:
            parsed = parse_message(message)
        except ProtocolError:
            return False  # the reader logs and counts it
        kind = type(parsed)
        if kind is Connected or (kind is Start and self._admit is None):
            # The call's opening, here too: its first words are asked for in the callback that
            # read its start rather than a loop iteration later, when the reader would run —
            # and when hundreds of calls arrive together, one iteration is tens of
            # milliseconds. (A start that admission judges is the reader's: a refusal closes
            # the socket and ends the call.)
            self._last_inbound = self._clock.now()
            opened = self._state.receive(parsed)
            if isinstance(opened, Started):
                self._on_start(opened.start)
            elif isinstance(opened, Rejected):
                self._reject(opened.reason, opened.event)
            return True
        if kind is not Media and kind is not Mark:
            return False
        self._last_inbound = self._clock.now()
        event = self._state.receive(parsed)
        if isinstance(event, MediaReceived):
            if self._heard_caller(event):
                self._followup = asyncio.create_task(
                    self._on_caller_speech(), name="media-barge-in"
                )
                self._tasks.add(self._followup)
                self._followup.add_done_callback(self._followup_done)
        elif isinstance(event, MarkPlayed | MarkFlushed):
            self._on_mark(event.name, played=isinstance(event, MarkPlayed))
        elif isinstance(event, Rejected):
            self._reject(event.reason, event.event)
        return True

    def _followup_done(self, task: asyncio.Task[None]) -> None:
        if self._followup is task:
            self._followup = None
        self._task_done(task)  # logs a failure
        if not task.cancelled() and task.exception() is not None and not self._closed:
            # Inline, the reader would have died of it and ended the call: end it here too.
            self.spawn(self._transport.close(1011, "internal error"), name="media-close")

    def _heard_caller(self, event: MediaReceived) -> bool:
        """Feed the caller's audio to barge-in; True when the caller has started speaking."""
        return self._barge_in is not None and self._barge_in.feed(event.media.payload)

    async def _watch(self) -> str:
        """Return why the stream is to be closed, on the injected clock: ``"no start"`` once
        ``start_timeout`` passed with no start, ``"idle timeout"`` once no inbound message
        arrived for ``idle_timeout``. Waits for good when neither can happen any more."""
        clock, idle = self._clock, self._idle_timeout
        no_start_by = clock.now() + self._start_timeout
        while True:
            now, waits = clock.now(), []
            if self._state.start is None:
                if now >= no_start_by:
                    return "no start"
                waits.append(no_start_by - now)
            if idle is not None:
                if now >= self._last_inbound + idle:
                    return "idle timeout"
                waits.append(self._last_inbound + idle - now)
            if not waits:
                await asyncio.get_running_loop().create_future()  # (cancelled by run())
            await clock.sleep(min(waits))

    async def _handle_message(self, message: str | bytes) -> bool:
        if isinstance(message, bytes):
            self._reject("binary frame (Twilio sends text frames only)", None)
            return True
        size = _utf8_size(message)
        if size > self._max_message_bytes:
            self._reject(
                f"message of {size} bytes over the {self._max_message_bytes}-byte limit", None
            )
            return True
        event = self._state.receive_text(message)
        if isinstance(event, MediaReceived):
            if self._heard_caller(event):
                await self._on_caller_speech()
        elif isinstance(event, MarkPlayed):
            self._on_mark(event.name, played=True)
        elif isinstance(event, MarkFlushed):
            self._on_mark(event.name, played=False)
        elif isinstance(event, Started):
            refusal = self._admit(event.start) if self._admit is not None else None
            if refusal is not None:
                self.closed_because = refusal
                log.warning("stream refused at start: %s", refusal, extra=self._ids())
                await self._transport.close(POLICY_VIOLATION, refusal)
                return False
            self._on_start(event.start)
        elif isinstance(event, DigitPressed):
            self._emit("dtmf", digit=event.dtmf.digit)
            if event.dtmf.digit in self._interrupt_digits:
                await self.clear(only_interruptible=True, reason="dtmf")
        elif isinstance(event, Rejected):
            self._reject(event.reason, event.event)
            if event.event == "start" and self._state.start is None:
                # Nothing of the stream can be served without its start (Twilio's always reads).
                # Closed, not kept open to log each message after it as "before 'start'".
                self.closed_because = f"invalid start: {event.reason}"
                log.warning("closing the stream: %s", self.closed_because, extra=self._ids())
                # (A close reason is at most 123 bytes of UTF-8.)
                reason = self.closed_because.encode()[:123].decode(errors="ignore")
                await self._transport.close(POLICY_VIOLATION, reason)
                return False
        elif isinstance(event, Stopped):
            log.info("stream stopped by Twilio", extra=self._ids())
            return False
        else:
            assert isinstance(event, StreamConnected)
        return True

    def _warm_up(self) -> None:
        """Warm the voice up in a context of its own naming this call, so that what its tasks
        log (a connect failing) carries the call's ids once start gives them."""
        context = contextvars.copy_context()
        context.run(log_as_call, self._log_ids)
        context.run(warm_up, self._provider)

    def _on_start(self, start: Start) -> None:
        self._log_ids.call_sid, self._log_ids.stream_sid = start.call_sid, start.stream_sid
        if self._admit is not None:
            self._warm_up()
        self._metrics.calls_started.inc()
        self.started_at = time.time()
        log.info(
            "stream started: tracks=%s format=%s/%d parameters=%s",
            ",".join(start.tracks),
            start.media_format.encoding,
            start.media_format.sample_rate,
            sorted(start.custom_parameters),
            extra=self._ids(),
        )
        self._speaker = asyncio.create_task(
            self._speak_loop(), name=f"speaker-{printable_id(start.call_sid)}"
        )
        self.started_event = self._emit("call.started", parameters=dict(start.custom_parameters))
        self._started.set()
        said = start.custom_parameters.get("say") if self._speak_parameter else None
        text = said or self._greeting
        if text and text.strip():
            try:
                self.say(text)
            except ValueError as exc:
                log.warning("not speaking the opening text: %s", exc, extra=self._ids())

    async def _on_caller_speech(self) -> None:
        self._emit("caller.speaking")
        stopped = await self.clear(only_interruptible=True, reason="barge-in")
        if stopped:
            log.info("caller barged in: speech cleared", extra=self._ids())

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> None:
        """Run ``coro`` as a task owned by this call (cancelled when it ends; errors logged),
        whose log lines (an application's hook among them) carry the call's ids."""
        context = contextvars.copy_context()
        context.run(log_as_call, self._log_ids)
        task = asyncio.create_task(coro, name=name, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "task %s of the call failed",
                task.get_name(),
                exc_info=task.exception(),
                extra=self._ids(),
            )

    def _reject(self, reason: str, event: str | None) -> None:
        self.rejected += 1
        self._metrics.protocol_errors.labels(_error_kind(reason, event)).inc()
        # Every one counted, the first few logged, then one line in REJECTS_LOGGED_EVERY: a
        # peer sending nothing but bad messages must not flood the log (nor block the loop on
        # a log reader that cannot keep up).
        count = self.rejected
        if count <= REJECTS_LOGGED or count % REJECTS_LOGGED_EVERY == 0:
            more = "" if count <= REJECTS_LOGGED else f" ({count} ignored in this call so far)"
            log.warning("ignored inbound message: %s%s", reason, more, extra=self._ids())

    def _on_mark(self, name: str, *, played: bool) -> None:
        parsed = parse_mark_name(name)
        if parsed is None:
            return
        _, utterance_id, index = parsed
        if self._draining and (playing := self._draining.get(utterance_id)) is not None:
            self._on_mark_after_failure(playing, name, index, played=played)
            return
        utterance = self._utterances.get(utterance_id)
        if utterance is None or not played or utterance.status.final:
            return
        sentence = utterance.sentences[index]
        if index + 1 < len(utterance.sentences) and utterance.sent_seconds[index + 1]:
            # The next sentence starts playing now. (If none of its audio was sent yet, it
            # starts when it is: _send_audio stamps that.)
            utterance.play_starts[index + 1] = self._clock.now()
        self._emit("speech.heard", utterance=utterance_id, sentence=index, text=sentence)
        if utterance.sentence_heard(index):
            self._emit("speech.done", utterance=utterance_id, text=utterance.text)
            self._forget(utterance)

    def _stop_draining(self) -> None:
        """No failed speech is playing any more (cleared, or the call ended)."""
        self._draining.clear()
        self._drained.set()

    def _on_mark_after_failure(
        self, playing: _StillPlaying, name: str, index: int, *, played: bool
    ) -> None:
        utterance = playing.utterance
        if played and index < playing.whole and utterance.heard_after_failing(index):
            text = utterance.sentences[index]
            self._emit("speech.heard", utterance=utterance.id, sentence=index, text=text)
        if name == playing.last_mark:
            del self._draining[utterance.id]
            if not self._draining:
                self._drained.set()

    # -- speaking ----------------------------------------------------------------------------

    async def _speak_loop(self) -> None:
        log_as_call(self._log_ids)  # and the voices' lines, in its tasks
        while True:
            utterance = await self._queue.get()
            self._held = utterance
            try:
                await self._no_clear.wait()  # at once unless a clear() is under way
            finally:
                self._held = None
            if utterance.status.final:
                await self._drop_early()
                continue
            self._current = utterance
            # Speaking from now, not from the task's first step: a barge-in clear in between
            # must see non-interruptible speech playing, or its voice clear would cut it.
            utterance.status = SpeechStatus.SPEAKING
            utterance.speaking_at = self._clock.now()
            task = asyncio.create_task(self._speak(utterance))
            self._current_task = task
            try:
                await asyncio.wait({task})
            finally:
                if not task.done():  # the speaker itself is being cancelled
                    task.cancel()
                    # Not `await task`: what it ends with (TransportClosed, say) would replace
                    # the speaker's cancellation, and the call's end would not expect it.
                    await asyncio.wait({task})
                if not task.cancelled():
                    task.exception()  # retrieved here even when the speaker is cancelled below
                self._current_task = None
                if self._current is utterance:
                    self._current = None
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is None:
                continue
            if isinstance(exc, TransportClosed):
                self._end_with_call(utterance)
            else:
                if not isinstance(exc, _SpeechFailed):  # (the producer logged that one)
                    log.error(
                        "speaking utterance %d failed: %r", utterance.id, exc, extra=self._ids()
                    )
                if utterance.status.final:  # a clear() ended it before the speaker woke to this
                    continue
                utterance.finish(SpeechStatus.FAILED, error=str(exc))
                self._emit("speech.failed", utterance=utterance.id, error=str(exc))
            self._forget(utterance)

    def _begin(self, utterance: Utterance) -> _Production:
        """Start synthesising ``utterance`` into a frame queue of its own."""
        # Made afresh (an early production a clear dropped): what failed before is forgotten
        utterance.error, utterance.apology_at = None, None
        frames: asyncio.Queue[tuple[int, bytes | None]] = asyncio.Queue(FRAME_BUFFER)
        return frames, start_task(self._produce(utterance, frames), name="producer")

    async def _drop_early(self) -> None:
        """Cancel the early producer, if there is one, and wait for it to end."""
        early, self._early = self._early, None
        if early is None:
            return
        producer = early[1][1]
        producer.cancel()
        try:
            await wait_cancelled(producer)
        except Exception as exc:  # a bug: logged as a failed utterance is, not raised here
            log.error("synthesis of utterance %d failed: %r", early[0].id, exc, extra=self._ids())

    async def _speak(self, utterance: Utterance) -> None:
        if self._early is not None and self._early[0] is utterance:
            (_, (frames, producer)), self._early = self._early, None
        else:
            await self._drop_early()  # another's (clear() drops it first, so never in practice)
            frames, producer = self._begin(utterance)
        try:
            await self._send_frames(utterance, frames)
        finally:
            if not producer.done():
                producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    async def _produce(
        self, utterance: Utterance, frames: asyncio.Queue[tuple[int, bytes | None]]
    ) -> None:
        """Stream each sentence's audio into ``frames``; (index, None) closes a sentence."""
        log_as_call(self._log_ids)  # (an early one is not the speaker's)
        index = 0
        try:
            for index, sentence in enumerate(utterance.sentences):
                converter = TwilioAudioConverter(self._provider.audio_format)
                # How long the caller can wait for this sentence without a gap: what is sent
                # and not yet played, plus what is produced and not yet sent.
                ahead = self._pacer.lead(self._clock.now()) + frames.qsize() * FRAME_SECONDS
                if index + 1 < len(utterance.sentences):
                    # Named now, so that a voice with a shared queue has the next sentence
                    # queued as this one is done (see prefetch in TTSProvider).
                    prefetch(self._provider, utterance.sentences[index + 1])
                stream = self._provider.stream(sentence, continuation=index > 0, ahead=ahead)
                try:
                    async for chunk in stream:
                        ready = converter.push(chunk)
                        if ready and self._sender_waits_on is frames and frames.empty():
                            # The sender is idle, waiting for exactly this audio: sent from
                            # here it leaves a loop iteration sooner than the sender would wake
                            # to it — the first audio of an utterance, above all.
                            ready = await self._send_now(utterance, index, ready)
                        for frame in ready:
                            await frames.put((index, frame))
                finally:
                    await aclose_stream(stream)
                for frame in converter.flush():
                    await frames.put((index, frame))
                await frames.put((index, None))
        except TTSError as exc:
            self._metrics.tts_errors.labels(exc.provider, exc.kind).inc()
            if exc.code != APOLOGY or exc.provider != "fallback":  # (the chain said so already)
                log.error("text-to-speech failed: %s", exc, extra=self._ids())
            utterance.error = str(exc)
            if exc.code == APOLOGY:  # what this sentence sent is the apology, not the sentence
                utterance.apology_at = index
            await frames.put((_FAILED, None))
            return
        except TransportClosed:
            # Under a direct send (see _send_now): the sender, waiting on these frames, ends the
            # utterance as if its own send had failed.
            await frames.put((_SOCKET_CLOSED, None))
            return
        except Exception as exc:  # a bug in a voice or the audio it sent: fail this utterance
            # only; the sender, waiting on these frames, would otherwise wait forever.
            log.exception("synthesising utterance %d failed", utterance.id, extra=self._ids())
            utterance.error = f"internal error: {exc!r}"
            await frames.put((_FAILED, None))
            return
        await frames.put((_END_OF_UTTERANCE, None))

    async def _send_now(self, utterance: Utterance, index: int, ready: list[bytes]) -> list[bytes]:
        """Send ``ready`` (frames of sentence ``index``), in messages of up to
        :data:`MAX_FRAMES_PER_MESSAGE` frames, as far as the lead has room — but only while the
        caller has less than a message's worth left to play (the first audio of an utterance, or
        after a gap): otherwise a loop iteration is no loss, and the sender's fuller messages
        are cheaper. Returns what is left, for the frame queue.

        All the lead allows goes out now, not a message now and the rest a loop iteration each:
        with a message's worth to play, a caller would hear a gap as soon as iterations slow to
        tens of milliseconds — as when a score of calls arrive together."""
        now = self._clock.now()
        if self._pacer.lead(now) >= FRAME_SECONDS * MAX_FRAMES_PER_MESSAGE:
            return ready
        room = 0
        while room < len(ready) and self._pacer.delay(now, FRAME_SECONDS * (room + 1)) == 0:
            room += 1
        if room:
            step = MAX_FRAMES_PER_MESSAGE
            batches = [ready[start : min(start + step, room)] for start in range(0, room, step)]
            await self._send_audio(utterance, index, batches, now)
        return ready[room:]

    async def _send_frames(
        self, utterance: Utterance, frames: asyncio.Queue[tuple[int, bytes | None]]
    ) -> None:
        clock, pacer = self._clock, self._pacer
        pending: tuple[int, bytes | None] | None = None
        marked = -1  # the last sentence whose mark was sent
        while True:
            if pending is not None:
                index, frame = pending
            elif not frames.empty():
                index, frame = frames.get_nowait()
            else:
                self._sender_waits_on = frames
                try:
                    index, frame = await frames.get()
                finally:
                    self._sender_waits_on = None
            pending = None
            if frame is None:
                if index == _END_OF_UTTERANCE:
                    return
                if index == _FAILED:
                    # (A socket closed under the mark: the speech still failed, as reported.)
                    with contextlib.suppress(TransportClosed):
                        await self._mark_failed(utterance, marked)
                    raise _SpeechFailed(utterance.error or "text-to-speech failed")
                if index == _SOCKET_CLOSED:
                    raise TransportClosed("the media socket closed")
                name = mark_name(self._generation, utterance.id, index)
                self._state.mark_sent(name)
                await self._send(encode_mark(StreamSid(self.stream_sid), name))
                marked = index
                continue
            now = clock.now()
            # Frames go out MAX_FRAMES_PER_MESSAGE at a time (100 ms of audio a message) once
            # the lead has room for them all: five times fewer messages than one per 20 ms, for
            # the same audio and the same bound on the lead. Fewer are sent when fewer are ready
            # (the first frame of an utterance never waits for company), or when max_lead is
            # under 100 ms: waiting for room it never has would let the caller's buffer run dry.
            wait = pacer.delay(now, FRAME_SECONDS * min(self._message_frames, 1 + frames.qsize()))
            if wait > 0:
                await clock.sleep(wait)
                now = clock.now()
            # Then as many more messages as are ready and the lead has room for, each once it
            # has room for a whole one (as above), all sent together (see _send_audio).
            batch = [frame]
            batches, taken = [batch], 1
            while not frames.empty():
                if len(batch) == MAX_FRAMES_PER_MESSAGE:
                    whole = min(self._message_frames, frames.qsize())
                    if pacer.delay(now, FRAME_SECONDS * (taken + whole)) > 0:
                        break
                    batch = []
                    batches.append(batch)
                elif pacer.delay(now, FRAME_SECONDS * (taken + 1)) > 0:
                    break
                nxt = frames.get_nowait()
                if nxt[1] is None or nxt[0] != index:
                    pending = nxt
                    break
                batch.append(nxt[1])
                taken += 1
            if not batch:  # (a message begun for frames that were not this sentence's)
                batches.pop()
            await self._send_audio(utterance, index, batches, now)

    async def _mark_failed(self, utterance: Utterance, marked: int) -> None:
        """``utterance`` failed after sentence ``marked`` was marked (-1: none was): keep it in
        ``_draining`` until the audio it sent has played. Audio sent after that mark (a sentence
        cut by the failure, or the apology) gets a mark of its own, so that its end is known too
        — a mark that does not make that sentence heard."""
        whole = marked + 1
        cut = [i for i in range(whole, len(utterance.sentences)) if utterance.sent_seconds[i]]
        last = cut[-1] if cut else marked
        if last < 0:
            return
        name = mark_name(self._generation, utterance.id, last)
        if cut:
            self._state.mark_sent(name)
            await self._send(encode_mark(StreamSid(self.stream_sid), name))
        if name in self._state.pending_marks:  # (not played yet)
            self._draining[utterance.id] = _StillPlaying(utterance, name, whole)
            self._drained.clear()

    async def _send_audio(
        self, utterance: Utterance, index: int, batches: list[list[bytes]], now: float
    ) -> None:
        """Send each of ``batches`` (frames of sentence ``index``) as one media message at
        ``now``, and account for them: the lead, the sentence's play start and length, the
        counters — for those written, should the socket close under the send.

        The messages are handed to the socket together, in one write (on the native socket).
        Written one by one, the first left at once and, on a loaded machine, the rest reached
        the caller 5-70 ms later — the kernel holding small writes back behind one in flight,
        we think (TCP autocorking) — and a caller sent a second of audio heard its first 100 ms,
        a gap, then the rest."""
        if utterance.play_starts[index] is None:
            utterance.play_starts[index] = now + self._pacer.lead(now)
        sid = StreamSid(self.stream_sid)
        texts = [encode_media(sid, b"".join(batch)) for batch in batches]
        try:
            if len(texts) == 1:
                await self._send(texts[0])
            else:
                await self._send_all(texts)
        except TransportClosed as exc:
            if exc.sent:  # (heard, or on its way: reported as the caller's)
                self._sent_audio(utterance, index, batches[: exc.sent], now)
            raise
        self._sent_audio(utterance, index, batches, now)

    def _sent_audio(
        self, utterance: Utterance, index: int, batches: list[list[bytes]], now: float
    ) -> None:
        frames = sum(len(batch) for batch in batches)
        seconds = FRAME_SECONDS * frames
        self._pacer.sent(now, seconds)
        utterance.sent_seconds[index] += seconds
        self.frames_sent += frames
        self._metrics.frames_sent.inc(frames)
        if utterance.first_audio_at is None:
            self._first_audio(utterance, now)

    def _first_audio(self, utterance: Utterance, now: float) -> None:
        utterance.first_audio_at = now
        # From its turn, not from when it was asked for: speech queued behind other speech
        # waits by design, and that wait is no voice's latency.
        latency = now - (utterance.speaking_at or utterance.requested_at)
        self._metrics.first_audio.observe(latency)
        log.info(
            "first audio of utterance %d after %.0f ms",
            utterance.id,
            latency * 1000,
            extra=self._ids(),
        )
        self._emit(
            "speech.started",
            utterance=utterance.id,
            text=utterance.text,
            firstAudioMs=round(latency * 1000, 1),
        )

    async def _send(self, text: str) -> None:
        async with self._send_lock:
            await self._transport.send(text)

    async def _send_all(self, texts: Sequence[str]) -> None:
        async with self._send_lock:
            await self._transport.send_all(texts)

    # -- ending ------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            # Bounded: a hook that swallows its cancellation must not keep the call from ending
            # (its slot, its voice, call.stopped); it is left running, and named in the log.
            _, stuck = await asyncio.wait(set(self._tasks), timeout=self.task_grace)
            for task in stuck:
                log.error(
                    "task %s of the call did not end within %g s of being cancelled; the call "
                    "ends without it",
                    task.get_name(),
                    self.task_grace,
                    extra=self._ids(),
                )
        speaker, self._speaker = self._speaker, None
        if speaker is not None:
            speaker.cancel()
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await speaker
            except Exception as exc:  # a bug: logged, and the call still ends and is released
                log.error("the speaker failed: %r", exc, extra=self._ids())
        await self._drop_early()
        for utterance in list(self._utterances.values()):
            self._end_with_call(utterance)
        self._stop_draining()  # (a hangup(after_speech) may be waiting on it)
        try:
            await self._provider.aclose()
        except Exception as exc:  # a bug in a voice: logged; the call still ends and says so
            log.error("closing the voice failed: %r", exc, extra=self._ids())
        if self._started.is_set():
            self._emit("call.stopped", framesSent=self.frames_sent, rejected=self.rejected)
        log.info(
            "call ended: %d frames sent, %d bad messages ignored",
            self.frames_sent,
            self.rejected,
            extra=self._ids(),
        )
        # No event comes after call.stopped. A listener is often a closure over this session
        # (the hooks' is): let go of them, so that they and the session are freed by reference
        # counting when the call's last reference goes, not left in a cycle for the collector.
        self._ended = True
        self._listeners.clear()

    def _end_with_call(self, utterance: Utterance) -> None:
        """End ``utterance`` because the call ended: failed if its voice had failed (the speaker
        had not ended it yet), cancelled if none of its audio was sent, else interrupted, with
        what the caller heard (as a clear reports it; the call's hooks are not called for it,
        since their tasks end with the call)."""
        if utterance.status.final:
            return
        if utterance.error is not None:
            utterance.finish(SpeechStatus.FAILED, error=utterance.error)
            self._emit("speech.failed", utterance=utterance.id, error=utterance.error)
            return
        if utterance.first_audio_at is None:
            utterance.finish(SpeechStatus.CANCELLED, error="the call ended")
            return
        self._interrupt(utterance, self._clock.now(), "call-ended")

    def _interrupt(self, utterance: Utterance, now: float, reason: str) -> None:
        """End ``utterance`` as stopped at ``now`` and report what was heard of it — or, if its
        voice had failed (the apology or the audio before the failure was stopping), that it
        failed, as the speaker would have once that audio was sent."""
        record = utterance.interrupt(now)
        if utterance.status is SpeechStatus.FAILED:
            self._emit("speech.failed", utterance=utterance.id, error=utterance.error)
            return
        self._emit(
            "speech.interrupted",
            utterance=utterance.id,
            text=utterance.text,
            reason=reason,
            **record.to_dict(),
        )

    def _forget(self, utterance: Utterance) -> None:
        # Finished utterances are dropped so a long call does not grow without bound.
        self._utterances.pop(utterance.id, None)

    def _emit(self, kind: EventType, **data: Any) -> CallEventRecord:
        record = CallEventRecord(kind, self.call_sid, self.stream_sid, time.time(), data)
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception:  # a broken listener must not break the call
                log.exception("event listener failed", extra=self._ids())
        return record

    def _ids(self) -> dict[str, str]:
        return {"call_sid": self.call_sid or "-", "stream_sid": self.stream_sid or "-"}
