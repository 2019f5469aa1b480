"""The callspeak server: Twilio's Media Stream WebSocket, its TwiML webhook, health and metrics.

One process serves HTTP and WebSocket together (Starlette on uvicorn). ``callspeak serve`` answers
``/twilio`` without ASGI (``uvicorn_ws.py`` and ``media_socket.py``: the socket feeds websockets'
sans-I/O protocol and the call directly); the app's own ``/twilio`` route serves it on any other
ASGI server, with the same admission and session (:func:`admit_stream`, and :func:`open_stream`
as the native path calls it or :func:`serve_stream` as the route does).
``create_app`` takes the settings and, optionally, a ready TTS service, metrics and clock, so tests
and embedders inject their own. Routes:

* ``WS /twilio`` — one Twilio bidirectional Media Stream per connection (see ``session.py``).
* ``POST /voice`` — TwiML for an incoming call: optional ``<Say>``, then
  ``<Connect><Stream url="wss://PUBLIC/twilio" statusCallback="https://PUBLIC/status">``. The URLs
  come from ``CALLSPEAK_PUBLIC_URL``, never from request headers.
* ``POST /status`` — Twilio's call and stream status callbacks, logged; answers 204.
* ``GET /healthz`` — ``{"status": "ok"|"degraded", "voice": …, "missing": […], "calls": n}``
  (``missing``: fallback voices asked for that could not be built or started).
* ``GET /metrics`` — Prometheus text format.
* ``/calls…``, ``/openapi.json``, ``/docs`` — the control API (see ``api.py``).

Admission, in this order, before the WebSocket is accepted: the ``x-twilio-signature`` of the
upgrade (over ``wss://PUBLIC/twilio`` with no params), then ``max_calls``. A refused upgrade gets
HTTP 403 with the reason as a short text body (Twilio logs error 31920) and is logged and counted
(``callspeak_calls_refused{reason}``; signatures also in ``callspeak_signature_refusals{path}``).
With ``call_token`` on, ``start`` must then carry an unused token ``/voice`` issued, or the stream
is closed with 1008. ``/voice`` and ``/status`` refuse a bad signature with 403.

:func:`create_app` raises :class:`~callspeak.config.ConfigError` when signature validation is on
without the auth token or public URL it needs (see :meth:`Settings.signature_problem`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from callspeak.api import (
    BodyTimeout,
    BodyTooLarge,
    api_exception_handlers,
    api_routes,
    read_body,
)
from callspeak.bargein import SpeechOnsetDetector
from callspeak.call_tokens import TOKEN_PARAMETER, CallTokenStore
from callspeak.clock import Clock, MonotonicClock
from callspeak.config import ConfigError, Settings
from callspeak.heap import collect_young_less_often, freeze_startup_objects
from callspeak.hooks import CallHooks
from callspeak.logs import LogBudget
from callspeak.metrics import Metrics
from callspeak.protocol import Start
from callspeak.session import CallSession, Transport, TransportClosed
from callspeak.signatures import SIGNATURE_HEADER, TwilioSignatureVerifier
from callspeak.tts.base import TTSProvider, TTSService
from callspeak.twiml import (
    TwiMLError,
    connect_stream_twiml,
    stream_url_from_public,
    webhook_url_from_public,
)
from callspeak.voices import make_tts_service

__all__ = [
    "AppState",
    "CallRegistry",
    "Refusal",
    "admit_stream",
    "create_app",
    "open_stream",
    "serve_stream",
]

log = logging.getLogger("callspeak.server")

STREAM_PATH = "/twilio"
VOICE_PATH = "/voice"
STATUS_PATH = "/status"
#: Twilio's webhook forms are a few kB; anything far bigger is not Twilio.
MAX_FORM_BYTES: Final = 64 * 1024


class CallRegistry:
    """The live calls of this process, by callSid."""

    def __init__(self) -> None:
        self._calls: dict[str, CallSession] = {}
        self._connections = 0
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._calls)

    @property
    def connections(self) -> int:
        """Open media sockets, including ones that have not sent ``start`` yet."""
        return self._connections

    def get(self, call_sid: str) -> CallSession | None:
        return self._calls.get(call_sid)

    def all(self) -> list[CallSession]:
        return list(self._calls.values())

    async def add(self, session: CallSession) -> None:
        async with self._changed:
            self._calls[session.call_sid] = session
            self._changed.notify_all()

    async def wait_for(self, call_sid: str | None = None) -> CallSession:
        """Wait until a call (``call_sid``, or any) is live; bound it with ``asyncio.timeout``."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: bool(self._calls) if call_sid is None else call_sid in self._calls
            )
            return self._calls[call_sid] if call_sid else next(iter(self._calls.values()))

    def discard(self, session: CallSession) -> None:
        if self._calls.get(session.call_sid) is session:
            del self._calls[session.call_sid]

    def reserve(self, limit: int) -> bool:
        """Take a connection slot if fewer than ``limit`` are open; pair with :meth:`release`.

        Check and increment happen with no ``await`` between them, so concurrent upgrades cannot
        both take the last slot.
        """
        if self._connections >= limit:
            return False
        self._connections += 1
        return True

    def release(self) -> None:
        """Give back a slot taken by :meth:`reserve`."""
        self._connections -= 1


