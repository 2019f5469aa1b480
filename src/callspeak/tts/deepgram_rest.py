"""Deepgram Aura over REST: one streamed ``POST /v1/speak`` per text (per 2000-character chunk).

https://developers.deepgram.com/reference/text-to-speech-api — we always ask for
``encoding=mulaw&sample_rate=8000&container=none`` (raw telephone audio: without
``container=none`` the body starts with a WAV header a caller would hear as a click).

The service owns one pooled :class:`aiohttp.ClientSession` (HTTP/1.1 keep-alive, at most
``max_connections`` sockets) shared by every call; each call gets a cheap
:class:`DeepgramRestProvider`. Audio is yielded as it arrives from the socket, never buffered, and
never compressed (``Accept-Encoding: identity``, no decompression: the body is raw audio).
Timeouts are ours, enforced with :func:`asyncio.timeout_at`:

* ``first_byte_timeout`` — from sending the request (connecting included, when the pool has no
  idle connection) to the first audio byte;
* ``stall_timeout`` — the longest gap between two body chunks.

Both raise a retryable :class:`TTSError`; aiohttp itself only bounds connecting (and waiting for a
free pooled connection) with ``connect_timeout``, reported as such only when it is the shorter of
the two (at the class's defaults, 5 s each, the first-byte deadline, started first, ends it; it
does too in ``callspeak serve``, where it is ``CALLSPEAK_DEEPGRAM_FIRST_BYTE_TIMEOUT``, 2 s).

``warm_up()`` — the session calls it as the call's stream is accepted, before ``start`` — takes a
pooled connection in the background (opening it, TCP and TLS, when none is idle; no request; on
Python 3.12+ the connect starts before ``warm_up()`` returns, see
:func:`~callspeak.tasks.start_task`) and keeps it for the call's first request, so that request
does not connect after ``start``: on a cold pool that is the handshakes off the time to first
audio, and when hundreds of calls arrive together, several loop iterations. The first
``stream()`` waits for it if it is still connecting, within its first-byte deadline; a failure is
only logged (the request connects afresh and reports its own). Each text streamed to its end
keeps a connection again for the call's next one: a request gives the call's kept connection
back to the pool just before it takes one (and does not wait for one still being taken), so
every call in progress has one ready — replies asked for by many calls in the same instant open
none — and a call never holds more than one (``max_connections`` is the number of calls). A kept
connection the server has closed meanwhile is dropped by the pool, and one kept half
``keepalive`` (15 s) or longer is closed rather than reused, lest Deepgram close it as the
request goes out; the request then connects as it would have. Should Deepgram still close one
as a request goes out on it (its keep-alive is not documented), the request is sent once more
before any answer is given up on. Not done for an injected
``http_session``: its proxy settings decide which connection a request takes, and they are not
public.

Why aiohttp rather than httpx: every call opens a request per sentence, so at a few hundred calls
the pool sees thousands of request opens and closes a minute. httpcore's pool does O(open
connections) work on each (it rescans every connection to assign waiting requests and to find
idle/expired ones); measured with py-spy at 200 simultaneous calls that was ~40 % of the whole
server's CPU. aiohttp's connector keeps idle connections in per-host deques and hands them out in
O(1). We use a thin client rather than ``deepgram-sdk``: the surface is one POST, and the SDK's
breaking rewrites would cost more than these lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import aiohttp
from aiohttp.connector import Connection
from yarl import URL

from callspeak.audio.format import TWILIO_FORMAT, AudioFormat
from callspeak.audio.wav import WavError, WavHeaderStripper
from callspeak.tasks import start_task, wait_cancelled
from callspeak.tts.base import CONCURRENCY_LIMIT, TTSAuthError, TTSError
from callspeak.tts.deepgram_errors import parse_error
from callspeak.tts.refused_key import RefusedKey
from callspeak.tts.request_slots import SLOT_WAIT, RequestSlots, slot_wait
from callspeak.tts.sentences import DEFAULT_CHUNK_LIMIT, chunk_text, has_words
from callspeak.tts.tls import client_tls_context
from callspeak.tts.too_many_requests import TooManyRequests, note_refusal

__all__ = ["DeepgramRestProvider", "DeepgramRestService"]

_NAME = "deepgram"
logger = logging.getLogger(__name__)
_ERROR_BODY_LIMIT = 64 * 1024
_KEEPALIVE_SECONDS = 30.0


class DeepgramRestService:
    """Process-wide Deepgram REST engine: owns (or borrows) the pooled HTTP session.

    An injected ``http_session`` is used as is and never closed here (each request still asks for
    our timeouts and for no compression). ``healthy`` turns False when Deepgram refuses the
    credentials (401/403), and True again once a request is accepted. Meanwhile a fallback chain
    skips this voice until :meth:`recheck_due` (``auth_recheck`` seconds after the refusal);
    then one request tries the key again, and the others asking meanwhile raise the refusal at
    once (:class:`~callspeak.tts.refused_key.RefusedKey`). A topped-up balance, a permission
    granted, or Deepgram's own auth trouble over need no restart; a wrong key costs one refused
    request a minute, not a request loop.
    """

    name = _NAME

    def __init__(
        self,
        api_key: str,
        *,
        model: str = "aura-2-thalia-en",
        base_url: str = "https://api.deepgram.com",
        connect_timeout: float = 5.0,
        first_byte_timeout: float = 5.0,
        stall_timeout: float = 3.0,
        http_session: aiohttp.ClientSession | None = None,
        max_connections: int = 200,
        auth_recheck: float = 60.0,
        keepalive: float = _KEEPALIVE_SECONDS,
        max_concurrent: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        #: Requests in progress, at most ``max_concurrent`` (None: no limit): see
        #: :mod:`~callspeak.tts.request_slots`.
        self.slots = RequestSlots(
            max_concurrent,
            _NAME,
            clock=clock,
            then=f"more speech waits for one to end (at least {SLOT_WAIT:g} s, longer while the"
            " call has audio left to play: silence for a caller waiting for its first words),"
            " then goes to the next voice",
        )
        self.refused_key = RefusedKey(auth_recheck, clock)
        #: The rest after Deepgram answered 429 (too many requests at once for the project).
        self.too_many_requests = TooManyRequests(clock)
        #: Seconds an idle pooled connection is reused (aiohttp's ``keepalive_timeout``); a call
        #: keeps one for half that at most (see :meth:`DeepgramRestProvider.warm_up`).
        self.keepalive = keepalive
        self.base_url = base_url.rstrip("/")
        self.first_byte_timeout = first_byte_timeout
        self.stall_timeout = stall_timeout
        # aiohttp's timeouts bound only connecting and waiting for a pooled connection (``connect``
        # covers both, ``sock_connect`` the TCP/TLS connect); the response is bounded by our own
        # first-byte/stall deadlines instead.
        self.request_timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=None
        )
        self.headers = {
            "Authorization": f"Token {api_key}",
            "Accept-Encoding": "identity",  # the body is audio: compression would only cost CPU
        }
        self.max_connections = max_connections
        self._session = http_session
        self._owns_session = http_session is None
        self._closed = False
        #: Connections calls keep for their next text (closed with the service, even if a
        #: provider was dropped without ``aclose()``).
        self.kept: set[Connection] = set()

    @property
    def healthy(self) -> bool:
        """False from Deepgram refusing the credentials until it accepts a request again."""
        return self.refused_key.error is None

    def recheck_due(self) -> bool:
        """Refused at least ``auth_recheck`` seconds ago: worth trying the key again."""
        return self.refused_key.due()

    def rest_remaining(self) -> float:
        """Seconds left of the rest after Deepgram answered 429 (0: none): a fallback chain skips
        this voice meanwhile (see :func:`~callspeak.tts.base.worth_trying`)."""
        return self.too_many_requests.remaining()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def owns_session(self) -> bool:
        """True when the service made its HTTP session (and closes it); False if injected."""
        return self._owns_session

    def mark_unhealthy(self, error: TTSAuthError | None = None) -> None:
        """Record that Deepgram refused the credentials (called by providers); the next
        re-check is due ``auth_recheck`` seconds from now. Requests until then raise ``error``."""
        self.refused_key.refuse(error or TTSAuthError(_NAME, "the API key was refused"))

    def mark_accepted(self) -> None:
        """Record that Deepgram accepted a request (called by providers): healthy again."""
        if self.refused_key.accept():
            logger.info("deepgram: the API key is accepted again; calls use Deepgram again")

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session, created on first use; needs a running event loop.

        Raises :class:`RuntimeError` once the service is closed (a new session would leak).
        """
        if self._closed:
            raise RuntimeError("DeepgramRestService is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,  # one host: ``limit`` is the bound
                keepalive_timeout=self.keepalive,
                ssl=client_tls_context() if self.base_url.startswith("https:") else True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.request_timeout,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # token auth: no cookies to keep
            )
        return self._session

    async def start(self) -> None:
        """Create the pooled session. Idempotent."""
        _ = self.session

    async def take_connection(self) -> Connection:
        """A connection to Deepgram out of the pool — an idle one, else a new one (TCP, TLS) —
        for the caller to hold and later ``release()`` back (or close). Sends no request. Raises
        what connecting raises (bounded by ``connect_timeout``); waits while ``max_connections``
        are taken.

        Through aiohttp's documented ``BaseConnector.connect``, with the request key a
        ``session.post`` to the same URL uses, so a request finds the connection once released.
        """
        session = self.session
        request = aiohttp.ClientRequest(
            "POST", URL(f"{self.base_url}/v1/speak"), loop=asyncio.get_running_loop()
        )
        return await session.connector.connect(request, [], self.request_timeout)  # type: ignore[union-attr]

    def open(self) -> DeepgramRestProvider:
        """A provider for one call. Raises :class:`RuntimeError` once the service is closed."""
        if self._closed:
            raise RuntimeError("DeepgramRestService is closed")
        return DeepgramRestProvider(self)

    async def aclose(self) -> None:
        """Close the pooled session if this service created it, and the connections calls kept
        (see :meth:`DeepgramRestProvider.warm_up`). Idempotent."""
        self._closed = True
        kept, self.kept = self.kept, set()
        for connection in kept:
            connection.close()
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()


