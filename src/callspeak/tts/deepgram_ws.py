"""Deepgram Aura over the TTS WebSocket: one socket per call, one ``Flush`` per utterance.

https://developers.deepgram.com/docs/tts-websocket — client sends ``Speak`` (≤2000 characters),
``Flush``, ``Clear``, ``Close``; the server answers binary audio, ``Metadata``, ``Flushed``,
``Cleared`` and ``Warning``, and reports errors as a refused handshake or a close frame.

Contract of :class:`DeepgramWebSocketProvider` (on top of :mod:`callspeak.tts.base`):

* The socket (``encoding=mulaw&sample_rate=8000``) opens on the first ``stream()``, or earlier
  with ``warm_up()``: the session calls it as the call's stream is accepted, so Deepgram's
  handshake (TCP, TLS, upgrade) runs while Twilio is still sending ``start``. The first
  ``stream()`` waits for that connect and raises what it raised. Every connect, a stream's own
  too, runs as a task of its own: cancelling the stream waiting for it (a barge-in) does not
  stop it, and the socket it opens serves the next utterance; ``aclose()`` does not stop it
  either (see below). Aborting a handshake under way would free its slot while Deepgram may
  still count the socket.
* A ``stream()`` that finds no socket open queues its ``Speak`` and ``Flush`` for the socket being
  opened, which writes them in the callback that reads its handshake response
  (:mod:`callspeak.tts.ws_send_on_open`) — unless the stream was cleared or closed by then. The
  utterance counts as in flight from then, so a stream cancelled before it resumes still has it
  cleared. If that socket fails to open, opens without writing them, or has closed by the time
  the stream resumes, they are sent the usual way (on a new socket if need be).
* A provider closed while a socket opens closes that socket, with a close handshake, once it
  has opened (or gives up at the next retry), rather than keeping it; the service owns that
  connect meanwhile, and its ``aclose()`` cancels it.
* ``stream(text)`` sends the text as ≤2000-character ``Speak`` messages and one ``Flush``, then
  yields audio until ``Flushed``. No audio and no ``Flushed`` for ``receive_timeout`` s (for
  ``stall_timeout`` s once audio has come) → the socket is dropped and a retryable
  :class:`TTSError` ("stalled") raised; a close mid-utterance raises a :class:`TTSError` naming
  the close code and reason: retryable, unless the code says the request itself was at fault
  (:data:`REQUEST_FAULT_CLOSE_CODES`: the same text on a new socket would be refused again).
* Stale audio never leaks into the next utterance: ``clear()`` — and closing a ``stream()`` before
  ``Flushed`` — sends ``Clear``; the next ``stream()`` first discards everything up to
  ``Cleared`` (or replaces the socket if ``Cleared`` does not come). ``clear()`` during an active
  ``stream()`` also ends that stream quietly.
* A handshake refused with 401/403 raises :class:`TTSAuthError`, marks the service unhealthy and
  is never retried (no reconnect loop on bad credentials): later connects fail at once with it,
  until ``auth_recheck`` seconds after the refusal, when one connect tries the key again
  (:class:`~callspeak.tts.refused_key.RefusedKey`); a handshake accepted makes the service
  healthy again. A handshake refused with 402 (no credit left) is treated the same way. One
  refused with 429 (too many at once for the project) raises at once a :class:`TTSError` that
  is not retryable, without another attempt, and no call opens a socket until the rest is over
  (:mod:`~callspeak.tts.too_many_requests`): its connects fail at once; sockets already open
  go on speaking.
  Other connect failures are retried ``max_reconnects`` times with exponential
  backoff (``backoff`` × 2ⁿ, each delay drawn from half to one and a half times that, so calls
  whose sockets Deepgram dropped together do not reconnect in step), then raise a
  :class:`TTSError` that is not retryable: the retrying is done, and a fallback should take over
  at once rather than repeat it.
  Each attempt has ``connect_timeout`` (2.5 s: TCP, TLS and the upgrade take a few round trips),
  and a ``stream()`` waits at most twice that in all for its socket — room for one hung address
  and the next, where hung attempts would otherwise add up to four — then raises such an error.
  An address whose connect fails or hangs is tried last by the next attempt.
* Flush limit (20 per 60 s): flushes are counted per provider in a sliding window of 60 s plus
  a margin (:data:`FLUSH_MARGIN`: our clock reads when a flush is sent, Deepgram's when it
  arrives). When a 21st would be sent, ``stream()`` *waits* for the window to free a slot if that
  takes at most ``flush_wait`` s — or longer, while the call still has more audio to play than
  the wait (``ahead``, less :data:`FLUSH_AHEAD_MARGIN`): a wait nobody hears — else raises a
  retryable ``TTSError(code="FLUSH_LIMIT")`` at once so the caller can fall back (e.g. to
  REST). A ``Warning`` about flushes during an utterance (its ``Flush`` ignored: Deepgram
  counted more) raises ``TTSError(code="FLUSH_LIMIT")``, not retryable, at once rather than a
  stall later; the utterance's text is cleared. The provider asks to be given texts of at least
  :data:`STREAM_MIN_CHARS` (``stream_min_chars``): the session groups an utterance's short
  sentences to that, so a call speaking without a pause flushes about as often as the limit
  allows, and the waits above fall within audio still to play.
* A socket older than ``max_connection_age`` (55 min; Deepgram allows 60) is closed and replaced
  before the next utterance, never during one, nor during a 429's rest.
* With ``max_concurrent`` (Deepgram's limit of streaming sockets per project), a call holds one
  of the service's :attr:`~DeepgramWebSocketService.slots` from opening its socket until the
  socket is dropped, the provider closed (a close cut short included; while its stream's own
  connect is under way, until that connect has ended, closing the socket it opened), or —
  while the call is idle — the socket found closed by Deepgram or the network. A call that
  finds every slot taken opens none: ``at_capacity()`` tells a fallback chain to skip the voice
  for it, quietly (one warning a minute in all), and a connect raises a :class:`TTSError` that
  is not retryable (``code="CONCURRENCY_LIMIT"``). It does not wait: a socket lasts as long as
  its call.

Thin client on ``websockets`` rather than ``deepgram-sdk``: four messages do not justify an SDK
whose async socket layer is built on the deprecated ``websockets.legacy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from callspeak.audio.format import TWILIO_FORMAT, AudioFormat
from callspeak.tasks import start_task, wait_cancelled
from callspeak.tts.base import CONCURRENCY_LIMIT, TTSAuthError, TTSError
from callspeak.tts.base import FLUSH_LIMIT as FLUSH_LIMIT_CODE
from callspeak.tts.deepgram_errors import parse_error
from callspeak.tts.refused_key import RefusedKey
from callspeak.tts.request_slots import RequestSlots
from callspeak.tts.resolved_host import (
    AddrInfo,
    Resolve,
    ResolvedHost,
    getaddrinfo_tcp,
    needs_lookup,
)
from callspeak.tts.sentences import DEFAULT_CHUNK_LIMIT, chunk_text, has_words
from callspeak.tts.tls import client_tls_context
from callspeak.tts.too_many_requests import TooManyRequests, note_refusal
from callspeak.tts.ws_send_on_open import SendOnOpenConnection

__all__ = [
    "FLUSH_AHEAD_MARGIN",
    "FLUSH_LIMIT",
    "FLUSH_MARGIN",
    "FLUSH_WINDOW",
    "STREAM_MIN_CHARS",
    "REQUEST_FAULT_CLOSE_CODES",
    "DeepgramWebSocketProvider",
    "DeepgramWebSocketService",
    "speak_texts",
]

logger = logging.getLogger(__name__)

_NAME = "deepgram-ws"

#: Close codes by which Deepgram says the request itself was at fault, so sending it again on a
#: new socket would be refused the same way: 1003 (a message it cannot take), 1007 (text not
#: valid UTF-8), 1008 (a message against its rules: DATA-0000/0001), 1009 (a message too big:
#: BIG-0000/0001). Its own trouble (1011 NET-…, 1006, 1001) is worth the one retry.
REQUEST_FAULT_CLOSE_CODES = frozenset({1003, 1007, 1008, 1009})
FLUSH_LIMIT = 20
FLUSH_WINDOW = 60.0
#: Seconds a flush stays counted beyond ``FLUSH_WINDOW``: the first flush of a window may take
#: longer to reach Deepgram than the one sent as it leaves, and Deepgram would ignore that one.
FLUSH_MARGIN = 1.0
#: Seconds of a call's audio still to play (``ahead``) kept free when waiting for the flush
#: limit beyond ``flush_wait``: room for Deepgram's first byte after the wait.
FLUSH_AHEAD_MARGIN = 0.5
#: The shortest text this voice asks to be given (the session groups short sentences to it):
#: about FLUSH_WINDOW / FLUSH_LIMIT = 3 s of speech at some 16 characters a second, so a call
#: speaking without a pause asks for at most about FLUSH_LIMIT texts a minute.
STREAM_MIN_CHARS = 48
_FLUSH = json.dumps({"type": "Flush"})
_CLEAR = json.dumps({"type": "Clear"})
_CLOSE = json.dumps({"type": "Close"})
_FLUSH_IGNORED = "Warning (flush ignored)"  # what _handle_event calls a flush-limit Warning

Connect = Callable[..., Awaitable[ClientConnection]]


class DeepgramWebSocketService:
    """Process-wide settings and health for Deepgram TTS WebSockets; sockets belong to providers.

    ``connect`` replaces :func:`websockets.asyncio.client.connect` (same call shape); ``clock``
    and ``sleep`` drive the flush window, socket age, backoff and how long a looked-up address is
    kept. Unless a proxy is set or the URL names an IP address, every socket connects to the
    addresses :attr:`resolved_host` keeps (``resolve`` looks them up), tried in order as
    asyncio's ``create_connection`` would, while the handshake's ``Host`` and TLS's server name
    stay the URL's host.
    """

    name = _NAME

    def __init__(
        self,
        api_key: str,
        *,
        model: str = "aura-2-thalia-en",
        ws_url: str = "wss://api.deepgram.com",
        receive_timeout: float = 5.0,
        stall_timeout: float | None = None,
        max_reconnects: int = 3,
        backoff: float = 0.2,
        connect: Connect | None = None,
        connect_timeout: float = 2.5,
        flush_wait: float = 3.0,
        max_connection_age: float = 55 * 60.0,
        auth_recheck: float = 60.0,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        resolve: Resolve = getaddrinfo_tcp,
        max_concurrent: int | None = None,
    ) -> None:
        query = urlencode({"model": model, "encoding": "mulaw", "sample_rate": "8000"})
        self.url = f"{ws_url.rstrip('/')}/v1/speak?{query}"
        self.headers = {"Authorization": f"Token {api_key}"}
        #: The proxy for ``url`` from the environment (``wss_proxy``, ``https_proxy``, … and
        #: ``no_proxy``, as websockets reads them), looked up once: per connect, the lookup was
        #: ~40 % of opening a socket's CPU when 200 calls arrived together.
        self.uri = uri = parse_uri(self.url)
        self.proxy: str | None = get_proxy(uri)
        #: The TLS context of every ``wss://`` socket, made once: given ``ssl=True``, asyncio
        #: makes a context per connection, loading the whole CA store each time (tens of ms of
        #: the event loop's CPU with OpenSSL 3, for every call's socket).
        self.ssl: ssl.SSLContext | None = client_tls_context() if uri.secure else None
        #: The URL's host looked up once for the sockets opened within a few seconds, rather than
        #: by websockets on every connect (None: a proxy resolves it, or it is an IP address).
        self.resolved_host: ResolvedHost | None = None
        if self.proxy is None and needs_lookup(uri.host):
            self.resolved_host = ResolvedHost(uri.host, uri.port, resolve=resolve, clock=clock)
        self.receive_timeout, self.connect_timeout = receive_timeout, connect_timeout
        #: The longest silence between an utterance's first audio and its ``Flushed``.
        self.stall_timeout = receive_timeout if stall_timeout is None else stall_timeout
        self.max_reconnects, self.backoff, self.flush_wait = max_reconnects, backoff, flush_wait
        self.jitter = jitter  # a number in [0, 1): where each backoff delay falls in its range
        self.max_connection_age, self.clock, self.sleep = max_connection_age, clock, sleep
        self.connect: Connect = connect if connect is not None else _default_connect
        self.refused_key = RefusedKey(auth_recheck, clock)
        #: The rest after Deepgram refused a handshake with 429 (too many at once): no socket is
        #: opened meanwhile, while the sockets open go on speaking (so no ``rest_remaining()`` here,
        #: which would make a fallback chain skip this voice for calls whose socket is open).
        self.too_many_requests = TooManyRequests(clock)
        self._providers: weakref.WeakSet[DeepgramWebSocketProvider] = weakref.WeakSet()
        self._adopted: set[asyncio.Task[Any]] = set()  # closed providers' connects (adopt())
        #: Sockets open or being opened, at most ``max_concurrent`` (None: no limit): Deepgram
        #: limits its streaming sockets per project. A socket lives as long as its call, so a
        #: call finding every slot taken does not wait for one: the next voice speaks for it.
        self.slots = RequestSlots(
            max_concurrent,
            _NAME,
            clock=clock,
            what=("socket", "sockets"),
            state="open (one a call)",
            then="a call without one does not open one, and speaks with the next voice until"
            " a socket closes",
        )

    @property
    def healthy(self) -> bool:
        return self.refused_key.error is None

    def mark_unhealthy(self, error: TTSAuthError) -> None:
        """Remember refused credentials: later connects fail fast with ``error`` until
        :meth:`recheck_due`."""
        self.refused_key.refuse(error)

    def recheck_due(self) -> bool:
        """Refused at least ``auth_recheck`` seconds ago: worth trying the key again."""
        return self.refused_key.due()

    def mark_accepted(self) -> None:
        """A handshake was accepted: healthy again."""
        if self.refused_key.accept():
            logger.info("deepgram-ws: the API key is accepted again; calls use Deepgram again")

    def slot_free(self) -> bool:
        """Whether a socket may be opened now: a slot of ``max_concurrent`` is free, once any
        held for a socket that has closed while its call was idle are given back (looked for
        only when every slot is taken)."""
        if not self.slots.full():
            return True
        for provider in list(self._providers):
            provider.release_if_closed()
        return not self.slots.full()

    async def start(self) -> None:
        """Nothing to warm up: sockets open per call, on first use."""

    def open(self) -> DeepgramWebSocketProvider:
        provider = DeepgramWebSocketProvider(self)
        self._providers.add(provider)
        return provider

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """Own a closed provider's connect until it ends by itself (see its ``aclose()``);
        :meth:`aclose` cancels those still under way."""
        self._adopted.add(task)
        task.add_done_callback(self._adopted.discard)

    async def aclose(self) -> None:
        """Close every provider still open, and stop the connects of closed ones. Idempotent."""
        for provider in list(self._providers):
            await provider.aclose()
        for task in list(self._adopted):
            task.cancel()
            with contextlib.suppress(Exception):  # of no use now, and logged as it ended
                await wait_cancelled(task)
        if self.resolved_host is not None:
            await self.resolved_host.aclose()


async def _default_connect(url: str, **kwargs: Any) -> ClientConnection:
    return await connect(url, **kwargs)


class DeepgramWebSocketProvider:
    """One call's Deepgram voice over one WebSocket. See the module docstring for the contract."""

    name = _NAME
    audio_format: AudioFormat = TWILIO_FORMAT
    stream_min_chars = STREAM_MIN_CHARS  # (see callspeak.tts.base.TTSProvider)

    def __init__(self, service: DeepgramWebSocketService) -> None:
        self._svc = service
        self._ws: ClientConnection | None = None
        self._opened_at = 0.0
        self._flushes: deque[float] = deque()
        self._pending_clears = 0  # Clears sent whose Cleared has not been read yet
        self._in_utterance = False  # Flush sent, Flushed not read, not cleared
        self._streaming = False
        self._interrupted = False  # clear()/aclose() asked the active stream to stop
        self._deadline: asyncio.Timeout | None = None  # the recv in flight
        self._closed = False
        self._warming: asyncio.Task[ClientConnection] | None = None  # the connect under way
        self._closing: asyncio.Future[None] | None = None  # done by aclose(): ends waits for it
        self._slot = False  # holds one of the service's slots (a socket open or opening)
        self._connecting = False  # a _connect() is under way (it gives the slot back if it fails)
        self._on_open: list[str] = []  # an utterance's messages, for the socket being opened
        self._sent_on_open: ClientConnection | None = None  # the socket that wrote them
        # The same, kept for _connect when the stream has ended: it counts what was written
        self._written_on: ClientConnection | None = None
        self.request_id: str | None = None  #: from the current socket's Metadata

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        """Audio of ``text`` until ``Flushed``. One active stream per provider."""
        chunks = speak_texts(text)
        if not chunks:
            return
        if self._streaming:
            raise RuntimeError("DeepgramWebSocketProvider streams one text at a time")
        self._check_open()
        self._streaming, self._interrupted = True, False
        try:
            if self._ws is None:  # the socket to be opened has no stale audio: send as it opens
                await self._respect_flush_limit(ahead)
                if self._interrupted:
                    return
                self._on_open = _messages(chunks)
            ws = await self._prepare()
            # Sent as it opened, and _connect counted it (a socket that closed since gets it again)
            if self._sent_on_open is not ws or ws.state is not State.OPEN:
                self._on_open = []
                await self._respect_flush_limit(ahead)
                if self._interrupted:
                    return
                ws = await self._send_utterance(ws, chunks)
            async for audio in self._receive(ws, expect_audio=has_words(text)):
                yield audio
        finally:
            self._streaming, self._on_open, self._sent_on_open = False, [], None
            if self._in_utterance and not self._closed:
                await self._send_clear()  # abandoned mid-utterance: stop it, drain later

    def rest_remaining(self) -> float:
        """Seconds this call cannot speak on Deepgram: a 429's rest, while it has no socket
        open (none may be opened meanwhile); 0 with one open. A fallback chain skips the voice
        for this call meanwhile, as it skips the REST voice (see
        :func:`~callspeak.tts.base.rest_remaining`)."""
        ws = self._ws
        if ws is not None and ws.state is State.OPEN:
            return 0.0
        return self._svc.too_many_requests.remaining()

    def at_capacity(self) -> bool:
        """True when this call has no socket and may not open one: every slot of the limit
        (``max_concurrent``) is another call's. A fallback chain skips the voice for this call
        meanwhile (see :func:`~callspeak.tts.base.at_capacity`)."""
        if self._slot or self._svc.slot_free():
            return False
        self._svc.slots.note_full()  # (once a minute: the chain then skips the voice quietly)
        return True

    def warm_up(self) -> None:
        """Start connecting now, in the background, unless a socket is open or opening (or the
        credentials were refused, the provider is closed, or a stream is connecting itself). On
        Python 3.12+ the connect begins before this returns (:func:`~callspeak.tasks.start_task`)
        when the host's addresses are known."""
        if self._closed or self._ws is not None or self._warming is not None or self._streaming:
            return
        if self._svc.refused_key.error is not None or self._svc.too_many_requests.resting():
            return  # the first stream() raises it (or the rest's), with no connect attempt
        if self.at_capacity():
            return  # (the fallback chain skips this voice for the call, quietly)
        self._start_connect(ahead_of_speech=True)

    def _start_connect(self, *, ahead_of_speech: bool) -> asyncio.Task[ClientConnection]:
        """Open a socket as a task of its own (``self._warming``), for warm_up() or a stream:
        a stream cancelled while it waits (a barge-in) leaves the connect running, so the
        socket it opens — one Deepgram may already count — serves the next utterance, and its
        slot is not handed to another call while Deepgram may still count it."""
        task = start_task(self._connect(), name="deepgram-ws-connect")
        self._warming = task
        task.add_done_callback(functools.partial(self._connect_ended, ahead=ahead_of_speech))
        return task

    def _connect_ended(self, task: asyncio.Task[ClientConnection], *, ahead: bool) -> None:
        # Forgotten once done: its socket is self._ws by now; a refused key stays known to the
        # service, and any other failure is tried afresh by the next stream().
        if self._warming is task:
            self._warming = None
        if task.cancelled() or (error := task.exception()) is None:
            return
        if self._closed:
            # The call ended while it connected: nobody needs the socket (closed once open, as
            # it should be), and any attempt that failed on the way was logged as it failed.
            return
        if isinstance(error, TTSError) and error.code == CONCURRENCY_LIMIT:
            # Another call took the last slot between this call's check and its connect's
            # first step (an iteration later on Python 3.11): the limit's own once-a-minute
            # warning, as when the check itself finds every slot taken — not one per call.
            self._svc.slots.note_full()
        elif ahead:
            logger.warning("deepgram-ws: opening the socket ahead of speech failed: %s", error)
        else:  # (the stream that waited for it raised it, or was cancelled)
            logger.debug("deepgram-ws: opening a socket failed: %s", error)

    async def clear(self) -> None:
        """Drop the utterance in flight; its audio is discarded up to ``Cleared`` before the next
        ``stream()`` starts. Returns without waiting for ``Cleared``. No-op when idle."""
        if self._closed:
            return
        if self._streaming:
            self._interrupt()
        if self._in_utterance:
            await self._send_clear()

    async def aclose(self) -> None:
        """Send ``Close``, close the socket and end any active stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._interrupt()
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
        ws: ClientConnection | None = None
        try:
            warming, self._warming = self._warming, None
            if warming is not None and not warming.done():
                # Not cancelled: cancelling would abort a handshake Deepgram may already count,
                # and free its slot for another call's at once (a 429 for one too many). It ends
                # by itself — a socket it opens is closed with a handshake, its slot given back
                # then — owned meanwhile by the service.
                self._svc.adopt(warming)
            ws, self._ws = self._ws, None
            if ws is not None:
                with contextlib.suppress(ConnectionClosed, TimeoutError):  # (not reading)
                    await self._bounded(ws.send(_CLOSE))
                await self._shut(ws)  # nothing else will: it is no longer self._ws
        except BaseException:
            # Cut short (cancelled, as a call's end can be): no socket is left open, unowned.
            ws, self._ws = ws or self._ws, None
            if ws is not None:
                ws.transport.abort()
            raise
        finally:
            # (a later aclose() returns at once: now or never) — unless a connect is under way:
            # its socket may yet reach Deepgram, and be counted there, before that connect ends
            # (closing it); the connect gives the slot back then.
            if not self._connecting:
                self._give_slot_back()

    # -- helpers -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TTSError(_NAME, "provider is closed", retryable=False)

    def _interrupt(self) -> None:
        self._interrupted = True
        if self._deadline is not None:
            with contextlib.suppress(RuntimeError):  # already expiring or exited
                self._deadline.reschedule(asyncio.get_running_loop().time())

    def _error(self, message: str, **kwargs: Any) -> TTSError:
        if self._closed:
            return TTSError(_NAME, "provider closed while streaming", retryable=False)
        return TTSError(_NAME, message, retryable=True, request_id=self.request_id, **kwargs)

    async def _bounded(self, awaitable: Awaitable[Any]) -> None:
        async with asyncio.timeout(self._svc.receive_timeout):
            await awaitable

    async def _shut(self, ws: ClientConnection) -> None:
        """Close ``ws`` politely if it answers quickly, else abort the transport."""
        try:
            async with asyncio.timeout(min(1.0, self._svc.receive_timeout)):
                await ws.close()
        except (TimeoutError, OSError):
            ws.transport.abort()

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        self._in_utterance, self._pending_clears = False, 0
        try:
            if ws is not None:
                await self._shut(ws)
        except BaseException:
            if ws is not None:
                ws.transport.abort()  # cut short: not left open, unowned
            raise
        finally:
            if self._ws is None:  # (not replaced meanwhile)
                self._give_slot_back()

    def release_if_closed(self) -> None:
        """Give back the slot of a socket that closed while the call was idle (Deepgram's side,
        or the network): no longer counted by Deepgram, it must not keep another call from
        opening one. The call's next text opens a socket again, if a slot is free then."""
        ws = self._ws
        if self._slot and not self._streaming and ws is not None and ws.state is State.CLOSED:
            self._give_slot_back()

    def _take_slot(self) -> None:
        """Hold a slot for the socket about to be opened, or raise (not retryable): every slot
        is taken."""
        if self._slot:
            return
        self._svc.slot_free()  # (any slot of a socket closed meanwhile given back first)
        slots = self._svc.slots
        if not slots.try_acquire():
            raise TTSError(
                _NAME,
                f"not opening a socket: the limit of {slots.limit} open at once"
                " (CALLSPEAK_DEEPGRAM_MAX_CONCURRENT) is reached",
                retryable=False,
                code=CONCURRENCY_LIMIT,
            )
        self._slot = True

    def _give_slot_back(self) -> None:
        if self._slot:
            self._slot = False
            self._svc.slots.release()

    async def _recv(self, ws: ClientConnection, when: float) -> str | bytes:
        async with asyncio.timeout_at(when) as self._deadline:
            try:
                return await ws.recv()
            finally:
                self._deadline = None

    async def _send_clear(self) -> None:
        ws = self._ws
        self._in_utterance = False
        if ws is None:
            return
        # Counted before the send returns: a Clear written, its send waiting for a full TCP
        # buffer to drain when the stream is cancelled, still has a Cleared to come.
        self._pending_clears += 1
        try:
            await self._bounded(ws.send(_CLEAR))
        except (ConnectionClosed, TimeoutError):
            await self._drop()

    # -- connection ----------------------------------------------------------------------
    async def _connect(self) -> ClientConnection:
        # Before the key's re-check is taken: a closed provider (a connect that starts after its
        # call ended: on Python 3.11, a task's first step comes an iteration later), a rest, or
        # every slot taken, would waste it (the next is an interval on).
        self._check_open()
        self._raise_if_resting()
        self._take_slot()
        self._connecting = True
        try:
            return await self._attempts()
        except BaseException:
            if self._ws is None:  # no socket after all: the slot is free for another call
                self._give_slot_back()
            raise
        finally:
            self._connecting = False

    async def _attempts(self) -> ClientConnection:
        svc = self._svc
        svc.refused_key.admit()  # refused: only a due re-check connects, one per interval
        for attempt in range(svc.max_reconnects + 1):
            if attempt:  # refused meanwhile, to this or another call?
                svc.refused_key.raise_if_refused()
            self._check_open()
            if attempt:
                await svc.sleep(svc.backoff * 2 ** (attempt - 1) * (0.5 + svc.jitter()))
                self._check_open()  # closed as it waited: no socket to open
                self._raise_if_resting()  # another call's handshake was refused meanwhile
            try:
                ws = await self._dial(
                    open_timeout=svc.connect_timeout,
                    proxy=svc.proxy,
                    # The payload is audio, which deflate cannot shrink: compression would only
                    # cost CPU on both ends (measured: ~2 % of the server at 200 calls).
                    compression=None,
                    **({} if svc.ssl is None else {"ssl": svc.ssl}),
                    # websockets types this as a class, and documents a wrapper as fine too.
                    create_connection=cast(
                        type[ClientConnection],
                        functools.partial(
                            SendOnOpenConnection,
                            on_open=self._opened,
                            origin=svc.uri,
                            additional_headers=svc.headers,
                        ),
                    ),
                )
            except InvalidStatus as exc:
                res = exc.response
                error = parse_error(
                    res.status_code, bytes(res.body or b""), res.headers, provider=_NAME
                )
                if isinstance(error, TTSAuthError):
                    svc.mark_unhealthy(error)
                    raise error from None
                if error.status == 429:  # another attempt now would only add to the load
                    note_refusal(svc.too_many_requests, _NAME, error.retry_after)
                    raise error.copy(retryable=False) from None
                if not error.retryable:
                    raise error from None
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                error = TTSError(_NAME, f"cannot connect: {exc!r}", retryable=True)
            except ValueError as exc:  # e.g. a redirect websockets will not follow
                raise TTSError(_NAME, f"cannot connect: {exc}", retryable=False) from None
            else:
                svc.mark_accepted()  # (the key is good, whoever needs the socket now)
                if self._closed:  # closed while connecting: this socket is nobody's
                    # Closed with a close handshake, not aborted: Deepgram counted it open,
                    # and its slot is given back (by _connect) once Deepgram has seen it close.
                    try:
                        await self._shut(ws)
                    except BaseException:
                        ws.transport.abort()  # cut short: not left open, unowned
                        raise
                    raise TTSError(_NAME, "provider closed while connecting", retryable=False)
                self._ws, self._opened_at, self.request_id = ws, svc.clock(), None
                self._in_utterance, self._pending_clears = False, 0
                written, self._written_on = self._written_on, None
                if written is ws:
                    # Counted here, not when the stream resumes: a stream cancelled in between
                    # (a barge-in) must still find its utterance in flight, to Clear it.
                    self._utterance_sent()
                    if self._sent_on_open is not ws:
                        # Its stream has already ended (cancelled, or out of time to wait for
                        # this socket): nobody will read that audio. Cleared now, so the next
                        # stream drains it up to Cleared instead of hearing it as its own.
                        await self._send_clear()
                return ws
            logger.warning("deepgram-ws connect attempt %d failed: %s", attempt + 1, error)
        raise TTSError(  # not retryable: retrying it again would keep the caller waiting longer
            _NAME,
            f"could not connect after {svc.max_reconnects + 1} attempts: {error.message}",
            retryable=False,
            status=error.status,
            code=error.code,
            request_id=error.request_id,
            kind=error.kind,  # (a connection error, or the status the last attempt met)
        )

    def _raise_if_resting(self) -> None:
        """Raise (not retryable) while no socket may be opened: Deepgram refused one as too many
        at once a moment ago. The error says how long is left (``retry_after``)."""
        rest = self._svc.too_many_requests.remaining()
        if rest > 0:
            raise TTSError(
                _NAME,
                f"not opening a socket for {rest:.1f} s more: Deepgram refused one as too many"
                " at once for the project (429)",
                retryable=False,
                status=429,
                retry_after=rest,
            )

    async def _dial(self, **kwargs: Any) -> ClientConnection:
        """``connect()`` to the service's URL: through the kept addresses when it has them, in
        turn until one connects, the lookup and all of them within ``connect_timeout``."""
        svc, host = self._svc, self._svc.resolved_host
        if host is None:
            return await svc.connect(svc.url, **kwargs)
        info: AddrInfo | None = None  # the address being dialled
        try:
            async with asyncio.timeout(svc.connect_timeout):
                errors = []
                for info in await host.addresses():
                    try:
                        # websockets takes the port, Host and TLS's server name from the URL
                        return await svc.connect(svc.url, host=info[4][0], **kwargs)
                    except OSError as exc:  # refused or unreachable; a timeout is seen below
                        if isinstance(exc, TimeoutError):
                            raise
                        host.failed(info)  # later sockets try the others first
                        errors.append(f"{info[4][0]}: {exc}")
                host.forget()  # none could be reached: look the name up afresh
                raise OSError(f"no address of {host.host} could be reached ({'; '.join(errors)})")
        except TimeoutError:  # websockets' open_timeout or this one (which starts first)
            if info is not None:
                host.failed(info)  # it hung: later sockets try the others first
            raise

    def _opened(self, ws: ClientConnection) -> list[str]:
        """The messages to write on ``ws`` as its handshake completes: those a ``stream()`` queued
        for it, unless that stream was cleared or closed meanwhile."""
        messages, self._on_open = self._on_open, []
        if not messages or self._interrupted or self._closed:
            return []
        self._sent_on_open = self._written_on = ws
        return messages

    async def _prepare(self) -> ClientConnection:
        """An open socket with no stale audio queued on it."""
        ws = self._ws
        if ws is not None and ws.state is not State.OPEN:
            logger.info(
                "deepgram-ws socket closed between utterances (code %s %r); reconnecting",
                ws.close_code if ws.close_code is not None else 1006,
                ws.close_reason or "",
            )
            await self._drop()
        elif (
            ws is not None
            and self._svc.clock() - self._opened_at >= self._svc.max_connection_age
            # Not while no socket may be opened (a 429's rest, a minute at most): this one is
            # still good, and 5 minutes short of Deepgram's limit of 60.
            and not self._svc.too_many_requests.resting()
        ):
            logger.info("deepgram-ws socket near its 60-minute limit; replacing it")
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await self._bounded(ws.send(_CLOSE))
            await self._drop()
        ws = self._ws or await self._connected()
        when = asyncio.get_running_loop().time() + self._svc.receive_timeout
        while self._pending_clears:
            try:
                message = await self._recv(ws, when)
            except (TimeoutError, ConnectionClosed) as exc:
                self._check_open()
                if self._interrupted and isinstance(exc, TimeoutError):
                    # clear() ended this stream as it waited: the socket is fine, its Cleared
                    # on the way; the next stream waits for it.
                    return ws
                logger.warning("deepgram-ws: no Cleared in time; replacing the socket")
                await self._drop()
                return await self._connected()
            if isinstance(message, str) and self._handle_event(message) == "Cleared":
                self._pending_clears -= 1
        return ws

    async def _connected(self) -> ClientConnection:
        """The socket a connect under way (warm_up()'s, or an earlier stream's) is opening (its
        error if that fails), or a new one — within twice ``connect_timeout`` in all, however
        many attempts that covers: a caller waits in silence meanwhile. Past it, a
        :class:`TTSError` that is not retryable hands the text to the fallback voice; the
        connect goes on, for the next utterance."""
        limit = 2 * self._svc.connect_timeout
        budget = asyncio.timeout(limit)
        try:
            async with budget:
                warming = self._warming
                if warming is None or warming.done():
                    warming = self._start_connect(ahead_of_speech=False)
                if self._closing is None:
                    self._closing = asyncio.get_running_loop().create_future()
                # asyncio.wait, like a shield: a stream cancelled meanwhile (a barge-in, the
                # budget) leaves the connect running, for the next utterance. aclose() ends
                # the wait (not the connect).
                either: set[asyncio.Future[Any]] = {warming, self._closing}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if self._closed:  # (the connect, if still under way, closes its socket)
                    raise TTSError(_NAME, "provider closed while connecting", retryable=False)
                try:
                    return warming.result()
                finally:
                    # This frame is in the traceback of what the connect raised: holding its
                    # task, which holds that error, would be a cycle keeping the call's voices
                    # (and the frames up to where the error is caught) for the collector.
                    del warming, either
        except TimeoutError:
            if not budget.expired():
                raise
            raise TTSError(
                _NAME,
                f"no connection within {limit:g} s (twice connect_timeout)",
                retryable=False,
                kind="connection",
            ) from None

    async def _respect_flush_limit(self, ahead: float) -> None:
        """Wait for the window to free a slot: up to ``flush_wait`` s, or longer while the call
        has more than that still to play (``ahead``, less :data:`FLUSH_AHEAD_MARGIN` for the
        first byte): a wait the caller does not hear. Else a retryable ``FLUSH_LIMIT``."""
        clock, svc, window = self._svc.clock, self._svc, FLUSH_WINDOW + FLUSH_MARGIN
        while self._flushes and clock() - self._flushes[0] >= window:
            self._flushes.popleft()
        if len(self._flushes) < FLUSH_LIMIT:
            return
        wait = self._flushes[0] + window - clock()
        if wait > max(svc.flush_wait, ahead - FLUSH_AHEAD_MARGIN):
            raise TTSError(
                _NAME,
                f"flush limit: {FLUSH_LIMIT} per {FLUSH_WINDOW:g} s used;"
                f" next slot in {wait:.1f} s",
                retryable=True,
                code=FLUSH_LIMIT_CODE,
            )
        logger.info("deepgram-ws flush limit reached; waiting %.2f s", wait)
        await svc.sleep(wait)
        self._flushes.popleft()

    async def _send_utterance(self, ws: ClientConnection, chunks: list[str]) -> ClientConnection:
        """Speak each chunk, then Flush; reconnect once if the socket turns out to be closed."""
        for retry in (False, True):
            try:
                async with asyncio.timeout(self._svc.receive_timeout):
                    for message in _messages(chunks):
                        await ws.send(message)
            except ConnectionClosed:
                await self._drop()
                if retry:
                    raise self._error("socket closed while sending text") from None
                ws = await self._connected()  # within the same bound as any wait for a socket
                continue
            except TimeoutError:
                await self._drop()
                raise self._error("stalled while sending text") from None
            except asyncio.CancelledError:
                # Cancelled (a barge-in) while a send waited for a full TCP buffer to drain: what
                # it wrote is on the socket, so the utterance is in flight for stream() to Clear.
                # (Not counted before the sends: a clear() meanwhile would put its Clear ahead
                # of our Flush, and Deepgram would answer that Flush after the Cleared.)
                self._utterance_sent()
                raise
            self._utterance_sent()
            break
        return ws

    def _utterance_sent(self) -> None:
        self._flushes.append(self._svc.clock())
        self._in_utterance = True

    # -- receiving -----------------------------------------------------------------------
    async def _receive(self, ws: ClientConnection, *, expect_audio: bool) -> AsyncIterator[bytes]:
        """The utterance's audio until its ``Flushed``; with ``expect_audio``, a ``Flushed``
        before any audio is an error (the text has words: the caller would hear silence)."""
        loop, stall = asyncio.get_running_loop(), self._svc.stall_timeout
        when = loop.time() + self._svc.receive_timeout
        heard = False
        while not self._interrupted:
            try:
                message = await self._recv(ws, when)
            except TimeoutError:
                if self._interrupted:
                    break
                await self._drop()
                waited = stall if heard else self._svc.receive_timeout
                raise self._error(
                    f"stalled: no {'more ' if heard else ''}audio and no Flushed for {waited:g} s"
                ) from None
            except ConnectionClosed as exc:
                await self._drop()
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
                request_fault = code in REQUEST_FAULT_CLOSE_CODES
                error = self._error(
                    f"socket closed mid-utterance: code {code} {reason!r}",
                    code=str(code),
                    kind="request" if request_fault else None,  # (None: derived)
                )
                if request_fault:
                    error.retryable = False
                raise error from None
            if isinstance(message, bytes):
                if message:
                    when, heard = loop.time() + stall, True
                    yield message
            elif (kind := self._handle_event(message)) == "Flushed":
                self._in_utterance = False
                if expect_audio and not heard:  # the caller would hear silence for this text
                    raise self._error("flushed with no audio")
                return
            elif kind == _FLUSH_IGNORED:  # no Flushed will come; stream()'s Clear drops the text
                raise TTSError(
                    _NAME,
                    f"Deepgram ignored the Flush: its limit of {FLUSH_LIMIT} per"
                    f" {FLUSH_WINDOW:g} s was reached (it counted more flushes than we did)",
                    retryable=False,
                    code=FLUSH_LIMIT_CODE,
                    request_id=self.request_id,
                )
        if self._closed:
            raise self._error("closed")

    def _handle_event(self, raw: str) -> str | None:
        """Log a JSON server message and return its ``type`` (:data:`_FLUSH_IGNORED` for a
        ``Warning`` about flushes: Deepgram warns so when it ignores a ``Flush``)."""
        try:
            event = json.loads(raw)
            kind = event.get("type")
        except (ValueError, AttributeError):
            logger.warning("deepgram-ws: unparseable message %.200r", raw)
            return None
        if kind == "Metadata":
            self.request_id = event.get("request_id")
            logger.debug("deepgram-ws metadata: %s", event)
        elif kind == "Warning":
            code, description = event.get("code"), event.get("description")
            logger.warning("deepgram-ws warning %s: %s", code, description)
            if "flush" in f"{code} {description}".lower():
                return _FLUSH_IGNORED
        elif kind not in ("Flushed", "Cleared"):
            logger.debug("deepgram-ws: unhandled message %s", event)
        return kind if isinstance(kind, str) else None


def speak_texts(text: str) -> list[str]:
    """``text`` as the texts of its ``Speak`` messages, each at most 2000 characters.

    Deepgram speaks the texts buffered before a ``Flush`` joined as they were sent, so every text
    but the last ends in the space the split took away: without it the last word of one and the
    first of the next would run together ("here.Sentence", "wordword").
    """
    texts = chunk_text(text, DEFAULT_CHUNK_LIMIT - 1)
    return [piece + " " for piece in texts[:-1]] + texts[-1:]


def _messages(chunks: list[str]) -> list[str]:
    """One utterance on the wire: a ``Speak`` per chunk, then a ``Flush``."""
    return [*(json.dumps({"type": "Speak", "text": chunk}) for chunk in chunks), _FLUSH]
