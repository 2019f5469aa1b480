"""The control API: list live calls, speak into one, clear it, hang it up, follow its events.

Routes (mounted by :func:`callspeak.server.create_app`; bodies are JSON, see ``api_models.py``;
the full contract is served at ``GET /openapi.json`` and rendered at ``GET /docs``):

* ``GET /calls`` · ``GET /calls/{callSid}`` · ``GET /calls/{callSid}/utterances/{id}``
* ``POST /calls/{callSid}/say`` ``{"text", "interruptible"}`` → 202 (``?wait=true``: 200 once
  its status is final, at most :data:`WAIT_LIMIT` seconds, else 202)
* ``POST /calls/{callSid}/clear`` · ``POST /calls/{callSid}/hangup`` ``{"afterSpeech"}``
* ``GET /calls/{callSid}/events`` — Server-Sent Events (``api_events.py``)

Access (:func:`check_access`): with ``CALLSPEAK_API_TOKEN`` set, every ``/calls`` request needs
``Authorization: Bearer <token>`` (401 otherwise), loopback clients included; without a token only
loopback clients that also name a loopback host (``Host: 127.0.0.1:5000``, ``localhost``) are
served (403 otherwise). The spec and docs pages carry no call data and are
public. Errors are ``{"error": {"code", "message"[, "errors"]}}``: 401 ``unauthorized``,
403 ``forbidden``, 404 ``unknown_call``/``unknown_utterance``/``not_found``,
405 ``method_not_allowed``, 408 ``body_timeout``, 409 ``call_ended``, 413 ``body_too_large``,
422 ``invalid_json``/``invalid_request``/``nothing_to_say``,
429 ``speech_queue_full``/``too_many_subscribers``, 500 ``internal_error``. Starlette's own
404 and 405 get that shape on the API's paths through :func:`api_exception_handlers`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import secrets
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pydantic import BaseModel, SecretStr, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Route
from starlette.types import HTTPExceptionHandler, Message, Receive, Scope, Send

from callspeak.api_events import DEFAULT_HEARTBEAT, DEFAULT_QUEUE_LIMIT, EventSubscription
from callspeak.api_models import (
    CallList,
    ClearResponse,
    HangupRequest,
    HangupResponse,
    SayRequest,
    call_detail,
    call_summary,
    utterance_out,
)
from callspeak.api_openapi import docs_html, openapi_spec
from callspeak.session import CallSession, SessionClosed, SpeechQueueFull
from callspeak.speech import Utterance

if TYPE_CHECKING:  # server.py mounts these routes: a runtime import would be circular
    from callspeak.server import AppState

__all__ = [
    "BODY_SECONDS",
    "BodyTimeout",
    "BodyTooLarge",
    "WAIT_LIMIT",
    "ApiError",
    "api_exception_handlers",
    "api_routes",
    "read_body",
    "check_access",
    "is_api_path",
    "is_loopback",
    "names_loopback",
]

log = logging.getLogger("callspeak.api")

#: Longest ``?wait=true`` on ``say``, in seconds.
WAIT_LIMIT = 60.0
#: Utterances said through the API that ``GET /calls/{sid}`` still shows once finished.
HISTORY = 20
#: Event-stream subscribers per call (each holds a queue of up to ``queue_limit`` events).
MAX_SUBSCRIBERS = 16

_Model = TypeVar("_Model", bound=BaseModel)


#: Seconds a request body (an API request's JSON, a webhook's form) has to arrive whole. A client
#: that sends part of one and stops would otherwise hold its request open for good — and with
#: it the server's shutdown, which waits for requests in flight.
BODY_SECONDS: Final = 10.0


class BodyTooLarge(Exception):
    """A request body went past the limit :func:`read_body` was given."""


class BodyTimeout(Exception):
    """A request body did not arrive whole within :data:`BODY_SECONDS`."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, read at most ``limit`` bytes far (:class:`BodyTooLarge` past that)
    and whole within :data:`BODY_SECONDS` (:class:`BodyTimeout` otherwise, its message the
    reason to answer 408 with). For the API's JSON and the webhooks' forms alike."""
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_SECONDS):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(limit)
    except TimeoutError:
        raise BodyTimeout(f"request body not received within {BODY_SECONDS:g} s") from None
    return bytes(body)


class ApiError(Exception):
    """An error response: ``status`` and ``{"error": {"code", "message"[, "errors"]}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        detail: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.errors is not None:
            detail["errors"] = self.errors
        return JSONResponse({"error": detail}, self.status, headers=self.headers)


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback. Anything else — a name, a Unix
    socket's missing address — is not loopback: when unsure, ask for a token."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def names_loopback(host_header: str | None) -> bool:
    """True when a ``Host`` header names this machine: ``localhost`` (or a ``.localhost``
    name, RFC 6761) or a loopback address, with or without a port. A missing header is not."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:5000
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.removesuffix(".")
    return host == "localhost" or host.endswith(".localhost") or is_loopback(host)


def check_access(
    token: SecretStr | None,
    authorization: str | None,
    client_host: str | None,
    host_header: str | None,
) -> ApiError | None:
    """The access rule, as a pure function: None to serve the request, else the error to send.

    With a token configured the request must carry ``Authorization: Bearer <token>`` (compared
    in constant time), wherever it comes from. Without one, only loopback clients are served:
    a server exposed for Twilio's webhook must not also hand out control of its calls. The
    request must then also name a loopback host (``host_header``): a tunnel's agent or a
    reverse proxy on the same machine that passes on the public host it was asked for (ngrok
    by default, nginx with ``proxy_set_header Host $host``) connects from loopback but names
    that host, and a web page whose name was made to resolve to 127.0.0.1 (DNS rebinding) names
    its own. A proxy that names its upstream instead — nginx's default (``Host: $proxy_host``,
    i.e. ``127.0.0.1:5000``) with no ``X-Forwarded-For`` — looks exactly like a local client
    and is served: nothing here can tell them apart, hence the token.
    """
    if token is None:
        if not is_loopback(client_host):
            return ApiError(
                403,
                "forbidden",
                f"the control API serves only loopback clients until CALLSPEAK_API_TOKEN is "
                f"set (this request came from {client_host or 'an unknown address'})",
            )
        if not names_loopback(host_header):
            return ApiError(
                403,
                "forbidden",
                f"the control API serves only requests made to this machine by name "
                f"(Host: 127.0.0.1 or localhost) until CALLSPEAK_API_TOKEN is set; this one "
                f"asked for {host_header or 'no host'!r}, as through a proxy or tunnel",
            )
        return None
    # Only ASCII blanks are stripped: the header arrives latin-1 decoded, where str.strip()
    # would also take U+0085 and U+00A0, the last byte of a UTF-8 "Å" or "à" in a token.
    scheme, _, credentials = (authorization or "").strip(" \t").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip(" \t"):
        return ApiError(
            401,
            "unauthorized",
            "missing bearer token: send 'Authorization: Bearer <CALLSPEAK_API_TOKEN>'",
            headers={"WWW-Authenticate": 'Bearer realm="callspeak"'},
        )
    # Headers arrive latin-1 decoded; compare raw bytes so any token compares without raising.
    given = credentials.strip(" \t").encode("latin-1", "replace")
    if not secrets.compare_digest(given, token.get_secret_value().encode()):
        return ApiError(
            401,
            "unauthorized",
            "invalid bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="callspeak", error="invalid_token"'},
        )
    return None


def _max_text_chars(state: AppState) -> int:
    return state.settings.max_text_chars


class _ControlApi:
    """The routes of one app, and the little state they keep beside the sessions."""

    def __init__(self, *, heartbeat: float, queue_limit: int) -> None:
        self.heartbeat = heartbeat
        self.queue_limit = queue_limit
        # Keyed weakly by session so that a call's entries go when the call does.
        self._history: weakref.WeakKeyDictionary[CallSession, deque[Utterance]] = (
            weakref.WeakKeyDictionary()
        )
        self._subscribers: weakref.WeakKeyDictionary[CallSession, int] = weakref.WeakKeyDictionary()

    def routes(self) -> list[BaseRoute]:
        guarded = self._guarded
        return [
            Route("/calls", guarded(self.list_calls), methods=["GET"]),
            Route("/calls/{call_sid}", guarded(self.get_call), methods=["GET"]),
            Route(
                "/calls/{call_sid}/utterances/{utterance_id:int}",
                guarded(self.get_utterance),
                methods=["GET"],
            ),
            Route("/calls/{call_sid}/say", guarded(self.say), methods=["POST"]),
            Route("/calls/{call_sid}/clear", guarded(self.clear), methods=["POST"]),
            Route("/calls/{call_sid}/hangup", guarded(self.hangup), methods=["POST"]),
            Route("/calls/{call_sid}/events", guarded(self.events), methods=["GET"]),
            Route("/openapi.json", self.spec, methods=["GET"]),
            Route("/docs", self.docs, methods=["GET"]),
        ]

    @staticmethod
    def _guarded(
        handler: Callable[[Request, AppState], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            state: AppState = request.app.state.callspeak
            denied = check_access(
                state.settings.api_token,
                request.headers.get("authorization"),
                request.client.host if request.client else None,
                request.headers.get("host"),
            )
            if denied is not None:
                return denied.response()
            try:
                return await handler(request, state)
            except ApiError as exc:
                return exc.response()
            except Exception:  # a bug: logged, and answered in the API's error shape all the same
                log.exception("%s %s failed", request.method, request.url.path)
                message = "the server failed to carry the request out (see its log)"
                return ApiError(500, "internal_error", message).response()

        return endpoint

    # -- reading ---------------------------------------------------------------------------

    async def list_calls(self, request: Request, state: AppState) -> Response:
        calls = CallList(calls=[call_summary(s) for s in state.calls.all()])
        return JSONResponse(calls.wire())

    async def get_call(self, request: Request, state: AppState) -> Response:
        session = _session(request, state)
        return JSONResponse(call_detail(session, self._recent(session)).wire())

    async def get_utterance(self, request: Request, state: AppState) -> Response:
        session = _session(request, state)
        wanted = request.path_params["utterance_id"]
        for utterance in self._recent(session):
            if utterance.id == wanted:
                return JSONResponse(utterance_out(session.call_sid, utterance).wire())
        raise ApiError(
            404,
            "unknown_utterance",
            f"call {session.call_sid} has no utterance {wanted} (or it is too old to be kept)",
        )

    def _recent(self, session: CallSession) -> list[Utterance]:
        """Oldest first: every unfinished utterance (at most the speech queue's limit, plus the
        one speaking — each is still reachable at the Location ``say`` gave it), and the last
        :data:`HISTORY` finished ones said through the API."""
        by_id = {u.id: u for u in self._history.get(session, ())}
        by_id.update({u.id: u for u in session.utterances})
        ordered = [by_id[i] for i in sorted(by_id)]
        kept = {u.id for u in [u for u in ordered if u.status.final][-HISTORY:]}
        return [u for u in ordered if not u.status.final or u.id in kept]

    def _remember(self, session: CallSession, utterance: Utterance) -> None:
        """Keep ``utterance`` for :meth:`_recent` once the session forgets it (when it ends).
        What is dropped is only the oldest *finished* ones past :data:`HISTORY`: an unfinished
        one dropped here would answer 404 at its Location as soon as it finished (a cap on all
        of them lost the first of 25 queued the moment it played). Unfinished ones are at most
        the speech queue's limit plus the few being heard, so this stays bounded."""
        history = self._history.setdefault(session, deque())
        history.append(utterance)
        excess = sum(u.status.final for u in history) - HISTORY
        if excess > 0:
            kept: deque[Utterance] = deque()
            for u in history:
                if excess > 0 and u.status.final:
                    excess -= 1
                else:
                    kept.append(u)
            self._history[session] = kept

    # -- acting ----------------------------------------------------------------------------

    async def say(self, request: Request, state: AppState) -> Response:
        session = _session(request, state)
        wait = _flag(request, "wait")
        body = await _parse(
            request, SayRequest, state, context={"max_text_chars": _max_text_chars(state)}
        )
        sid = session.call_sid
        try:
            utterance = session.say(body.text, interruptible=body.interruptible)
        except SessionClosed as exc:
            raise ApiError(409, "call_ended", f"call {sid} has ended: {exc}") from exc
        except SpeechQueueFull as exc:
            raise ApiError(
                429, "speech_queue_full", str(exc), headers={"Retry-After": "1"}
            ) from exc
        except ValueError as exc:
            raise ApiError(422, "nothing_to_say", str(exc)) from exc
        self._remember(session, utterance)
        if wait:
            try:
                async with asyncio.timeout(WAIT_LIMIT):
                    await utterance.wait()
            except TimeoutError:
                pass  # still going: answered 202 with the status so far
        out = utterance_out(sid, utterance)
        return JSONResponse(
            out.wire(),
            200 if utterance.status.final else 202,
            headers={"Location": out.url},
        )

    async def clear(self, request: Request, state: AppState) -> Response:
        session = _session(request, state)
        stopped = await session.clear()
        sid = session.call_sid
        body = ClearResponse(call_sid=sid, cleared=[utterance_out(sid, u) for u in stopped])
        return JSONResponse(body.wire())

    async def hangup(self, request: Request, state: AppState) -> Response:
        session = _session(request, state)
        body = await _parse(request, HangupRequest, state, empty_ok=True)
        # Bounded: ``hangup`` waits for speech at most its 30 s grace.
        await session.hangup(after_speech=body.after_speech)
        return JSONResponse(
            HangupResponse(call_sid=session.call_sid, after_speech=body.after_speech).wire()
        )

    async def events(self, request: Request, state: AppState) -> Response:
        session = _session(request, state)
        if request.method == "HEAD":
            # Starlette answers HEAD on a GET route by running it: a HEAD must not take one of
            # the call's subscriber slots (its body, the stream, is never sent, so nothing would
            # ever notice the client had gone and give the slot back).
            return Response(media_type="text/event-stream", headers=_EVENT_STREAM_HEADERS)
        count = self._subscribers.get(session, 0)
        if count >= MAX_SUBSCRIBERS:
            raise ApiError(
                429,
                "too_many_subscribers",
                f"call {session.call_sid} already has {count} event subscribers",
            )
        # Subscribe before answering: once the client has the headers, no event is missed.
        subscription = EventSubscription(
            session, limit=self.queue_limit, first=session.started_event
        )
        self._subscribers[session] = count + 1
        sid = session.call_sid

        def release() -> None:
            subscription.close()
            self._subscribers[session] = max(0, self._subscribers.get(session, 1) - 1)

        return _EventStreamResponse(
            subscription.frames(
                heartbeat=self.heartbeat, alive=lambda: state.calls.get(sid) is session
            ),
            on_close=release,
            # A client that stops reading holds its subscriber slot until the call ends, or
            # until the socket's buffers are full and a send has waited this long (then it is
            # dropped): a few events a minute take long to fill them.
            send_timeout=max(2 * self.heartbeat, 10.0),
        )

    # -- documentation ---------------------------------------------------------------------

    async def spec(self, request: Request) -> Response:
        state: AppState = request.app.state.callspeak
        return Response(_spec_json(_max_text_chars(state)), media_type="application/json")

    async def docs(self, request: Request) -> Response:
        state: AppState = request.app.state.callspeak
        return HTMLResponse(
            _docs_page(_max_text_chars(state)),
            # The page is self-contained; forbid it from loading anything at all.
            headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
        )


