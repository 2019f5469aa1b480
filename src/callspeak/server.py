"""The callspeak server: Twilio's Media Stream WebSocket, its TwiML webhook, health and metrics.

One process serves HTTP and WebSocket together (Starlette on uvicorn). ``create_app`` takes the
settings and, optionally, a ready TTS service, metrics and clock, so tests and embedders inject
their own. Routes:

* ``WS /twilio`` — one Twilio bidirectional Media Stream per connection (see ``session.py``).
* ``POST /voice`` — TwiML for an incoming call: optional ``<Say>``, then
  ``<Connect><Stream url="wss://PUBLIC/twilio">``. The URL comes from ``CALLSPEAK_PUBLIC_URL``.
* ``GET /healthz`` — ``{"status": "ok"|"degraded", "voice": …, "calls": n}``.
* ``GET /metrics`` — Prometheus text format.
* ``/calls…``, ``/openapi.json``, ``/docs`` — the control API (see ``api.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from callspeak.api import api_routes
from callspeak.bargein import SpeechOnsetDetector
from callspeak.clock import Clock, MonotonicClock
from callspeak.config import Settings
from callspeak.hooks import CallHooks
from callspeak.metrics import Metrics
from callspeak.session import CallSession, TransportClosed
from callspeak.tts.base import TTSService
from callspeak.twiml import TwiMLError, connect_stream_twiml, stream_url_from_public
from callspeak.voices import make_tts_service

__all__ = ["AppState", "CallRegistry", "create_app"]

log = logging.getLogger("callspeak.server")

STREAM_PATH = "/twilio"


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


@dataclass
class AppState:
    settings: Settings
    tts: TTSService
    metrics: Metrics
    clock: Clock
    hooks: CallHooks | None = None
    calls: CallRegistry = field(default_factory=CallRegistry)


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

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed or self._ws.application_state is WebSocketState.DISCONNECTED:
            self._closed = True
            return
        self._closed = True
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await self._ws.close(code, reason)


def create_app(
    settings: Settings,
    *,
    tts: TTSService | None = None,
    metrics: Metrics | None = None,
    clock: Clock | None = None,
    hooks: CallHooks | None = None,
) -> Starlette:
    """Build the ASGI app. Its lifespan starts the TTS service; it closes the service only if it
    made it (an injected service belongs to the caller, who may share it between apps)."""
    owns_tts = tts is None
    state = AppState(
        settings=settings,
        tts=tts or make_tts_service(settings),
        metrics=metrics or Metrics(),
        clock=clock or MonotonicClock(),
        hooks=hooks,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.tts.start()
        log.info("voice: %s", state.tts.name)
        prerender = getattr(state.tts, "prerender", None)
        if prerender is not None and settings.greeting.strip():
            await prerender([settings.greeting])
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
            Route("/voice", _voice, methods=["POST", "GET"]),
            Route("/healthz", _health),
            Route("/metrics", _metrics),
            *api_routes(),
        ],
        lifespan=lifespan,
    )
    app.state.callspeak = state
    return app


def _state(request: Request | WebSocket) -> AppState:
    state: AppState = request.app.state.callspeak
    return state


async def _media_stream(websocket: WebSocket) -> None:
    state = _state(websocket)
    await websocket.accept()
    transport = StarletteTransport(websocket)
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
        state.tts.open(),
        # An application's on_start handler decides what the call hears first.
        greeting=None if hooks and hooks.handles_start else settings.greeting,
        speak_parameter=not (hooks and hooks.handles_start),
        max_lead=settings.max_lead_ms / 1000,
        max_message_bytes=settings.max_message_bytes,
        clock=state.clock,
        metrics=state.metrics,
        barge_in=barge_in,
        interrupt_digits=settings.interrupt_digits,
    )
    if hooks is not None:
        hooks.attach(session)
    state.calls._connections += 1
    state.metrics.calls_active.inc()
    registered = asyncio.create_task(_register_when_started(state.calls, session))
    try:
        await session.run()
    finally:
        registered.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await registered
        state.calls.discard(session)
        state.calls._connections -= 1
        state.metrics.calls_active.dec()
        await transport.close()


async def _register_when_started(calls: CallRegistry, session: CallSession) -> None:
    await session.wait_started()
    await calls.add(session)


async def _voice(request: Request) -> Response:
    state = _state(request)
    public = state.settings.public_url
    if public is None:
        # Twilio reaches us through a TLS tunnel or proxy; without a configured public URL the
        # best guess is the Host it used. Set CALLSPEAK_PUBLIC_URL to make this exact.
        public = f"https://{request.headers.get('host', 'localhost')}"
        log.warning(
            "CALLSPEAK_PUBLIC_URL is not set; guessing the stream URL from Host: %s", public
        )
    try:
        twiml = connect_stream_twiml(
            stream_url_from_public(public, STREAM_PATH), say=state.settings.notice
        )
    except TwiMLError as exc:
        log.error("cannot build TwiML: %s", exc)
        return JSONResponse({"error": str(exc)}, status_code=500)
    return Response(twiml, media_type="application/xml")


async def _health(request: Request) -> Response:
    state = _state(request)
    healthy = state.tts.healthy
    return JSONResponse(
        {
            "status": "ok" if healthy else "degraded",
            "voice": state.tts.name,
            "calls": len(state.calls),
        },
        status_code=200,
    )


async def _metrics(request: Request) -> Response:
    state = _state(request)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