class DeepgramRestProvider:
    """One call's Deepgram REST voice. See :mod:`callspeak.tts.base` for the stream contract.

    ``clear()`` is a no-op (each text is its own request: closing the iterator stops it).
    Each request takes one of the service's :attr:`~DeepgramRestService.slots` from before it
    is sent until its answer is read or dropped; when none is free it waits for one, as long
    as :func:`~callspeak.tts.request_slots.slot_wait` allows, then raises a :class:`TTSError`
    (``code="CONCURRENCY_LIMIT"``, not retryable: the next voice speaks) without sending it.
    ``aclose()`` makes an in-flight ``stream()`` stop at its next await with a non-retryable
    :class:`TTSError` and releases its response; later ``stream()`` calls fail the same way.
    """

    name = _NAME
    audio_format: AudioFormat = TWILIO_FORMAT

    def __init__(self, service: DeepgramRestService) -> None:
        self._service = service
        self._closed = False
        self._deadline: asyncio.Timeout | None = None  # the read in flight, so aclose can end it
        self._warming: asyncio.Task[None] | None = None  # warm_up()'s or a re-hold's connect
        self._warmed = False
        #: The pooled connection this call keeps for its next request (see _hold), and when
        #: it took it (time.monotonic, as aiohttp's pool).
        self._held: Connection | None = None
        self._held_at = 0.0
        self._warming_first = False  # _warming is warm_up()'s, which a request waits for

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        """Audio of ``text``: one request per ≤2000-character chunk, in order, streamed.

        Raw μ-law 8 kHz, as asked for. Should Deepgram answer with a WAV header anyway
        (``container=none`` ignored), each answer's is dropped here — one header in the middle
        of the stream would be heard as a click, and its declared length would cut the answers
        after it — and a header declaring any other audio raises a :class:`TTSError` that is not
        retryable (the fallback voice takes over).
        """
        async with contextlib.aclosing(self._stream_text(text, ahead)) as audio:
            async for payload in audio:
                yield payload
        # For the call's next text: its request then finds a connection without opening one,
        # even when every call asks at once. Not after a failure (the fallback voice speaks) or
        # a stream closed early (a barge-in: its connection, cut mid-body, was closed).
        self._hold(first=False)

    async def _stream_text(self, text: str, ahead: float) -> AsyncGenerator[bytes, None]:
        chunks = chunk_text(text, DEFAULT_CHUNK_LIMIT)
        for index, chunk in enumerate(chunks):
            try:
                self._check_open()
                header = WavHeaderStripper()
                # Closed with this iterator, not later by the garbage collector: the connection
                # goes back to the pool at once, and a late cleanup cannot touch the next
                # stream's state.
                answer = (
                    self._stream_chunk(chunk)
                    if self._service.slots.limit is None
                    else self._in_slot(chunk, ahead)
                )
                async with contextlib.aclosing(answer) as audio_chunks:
                    async for audio in audio_chunks:
                        try:
                            payload = header.push(audio)  # raw audio (always, in practice)
                        except WavError as exc:  # a header of audio it cannot take
                            raise TTSError(
                                _NAME, f"answered part {index + 1} with {exc}", retryable=False
                            ) from None
                        info = header.info
                        if info is not None and not info.format.is_twilio_native:
                            raise TTSError(
                                _NAME,
                                f"answered part {index + 1} as {info.format}, not the μ-law "
                                "8 kHz asked for",
                                retryable=False,
                            )
                        if payload:
                            yield payload
                if tail := header.flush():  # an answer under 4 bytes that began like "RIFF"
                    yield tail
            except TTSError as exc:
                if not index or exc.unspoken is not None:
                    raise
                # The parts before were streamed whole: a fallback voice says only the rest,
                # rather than the text again from its start. On a copy: the error may be one
                # other calls are given too (a refused key's).
                raise exc.copy(unspoken=" ".join(chunks[index:])) from exc

    def warm_up(self) -> None:
        """Take a pooled connection now, in the background — opening one when none is idle —
        and keep it for the call's first request (see :meth:`DeepgramRestService.take_connection`).
        Once per provider; nothing when closed or after Deepgram refused the credentials. Each
        text streamed after that keeps one again, for the call's next request."""
        if self._warmed:
            return
        self._hold(first=True)

    def _hold(self, *, first: bool) -> None:
        service = self._service
        if self._closed or service.closed or not service.healthy or self._held is not None:
            return
        if not service.owns_session:
            return  # an injected session's proxy settings pick the connection: unknown here
        if self._warming is not None and not self._warming.done():
            return
        self._warmed = True
        self._warming_first = first
        self._warming = start_task(self._take(), name="deepgram-rest-connect")
        self._warming.add_done_callback(self._warm_done if first else self._rehold_done)

    async def _take(self) -> None:
        connection = await self._service.take_connection()
        if self._closed or self._service.closed or self._held is not None:
            connection.release()  # closed meanwhile: nobody to keep it for
        else:
            self._held, self._held_at = connection, time.monotonic()
            self._service.kept.add(connection)

    def _release_held(self) -> None:
        """Back to the pool (idle, for any request): a closed connection is dropped there, and
        one kept half ``keepalive`` or longer is closed here. The pool times a connection's idle
        from when it was put back, so it would take this one as fresh: idle maybe longer than
        Deepgram keeps a connection open, and a request on a connection the server is closing
        fails (aiohttp does not resend a POST). Half, since the connection may have waited idle
        in the pool up to ``keepalive`` before the call took it."""
        held, self._held = self._held, None
        if held is None:
            return
        self._service.kept.discard(held)
        if time.monotonic() - self._held_at >= self._service.keepalive / 2:
            held.close()
        else:
            held.release()

    def _warm_done(self, task: asyncio.Task[None]) -> None:
        if self._warming is task:
            self._warming = None
        if task.cancelled() or (error := task.exception()) is None:
            return
        if not self._closed and not self._service.closed:  # else: shutting down, not a fault
            # The request connects afresh and reports its own failure; this is the early sign.
            logger.warning("deepgram: opening a connection ahead of speech failed: %r", error)

    def _rehold_done(self, task: asyncio.Task[None]) -> None:
        if self._warming is task:
            self._warming = None
        if not task.cancelled() and (error := task.exception()) is not None:
            # Said once, at the call's start; here the next request reports its own failure.
            logger.debug("deepgram: keeping a connection for the next text failed: %r", error)

    async def clear(self) -> None:
        """Nothing to drop: requests are per text and end when their iterator is closed."""

    async def aclose(self) -> None:
        """Stop any in-flight stream and refuse new ones. Idempotent; the service stays open."""
        self._closed = True
        warming, self._warming = self._warming, None
        if warming is not None:
            warming.cancel()
            with contextlib.suppress(Exception):  # of no use now; _warm_done has logged it
                await wait_cancelled(warming)
        self._release_held()
        deadline = self._deadline
        if deadline is not None:
            with contextlib.suppress(RuntimeError):  # already expiring or exited
                deadline.reschedule(asyncio.get_running_loop().time())

    def _check_open(self) -> None:
        if self._closed:
            raise TTSError(_NAME, "provider is closed", retryable=False)
        if self._service.closed:
            raise TTSError(_NAME, "service is closed", retryable=False)

    def _error(self, message: str, response: aiohttp.ClientResponse | None) -> TTSError:
        """A retryable failure of the request ``response`` answers (None: no answer yet), with
        Deepgram's id for it (its ``dg-request-id`` header), so a stall or a cut after the 200
        can be looked up as an error status can."""
        if self._closed:
            return TTSError(_NAME, "provider closed while streaming", retryable=False)
        if self._service.closed:
            return TTSError(_NAME, "service closed while streaming", retryable=False)
        request_id = None if response is None else response.headers.get("dg-request-id")
        return TTSError(_NAME, message, retryable=True, request_id=request_id)

    async def _read(self, content: aiohttp.StreamReader, when: float) -> bytes:
        """What the body has so far, before loop time ``when``, else ``TimeoutError``; ``b""`` at
        the end."""
        async with asyncio.timeout_at(when) as deadline:
            self._deadline = deadline
            try:
                return await content.readany()
            finally:
                if self._deadline is deadline:
                    self._deadline = None

    async def _in_slot(self, text: str, ahead: float) -> AsyncGenerator[bytes, None]:
        """:meth:`_stream_chunk`, holding a slot of the service's limit throughout (see the
        class docstring); the wait for it is not counted in the first-byte deadline."""
        slots, wait = self._service.slots, slot_wait(ahead)
        try:
            async with asyncio.timeout(None) as self._deadline:  # (for aclose() to end the wait)
                took = await slots.acquire(wait)
        except TimeoutError:
            self._check_open()  # closed while it waited: that is the error
            raise
        finally:
            self._deadline = None
        if not took:
            raise TTSError(
                _NAME,
                f"the limit of {slots.limit} at once (CALLSPEAK_DEEPGRAM_MAX_CONCURRENT) is"
                f" reached; no request ended within {wait:.1f} s, this one was not sent",
                retryable=False,
                code=CONCURRENCY_LIMIT,
            )
        try:
            self._check_open()  # (closed as the slot was taken)
            async with contextlib.aclosing(self._stream_chunk(text)) as audio:
                async for piece in audio:
                    yield piece
        finally:
            slots.release()

    async def _stream_chunk(self, text: str) -> AsyncGenerator[bytes, None]:
        service = self._service
        session = service.session
        received = 0
        response: aiohttp.ClientResponse | None = None
        loop = asyncio.get_running_loop()
        when = loop.time() + service.first_byte_timeout  # one deadline for headers + first byte
        try:
            try:
                async with asyncio.timeout_at(when) as self._deadline:
                    warming = self._warming
                    if warming is not None and not warming.done():
                        if self._warming_first:
                            # The call's first connect: the one to use; a failure is found
                            # again below. (A warm-up already done has its connection kept:
                            # waiting on it would still cost a loop iteration.)
                            await asyncio.wait({warming})
                            self._check_open()  # closed meanwhile: no request
                        else:
                            # Keeping one for this text, not done (on 3.11 not even started):
                            # the request takes a connection itself rather than wait for it.
                            warming.cancel()
                    # Refused credentials: only a due re-check goes out, one per interval.
                    service.refused_key.admit()
                    # Idle in the pool, where this request takes it (or another idle one).
                    self._release_held()
                    # A request waiting for a pooled connection is cancelled by aiohttp when the
                    # service closes the pool: see the CancelledError clause below.
                    response = await self._post(session, text)
                    if response.status != 200:
                        body = await _read_at_most(response.content, _ERROR_BODY_LIMIT)
                        raise self._status_error(response, body)
                    service.mark_accepted()
                while audio := await self._read(response.content, when):
                    received += len(audio)
                    yield audio
                    self._check_open()
                    when = loop.time() + service.stall_timeout
                if received == 0 and has_words(text):  # the caller would hear silence
                    raise self._error("answered 200 with no audio", response)
            finally:
                self._deadline = None
        except aiohttp.ServerTimeoutError as exc:  # aiohttp's connect timeout: a TimeoutError too
            raise self._error(f"timed out connecting ({type(exc).__name__})", response) from exc
        except TimeoutError:
            if received == 0:
                # No answer at all can also be a connection that never opened: the first-byte
                # deadline covers connecting too (aiohttp's own bounds it only when longer).
                waited = "first byte" if response is not None else "first byte, connecting included"
                message = f"no audio within {service.first_byte_timeout:g} s ({waited})"
            else:
                message = (
                    f"stalled after {received} bytes (no data for {service.stall_timeout:g} s)"
                )
            raise self._error(message, response) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._service.closed and task is not None and not task.cancelling():
                # Nobody cancelled this task: the closing pool cancelled its wait for a
                # connection. That is the service ending, reported as such (not retried).
                raise self._error("service closed", response) from None
            raise
        except aiohttp.ClientError as exc:
            # ClientConnectionError: refused, DNS, TLS, reset, server disconnected…;
            # ClientPayloadError: body cut short; ClientResponseError: a malformed response;
            # InvalidURL: a base URL without http(s)://.
            detail = str(exc) or type(exc).__name__
            if response is None:
                raise self._error(f"cannot reach Deepgram: {detail}", response) from exc
            raise self._error(f"connection cut after {received} bytes: {detail}", response) from exc
        finally:
            if response is not None:
                # Back to the pool when the body was read to the end; closed otherwise (an
                # abandoned or failed stream cannot be reused mid-body).
                response.release()

    async def _post(self, session: aiohttp.ClientSession, text: str) -> aiohttp.ClientResponse:
        """The request for ``text``, sent again once if the connection closes under it before
        any answer: a pooled connection Deepgram closed as the request went out (its keep-alive
        ran out), which aiohttp resends only for idempotent methods, not for a POST. Within the
        first-byte deadline; a connection that cannot be opened at all is not retried."""
        service = self._service

        async def post() -> aiohttp.ClientResponse:
            return await session.post(
                f"{service.base_url}/v1/speak",
                params={
                    "model": service.model,
                    "encoding": "mulaw",
                    "sample_rate": "8000",
                    "container": "none",
                },
                json={"text": text},
                headers=service.headers,
                timeout=service.request_timeout,
                allow_redirects=False,
                auto_decompress=False,
            )

        try:
            return await post()
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            self._check_open()  # (closing the service cut it: a TTSError, not a resend)
            logger.info(
                "deepgram: the connection closed under the request (%s); sending it again",
                str(exc) or type(exc).__name__,
            )
        return await post()

    def _status_error(self, response: aiohttp.ClientResponse, body: bytes) -> TTSError:
        error = parse_error(response.status, body, response.headers, provider=_NAME)
        if isinstance(error, TTSAuthError):
            self._service.mark_unhealthy(error)
        elif error.status == 429:
            note_refusal(self._service.too_many_requests, _NAME, error.retry_after)
        return error


async def _read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to ``limit`` bytes (an error body; the rest is dropped with the connection)."""
    body = bytearray()
    while len(body) < limit and (piece := await content.read(limit - len(body))):
        body += piece
    return bytes(body)
