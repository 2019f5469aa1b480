"""A fake of the two Twilio REST endpoints callspeak uses: create a call, update a call.

An in-process Starlette app; serve it on loopback with
:func:`callspeak.testing.asgi_server.serve_asgi` and point
:class:`callspeak.twilio_rest.TwilioCredentials.api_base_url` at the URL it yields.

Faithful where callspeak depends on it: paths, HTTP Basic auth, form-encoded bodies (repeated
fields kept), status codes, Twilio's legacy JSON error shape ``{"code", "message", "more_info",
"status"}`` with documented codes (20003 auth, 20404 not found, 21201 no To, 21213 no From, 21205
no Url/Twiml/ApplicationSid, 32018 TwiML over 4000 characters), and the call resource's fields.
Simplified, and not verified against Twilio: any credentials other than the configured pair (or
a path for another account) get 401/20003; calls stay ``queued`` until :meth:`set_status`; a
redirect (``Twiml``/``Url``) of a finished call gets 400/21220; an unsupported ``Status`` gets
400/20001.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["FakeTwilioRest", "RecordedCall", "RecordedUpdate"]

API_VERSION: Final = "2010-04-01"
_MAX_TWIML: Final = 4000
_FINISHED: Final = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})


@dataclass(frozen=True)
class RecordedCall:
    """One accepted ``POST …/Calls.json``.

    ``fields`` holds the first value of each form field; ``field_lists`` every value, in order
    (``StatusCallbackEvent`` is sent once per event).
    """

    account_sid: str
    call_sid: str
    fields: dict[str, str]
    field_lists: dict[str, list[str]]


@dataclass(frozen=True)
class RecordedUpdate:
    """One accepted ``POST …/Calls/{CallSid}.json`` (hang up, redirect)."""

    account_sid: str
    call_sid: str
    fields: dict[str, str]
    field_lists: dict[str, list[str]]


class _TwilioError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class FakeTwilioRest:
    """The fake server for one account. ``app`` is the ASGI app; ``calls`` and ``updates`` record
    accepted requests in arrival order (rejected ones are not recorded)."""

    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self._auth_token = auth_token
        self.calls: list[RecordedCall] = []
        self.updates: list[RecordedUpdate] = []
        self._resources: dict[str, dict[str, Any]] = {}
        prefix = f"/{API_VERSION}/Accounts/{{account_sid}}"
        self.app = Starlette(
            routes=[
                Route(f"{prefix}/Calls.json", self._create_call, methods=["POST"]),
                Route(f"{prefix}/Calls/{{call_sid}}.json", self._fetch_call, methods=["GET"]),
                Route(f"{prefix}/Calls/{{call_sid}}.json", self._update_call, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    def status_of(self, call_sid: str) -> str:
        """The call's current status (``KeyError`` for an unknown SID)."""
        status: str = self._resources[call_sid]["status"]
        return status

    def set_status(self, call_sid: str, status: str) -> None:
        """Move a call along (``ringing``, ``in-progress``, ``completed``…), as Twilio would."""
        self._resources[call_sid]["status"] = status
        self._resources[call_sid]["date_updated"] = _now()

    async def _create_call(self, request: Request) -> Response:
        try:
            account_sid = self._authenticate(request)
            fields, field_lists = await _read_form(request)
            if not fields.get("To"):
                raise _TwilioError(400, 21201, "No 'To' number is specified")
            if not fields.get("From"):
                raise _TwilioError(400, 21213, "No 'From' number is specified")
            if not any(fields.get(k) for k in ("Url", "Twiml", "ApplicationSid")):
                raise _TwilioError(
                    400,
                    21205,
                    "Url parameter is required. For more information, see "
                    "http://www.twilio.com/docs/api/twiml",
                )
            _check_twiml(fields)
        except _TwilioError as exc:
            return _error(exc)
        call_sid = "CA" + secrets.token_hex(16)
        now = _now()
        self._resources[call_sid] = _call_resource(account_sid, call_sid, fields, now)
        self.calls.append(RecordedCall(account_sid, call_sid, fields, field_lists))
        return JSONResponse(self._resources[call_sid], status_code=201)

    async def _fetch_call(self, request: Request) -> Response:
        try:
            self._authenticate(request)
            return JSONResponse(self._resource(request))
        except _TwilioError as exc:
            return _error(exc)

    async def _update_call(self, request: Request) -> Response:
        try:
            account_sid = self._authenticate(request)
            resource = self._resource(request)
            fields, field_lists = await _read_form(request)
            status = fields.get("Status")
            if status is not None and status not in ("completed", "canceled"):
                raise _TwilioError(400, 20001, "Status must be one of: completed, canceled")
            if (fields.get("Twiml") or fields.get("Url")) and resource["status"] in _FINISHED:
                raise _TwilioError(400, 21220, "Call is not in-progress. Cannot redirect.")
            _check_twiml(fields)
        except _TwilioError as exc:
            return _error(exc)
        if status == "completed" and resource["status"] not in _FINISHED:
            resource["status"] = "completed"
        elif status == "canceled" and resource["status"] in ("queued", "ringing"):
            resource["status"] = "canceled"
        resource["date_updated"] = _now()
        self.updates.append(RecordedUpdate(account_sid, resource["sid"], fields, field_lists))
        return JSONResponse(resource)

    def _authenticate(self, request: Request) -> str:
        """Return the account SID, or raise 401/20003 like Twilio."""
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        user, _, password = decoded.partition(":")
        path_sid = request.path_params["account_sid"]
        ok = (
            scheme.lower() == "basic"
            and hmac.compare_digest(user.encode(), self.account_sid.encode())
            and hmac.compare_digest(password.encode(), self._auth_token.encode())
            and path_sid == self.account_sid
        )
        if not ok:
            raise _TwilioError(401, 20003, "Authenticate")
        return self.account_sid

    def _resource(self, request: Request) -> dict[str, Any]:
        resource = self._resources.get(request.path_params["call_sid"])
        if resource is None:
            raise _TwilioError(
                404, 20404, f"The requested resource {request.url.path} was not found"
            )
        return resource

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        # Unrouted paths and methods answer in Twilio's shape too, not Starlette's plain text.
        # Starlette's router raises only 404 (no route) and 405 (route, other method).
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return _error(_TwilioError(405, 20004, "Method not allowed"))
        message = f"The requested resource {request.url.path} was not found"
        return _error(_TwilioError(404, 20404, message))