# The spec and its page depend only on max_text_chars, and building them (pydantic's JSON
# schemas) takes some 6 ms of the event loop that paces every call's audio: made once, not on
# every request to these public, unauthenticated routes.
@functools.lru_cache(maxsize=4)
def _spec_json(max_text_chars: int) -> bytes:
    return json.dumps(openapi_spec(max_text_chars), separators=(",", ":")).encode()


@functools.lru_cache(maxsize=4)
def _docs_page(max_text_chars: int) -> str:
    return docs_html(openapi_spec(max_text_chars))


#: No caching, and no buffering in nginx-like proxies: events must arrive as sent.
_EVENT_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that runs ``on_close`` however it ends: finished,
    cancelled because the client went away, failed before the first frame, or given up on
    because one send waited ``send_timeout`` seconds for a client that does not read (the
    connection is then dropped)."""

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        on_close: Callable[[], None],
        send_timeout: float,
    ) -> None:
        super().__init__(
            frames,
            media_type="text/event-stream",
            headers=_EVENT_STREAM_HEADERS,
        )
        self._on_close = on_close
        self._send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        expired = False

        async def bounded(message: Message) -> None:
            nonlocal expired
            try:
                async with asyncio.timeout(self._send_timeout):
                    await send(message)
            except TimeoutError:
                expired = True
                raise

        try:
            await super().__call__(scope, receive, bounded)
        except (TimeoutError, ClientDisconnect):  # (Starlette turns an OSError into the latter)
            if not expired:
                raise
            # Returning with the response unfinished makes the server drop the connection.
            log.warning(
                "event stream client %s read nothing for %g s; dropped",
                scope.get("client"),
                self._send_timeout,
            )
        finally:
            self._on_close()


def _session(request: Request, state: AppState) -> CallSession:
    call_sid = request.path_params["call_sid"]
    session = state.calls.get(call_sid)
    if session is None:
        raise ApiError(404, "unknown_call", f"no live call {call_sid}")
    return session


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value in ("true", "1", "yes", ""):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ApiError(422, "invalid_request", f"?{name}= takes true or false, not {value!r}")


async def _parse(
    request: Request,
    model: type[_Model],
    state: AppState,
    *,
    context: dict[str, Any] | None = None,
    empty_ok: bool = False,
) -> _Model:
    """Read a JSON body (at most a bound derived from ``max_text_chars``) into ``model``."""
    # 12 bytes a character: an emoji JSON-escaped as ASCII ("\\ud83d\\ude00"), as Python's json
    # and requests send it by default.
    limit = max(64 * 1024, 12 * _max_text_chars(state) + 4096)
    try:
        body = await read_body(request, limit)
    except BodyTooLarge:
        raise ApiError(413, "body_too_large", f"request body over {limit} bytes") from None
    except BodyTimeout as exc:
        raise ApiError(408, "body_timeout", str(exc), headers={"Connection": "close"}) from None
    except ClientDisconnect:  # nobody to answer; not an error of ours to log
        raise ApiError(400, "client_disconnected", "the client went away") from None
    if empty_ok and not body.strip():
        body = b"{}"
    try:
        body.decode("utf-8")  # (pydantic cannot report an error holding bytes that are not)
    except UnicodeDecodeError as exc:  # reported as pydantic reports JSON it cannot parse
        message = f"the body is not UTF-8: {exc.reason} at byte {exc.start}"
        error = {"type": "json_invalid", "loc": [], "msg": message}
        raise ApiError(422, "invalid_json", message, errors=[error]) from None
    try:
        return model.model_validate_json(bytes(body), context=context)
    except ValidationError as exc:
        errors: list[dict[str, Any]] = json.loads(exc.json(include_url=False))
        bad_json = any(e.get("type") == "json_invalid" for e in errors)
        raise ApiError(
            422,
            "invalid_json" if bad_json else "invalid_request",
            "the body is not valid JSON"
            if bad_json
            else "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors),
            errors=errors,
        ) from exc


def api_routes(
    *, heartbeat: float = DEFAULT_HEARTBEAT, queue_limit: int = DEFAULT_QUEUE_LIMIT
) -> list[BaseRoute]:
    """The control API's routes, reading ``request.app.state.callspeak`` (an ``AppState``).

    ``heartbeat`` is the seconds of quiet before an event stream sends ``: ping``;
    ``queue_limit`` how many events a subscriber may fall behind before it is dropped.
    """
    return _ControlApi(heartbeat=heartbeat, queue_limit=queue_limit).routes()


def is_api_path(path: str) -> bool:
    """True for the control API's paths: ``/calls`` and everything under it, the spec, the docs."""
    return path == "/calls" or path.startswith("/calls/") or path in ("/openapi.json", "/docs")


def api_exception_handlers() -> dict[Any, HTTPExceptionHandler]:
    """Handlers for the app's ``exception_handlers``: Starlette's 404 (no route matches, e.g.
    ``/calls/CA1/utterances/abc``) and 405 (e.g. ``DELETE /calls/CA1``) as the API's JSON
    errors ``not_found`` and ``method_not_allowed`` on :func:`is_api_path` paths, and as
    Starlette's plain text everywhere else."""
    return {404: _http_error, 405: _http_error}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if not is_api_path(path):
        return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = headers.get("Allow", "")
        message = f"{request.method} is not allowed on {path} (allowed: {allowed})"
        return ApiError(405, "method_not_allowed", message, headers=headers).response()
    message = f"no such resource: {path} (the API is described at /openapi.json)"
    return ApiError(exc.status_code, "not_found", message, headers=headers).response()