@dataclass
class AppState:
    settings: Settings
    tts: TTSService
    metrics: Metrics
    clock: Clock
    hooks: CallHooks | None = None
    calls: CallRegistry = field(default_factory=CallRegistry)
    #: None when signature validation is off.
    verifier: TwilioSignatureVerifier | None = None
    #: None unless ``call_token`` is on.
    tokens: CallTokenStore | None = None
    #: Lines about refused requests: anyone can cause them, so they are rationed.
    refusals_logged: LogBudget = field(default_factory=LogBudget)


class StarletteTransport:
    """:class:`~callspeak.session.Transport` over a Starlette WebSocket."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self._closed = False

    async def receive(self) -> str | bytes | None:
        if self._closed:
            return None
        try:
            message = await self._ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            self._closed = True
            return None
        if message["type"] == "websocket.disconnect":
            self._closed = True
            return None
        text = message.get("text")
        if text is not None:
            return str(text)
        return bytes(message.get("bytes") or b"")

    async def send(self, text: str) -> None:
        if self._closed:
            raise TransportClosed("the media socket is closed")
        try:
            await self._ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            self._closed = True
            raise TransportClosed(str(exc) or "the media socket is closed") from exc

    async def send_all(self, texts: Sequence[str]) -> None:
        # One by one: ASGI has no way to hand the server several messages at once.
        for sent, text in enumerate(texts):
            try:
                await self.send(text)
            except TransportClosed as exc:
                raise TransportClosed(str(exc), sent=sent) from exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed or self._ws.application_state is WebSocketState.DISCONNECTED:
            self._closed = True
            return
        self._closed = True
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await self._ws.close(code, reason)


def _limits(tts: TTSService) -> str:
    """The limits of requests in progress the voices keep (Deepgram's concurrency limit, see
    :mod:`~callspeak.tts.request_slots`), for the start-up line: "" when no voice keeps one
    (none is Deepgram's)."""
    said = []
    for service in getattr(tts, "services", [tts]):
        slots = getattr(service, "slots", None)
        if slots is not None:
            limit = slots.limit
            said.append(f"{service.name} {'any number' if limit is None else f'at most {limit}'}")
    if not said:
        return ""
    return f" (at once: {', '.join(said)}; CALLSPEAK_DEEPGRAM_MAX_CONCURRENT)"


def create_app(
    settings: Settings,
    *,
    tts: TTSService | None = None,
    metrics: Metrics | None = None,
    clock: Clock | None = None,
    hooks: CallHooks | None = None,
    freeze_heap: bool = False,
) -> Starlette:
    """Build the ASGI app. Its lifespan starts the TTS service; it closes the service only if it
    made it (an injected service belongs to the caller, who may share it between apps).

    ``freeze_heap`` (``callspeak serve`` sets it): once started, freeze what start-up made and
    raise the young generation's threshold, so the garbage collector's passes stay short and
    rare under load (see :mod:`callspeak.heap`). Leave it off when the app lives inside a larger
    program.

    Raises :class:`~callspeak.config.ConfigError` if signature validation is on (the default)
    without ``TWILIO_AUTH_TOKEN`` and ``CALLSPEAK_PUBLIC_URL``: an app that cannot check
    signatures is not built rather than built open.
    """
    problem = settings.signature_problem()
    if problem is not None:
        raise ConfigError(problem)
    verifier = None
    if settings.validate_signatures:
        assert settings.twilio_auth_token is not None and settings.public_url is not None
        verifier = TwilioSignatureVerifier(
            settings.twilio_auth_token.get_secret_value(), settings.public_url
        )
    owns_tts = tts is None
    the_clock = clock or MonotonicClock()
    state = AppState(
        settings=settings,
        tts=tts or make_tts_service(settings),
        metrics=metrics or Metrics(),
        clock=the_clock,
        verifier=verifier,
        tokens=CallTokenStore(clock=the_clock) if settings.call_token else None,
        hooks=hooks,
    )
    on_failure = getattr(state.tts, "on_failure", None)
    if on_failure is not None:  # a chain: each voice's failures, not only the whole chain's
        errors = state.metrics.tts_errors
        on_failure(lambda name, exc: errors.labels(name, exc.kind).inc())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.tts.start()
        log.info(
            "voice: %s%s; event loop: %s",
            state.tts.name,
            _limits(state.tts),
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        if verifier is None:
            log.warning(
                "Twilio signature validation is OFF: anyone who can reach this server can open "
                "media streams (fine for local development only)"
            )
            if settings.call_token:
                log.warning(
                    "call tokens protect nothing with signature validation off: /voice hands a "
                    "token to any request, signed or not"
                )
        else:
            log.info("checking Twilio signatures against %s", settings.public_url)
        if settings.public_url and settings.api_token is None:
            # Loopback clients naming a loopback host are served without a token, and a proxy
            # on this machine that names its upstream (nginx's default Host, 127.0.0.1:port)
            # cannot be told from one: a public server is one such proxy away from open.
            log.warning(
                "the control API has no token (CALLSPEAK_API_TOKEN): it answers clients on "
                "this machine, and so anyone a reverse proxy here forwards with Host "
                "127.0.0.1 or localhost (nginx's default); set a token on a server reachable "
                "from %s",
                settings.public_url,
            )
        prerender = getattr(state.tts, "prerender", None)
        if prerender is not None and settings.greeting.strip():
            await prerender([settings.greeting])
        if freeze_heap:
            frozen = freeze_startup_objects()
            collect_young_less_often()
            log.debug("froze %d start-up objects out of garbage collection", frozen)
        try:
            yield
        finally:
            for session in state.calls.all():
                await session.hangup()
            if owns_tts:
                await state.tts.aclose()

    app = Starlette(
        routes=[
            WebSocketRoute(STREAM_PATH, _media_stream),
            Route(VOICE_PATH, _voice, methods=["POST", "GET"]),
            Route(STATUS_PATH, _status, methods=["POST"]),
            Route("/healthz", _health),
            Route("/metrics", _metrics),
            *api_routes(),
        ],
        exception_handlers=api_exception_handlers(),
        lifespan=lifespan,
    )
    # /voice/ is not /voice: Starlette would redirect it to a URL built from the Host header
    # (http://, the internal port), and the signature was computed over the path as written.
    app.router.redirect_slashes = False
    app.state.callspeak = state
    return app


def _state(request: Request | WebSocket) -> AppState:
    state: AppState = request.app.state.callspeak
    return state


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a media stream upgrade is refused: ``reason`` labels the metric, ``text`` is the body
    of the 403 (no secrets in it)."""

    reason: str
    text: str


def admit_stream(state: AppState, signature: str | None, client: str) -> Refusal | None:
    """Decide whether a ``/twilio`` upgrade may open: the signature first, then ``max_calls``.

    On None a connection slot is taken: pair it with ``state.calls.release()``. A refusal is
    logged and counted here; the caller only has to send the 403.
    """
    settings = state.settings
    if state.verifier is not None:
        check = state.verifier.check_stream_upgrade(STREAM_PATH, signature)
        if not check.ok:
            state.metrics.signature_refusals.labels(STREAM_PATH).inc()
            state.metrics.calls_refused.labels("signature").inc()
            state.refusals_logged.warning(
                log, "stream signature", "refused media stream from %s: %s", client, check.reason
            )
            return Refusal("signature", "invalid Twilio signature")
    if not state.calls.reserve(settings.max_calls):
        state.refusals_logged.warning(
            log,
            "stream full",
            "refused media stream from %s: server full (%d of max_calls=%d streams open)",
            client,
            state.calls.connections,
            settings.max_calls,
        )
        state.metrics.calls_refused.labels("full").inc()
        return Refusal("full", "server full: too many calls")
    return None


async def serve_stream(state: AppState, transport: Transport) -> None:
    """Serve one admitted, open media stream until it ends; the socket is closed on return
    (with 1011 if the call could not even be set up, whose error is then raised)."""
    await open_stream(state, transport)


def open_stream(state: AppState, transport: Transport) -> Coroutine[Any, Any, None]:
    """:func:`serve_stream` in two steps: set the call up now — its session made and opened
    (:meth:`CallSession.open`: the voice warming up, inbound messages handled as they arrive)
    — and return the coroutine that serves it, to be awaited or run as a task.

    For a server that accepts a stream in a callback (``media_socket.py``): done there, the call
    is ready for its ``start`` before its task's first turn, which is a loop iteration later,
    and tens of milliseconds when hundreds of calls arrive together. The coroutine must be run:
    it ends what the opened session began.
    """
    provider: TTSProvider | None = None
    try:
        provider = state.tts.open()
        session = _new_session(state, transport, provider)
        session.open()
    except Exception as exc:  # a broken voice or hook: the socket must not stay open, unread
        return _close_unserved(transport, provider, exc)
    return _serve_session(state, transport, session)


async def _close_unserved(
    transport: Transport, provider: TTSProvider | None, error: Exception
) -> None:
    """End a stream whose call could not be set up: its socket, and its voice, which may
    already hold a connection (opened by ``session.open()``'s warm-up); then raise ``error``."""
    try:
        await transport.close(1011, "internal error")
    finally:
        if provider is not None:
            try:
                await provider.aclose()
            except Exception as exc:  # logged: the error to raise is the one that ended the call
                log.error("closing the voice of a call not set up failed: %r", exc)
    raise error


async def _serve_session(state: AppState, transport: Transport, session: CallSession) -> None:
    state.metrics.calls_active.inc()
    registered = asyncio.create_task(_register_when_started(state.calls, session))
    try:
        await session.run()
    finally:
        registered.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await registered
        state.calls.discard(session)
        state.metrics.calls_active.dec()
        await transport.close()


def _new_session(state: AppState, transport: Transport, provider: TTSProvider) -> CallSession:
    settings, hooks = state.settings, state.hooks
    barge_in = (
        SpeechOnsetDetector(
            aggressiveness=settings.vad_aggressiveness, min_speech_ms=settings.min_speech_ms
        )
        if settings.barge_in
        else None
    )
    session = CallSession(
        transport,
        provider,
        # An application's on_start handler decides what the call hears first.
        greeting=None if hooks and hooks.handles_start else settings.greeting,
        speak_parameter=not (hooks and hooks.handles_start),
        max_lead=settings.max_lead_ms / 1000,
        max_message_bytes=settings.max_message_bytes,
        max_text_chars=settings.max_text_chars,
        idle_timeout=settings.idle_timeout,
        admit=_token_check(state) if state.tokens is not None else None,
        clock=state.clock,
        metrics=state.metrics,
        barge_in=barge_in,
        interrupt_digits=settings.interrupt_digits,
    )
    if hooks is not None:
        hooks.attach(session)
    return session


async def _media_stream(websocket: WebSocket) -> None:
    """``/twilio`` through ASGI, for any ASGI server. ``callspeak serve`` answers this path
    without ASGI (see ``media_socket.py``); both admit and serve a stream the same way."""
    state = _state(websocket)
    refusal = admit_stream(state, websocket.headers.get(SIGNATURE_HEADER), _client(websocket))
    if refusal is not None:
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(PlainTextResponse(refusal.text, status_code=403))
        else:  # the server turns a close before accept into a bare 403
            await websocket.close(code=1008, reason=refusal.text)
        return
    try:
        await websocket.accept()
        await serve_stream(state, StarletteTransport(websocket))
    finally:
        state.calls.release()


def _token_check(state: AppState) -> Callable[[Start], str | None]:
    tokens = state.tokens
    assert tokens is not None

    def admit(start: Start) -> str | None:
        if tokens.redeem(start.custom_parameters.get(TOKEN_PARAMETER)):
            return None
        state.metrics.calls_refused.labels("token").inc()
        return f"missing, unknown, expired or reused {TOKEN_PARAMETER}"

    return admit


async def _register_when_started(calls: CallRegistry, session: CallSession) -> None:
    await session.wait_started()
    await calls.add(session)


async def _voice(request: Request) -> Response:
    state = _state(request)
    form = await _webhook_form(state, request, VOICE_PATH)
    if isinstance(form, Response):
        return form
    public = state.settings.public_url
    status_callback = None
    if public is not None:
        status_callback = webhook_url_from_public(public, STATUS_PATH)
    else:  # only reachable with validation off: create_app refuses a verifier without it
        # Twilio reaches us through a TLS tunnel or proxy; without a configured public URL the
        # best guess is the Host it used. Set CALLSPEAK_PUBLIC_URL to make this exact.
        public = f"https://{request.headers.get('host', 'localhost')}"
        try:
            stream_url_from_public(public, STREAM_PATH)
        except TwiMLError as exc:  # the client's Host, not this server, is at fault
            return PlainTextResponse(
                f"no stream URL from the Host header ({exc}); set CALLSPEAK_PUBLIC_URL",
                status_code=400,
            )
        log.warning(
            "CALLSPEAK_PUBLIC_URL is not set; guessing the stream URL from Host: %s", public
        )
    parameters = {TOKEN_PARAMETER: state.tokens.issue()} if state.tokens is not None else None
    try:
        twiml = connect_stream_twiml(
            stream_url_from_public(public, STREAM_PATH),
            say=state.settings.notice,
            parameters=parameters,
            status_callback=status_callback,
        )
    except TwiMLError as exc:
        log.error("cannot build TwiML: %s", exc)
        return JSONResponse({"error": str(exc)}, status_code=500)
    return Response(twiml, media_type="application/xml")


async def _status(request: Request) -> Response:
    """Log Twilio's call status (``CallStatus``) and stream status (``StreamEvent``) callbacks."""
    state = _state(request)
    form = await _webhook_form(state, request, STATUS_PATH)
    if isinstance(form, Response):
        return form
    ids = {"call_sid": form.get("CallSid") or "-", "stream_sid": form.get("StreamSid") or "-"}
    stream_event = form.get("StreamEvent")
    if stream_event == "stream-error":
        log.warning("Twilio stream error: %s", form.get("StreamError", "(no detail)"), extra=ids)
    elif stream_event is not None:
        log.info("Twilio stream status: %s", stream_event, extra=ids)
    elif "CallStatus" in form:
        status = form["CallStatus"]
        level = logging.WARNING if status in ("busy", "failed", "no-answer") else logging.INFO
        log.log(level, "Twilio call status: %s", status, extra=ids)
    else:
        log.info("status callback without CallStatus or StreamEvent: %s", sorted(form), extra=ids)
    return Response(status_code=204)


async def _webhook_form(
    state: AppState, request: Request, path: str
) -> ImmutableMultiDict[str, str] | Response:
    """The webhook's form fields if the request may go on; else the 403 (or 4xx) to send.

    The signed URL is the public URL + ``path`` (the route, not the request's path, which a proxy
    may have rewritten) + the query string Twilio sent; the params are the form fields of a POST.
    """
    form = await _read_form(request) if request.method == "POST" else ImmutableMultiDict()
    verifier = state.verifier
    if verifier is None or isinstance(form, Response):
        return form
    query = request.url.query
    check = verifier.check_webhook(
        path + (f"?{query}" if query else ""), form, request.headers.get(SIGNATURE_HEADER)
    )
    if check.ok:
        return form
    state.metrics.signature_refusals.labels(path).inc()
    state.refusals_logged.warning(
        log,
        f"{path} signature",
        "refused %s %s from %s: %s",
        request.method,
        path,
        _client(request),
        check.reason,
    )
    return PlainTextResponse("invalid Twilio signature", status_code=403)


async def _read_form(request: Request) -> ImmutableMultiDict[str, str] | Response:
    """The url-encoded form of a webhook (repeated fields kept), or an error response.

    Parsed here because Starlette's ``request.form()`` needs python-multipart; Twilio only sends
    ``application/x-www-form-urlencoded``. A body is read at most :data:`MAX_FORM_BYTES` far.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("", "application/x-www-form-urlencoded"):
        return PlainTextResponse("expected application/x-www-form-urlencoded", status_code=415)
    try:
        body = await read_body(request, MAX_FORM_BYTES)
    except BodyTooLarge:
        return PlainTextResponse("request body too large", status_code=413)
    except ClientDisconnect:
        return PlainTextResponse("client went away", status_code=400)
    except BodyTimeout as exc:
        return PlainTextResponse(str(exc), status_code=408, headers={"Connection": "close"})
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return PlainTextResponse("request body is not UTF-8", status_code=400)
    return ImmutableMultiDict(parse_qsl(text, keep_blank_values=True))


def _client(connection: Request | WebSocket) -> str:
    client = connection.client
    return f"{client.host}:{client.port}" if client is not None else "unknown client"


async def _health(request: Request) -> Response:
    state = _state(request)
    healthy = state.tts.healthy
    return JSONResponse(
        {
            "status": "ok" if healthy else "degraded",
            "voice": state.tts.name,
            # Fallback voices asked for (CALLSPEAK_FALLBACK) that could not be built or started.
            "missing": list(getattr(state.tts, "missing", [])),
            "calls": len(state.calls),
        },
        status_code=200,
    )


async def _metrics(request: Request) -> Response:
    state = _state(request)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