async def _read_form(request: Request) -> tuple[dict[str, str], dict[str, list[str]]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise _TwilioError(400, 20001, "Request body must be application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(
            (await request.body()).decode(), keep_blank_values=True, strict_parsing=False
        )
    except UnicodeDecodeError as exc:
        raise _TwilioError(400, 20001, "Request body is not valid UTF-8") from exc
    field_lists: dict[str, list[str]] = {}
    for name, value in pairs:
        field_lists.setdefault(name, []).append(value)
    return {name: values[0] for name, values in field_lists.items()}, field_lists


def _check_twiml(fields: dict[str, str]) -> None:
    if len(fields.get("Twiml", "")) > _MAX_TWIML:
        raise _TwilioError(
            400, 32018, f"Twiml size exceeded maximum allowed value of {_MAX_TWIML} characters"
        )


def _error(exc: _TwilioError) -> Response:
    body = {
        "code": exc.code,
        "message": exc.message,
        "more_info": f"https://www.twilio.com/docs/errors/{exc.code}",
        "status": exc.status,
    }
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if exc.status == 401 else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


def _now() -> str:
    return email.utils.format_datetime(datetime.now(UTC))  # "Tue, 10 Aug 2010 08:02:17 +0000"


def _call_resource(
    account_sid: str, call_sid: str, fields: dict[str, str], now: str
) -> dict[str, Any]:
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Calls/{call_sid}"
    return {
        "account_sid": account_sid,
        "annotation": None,
        "answered_by": None,
        "api_version": API_VERSION,
        "caller_name": None,
        "date_created": now,
        "date_updated": now,
        "direction": "outbound-api",
        "duration": None,
        "end_time": None,
        "forwarded_from": None,
        "from": fields["From"],
        "from_formatted": fields["From"],
        "group_sid": None,
        "parent_call_sid": None,
        "phone_number_sid": None,
        "price": None,
        "price_unit": "USD",
        "queue_time": "0",
        "sid": call_sid,
        "start_time": None,
        "status": "queued",
        "subresource_uris": {
            name: f"{uri}/{name.title().replace('_', '')}.json"
            for name in ("notifications", "recordings", "payments", "events", "siprec", "streams")
        }
        | {"user_defined_message_subscriptions": f"{uri}/UserDefinedMessageSubscriptions.json"},
        "to": fields["To"],
        "to_formatted": fields["To"],
        "trunk_sid": None,
        "uri": f"{uri}.json",
    }
