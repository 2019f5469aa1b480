"""The control API's OpenAPI 3.1 description, and a self-contained HTML rendering of it.

Schemas come from the pydantic models in ``api_models.py`` (``models_json_schema``), so bodies
cannot drift from what the handlers validate and return; the paths are written out here and
``tests/test_api.py`` checks them against the mounted routes. The docs page loads nothing from
the network (no CDN): it is the spec, rendered as plain HTML.
"""

from __future__ import annotations

import html
import json
from typing import Any

from pydantic.json_schema import models_json_schema

from callspeak import __version__
from callspeak.api_models import (
    CallDetail,
    CallList,
    ClearResponse,
    ErrorBody,
    HangupRequest,
    HangupResponse,
    SayRequest,
    UtteranceOut,
)

__all__ = ["docs_html", "openapi_spec"]

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        401: "Missing or wrong bearer token (a token is configured).",
        403: "No token is configured, and the client is not on loopback or asked for a host "
        "other than loopback (as through a proxy or tunnel).",
        404: "No live call with this callSid (code unknown_call).",
        408: "The body did not arrive whole within 10 s (code body_timeout).",
        409: "The call has ended (code call_ended).",
        413: "The body is far larger than any valid request (code body_too_large).",
        422: "Invalid body or query: invalid_json, invalid_request (with pydantic's `errors`), "
        "nothing_to_say.",
        429: "speech_queue_full (32 utterances already waiting; Retry-After: 1) or "
        "too_many_subscribers.",
    }
    return {str(s): _json("ErrorBody", text[s]) for s in (401, 403, *statuses)}


_CALL_SID = {
    "name": "callSid",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "Twilio's CallSid (CA…), as in start.callSid.",
}


def _paths() -> dict[str, Any]:
    return {
        "/calls": {
            "get": {
                "operationId": "listCalls",
                "summary": "List the live calls",
                "responses": {"200": _json("CallList", "The live calls."), **_errors()},
            }
        },
        "/calls/{callSid}": {
            "get": {
                "operationId": "getCall",
                "summary": "One live call: ids, parameters, phase, speech",
                "parameters": [_CALL_SID],
                "responses": {"200": _json("CallDetail", "The call."), **_errors(404)},
            }
        },
        "/calls/{callSid}/utterances/{utteranceId}": {
            "get": {
                "operationId": "getUtterance",
                "summary": "One recent utterance and what the caller heard of it",
                "parameters": [
                    _CALL_SID,
                    {
                        "name": "utteranceId",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer"},
                    },
                ],
                "responses": {
                    "200": _json("UtteranceOut", "The utterance."),
                    **_errors(404),
                    "404": _json(
                        "ErrorBody",
                        "No live call with this callSid (code unknown_call), or no recent "
                        "utterance with this id (code unknown_utterance).",
                    ),
                },
            }
        },
        "/calls/{callSid}/say": {
            "post": {
                "operationId": "say",
                "summary": "Speak text into the call, after what is already queued",
                "parameters": [
                    _CALL_SID,
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "boolean", "default": False},
                        "description": "Answer once the utterance is played, interrupted, "
                        "cancelled or failed (at most 60 s; still going → 202).",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SayRequest")}},
                },
                "responses": {
                    "200": _json("UtteranceOut", "With ?wait=true: the final record."),
                    "202": _json("UtteranceOut", "Queued. Location: the utterance's resource."),
                    **_errors(404, 408, 409, 413, 422, 429),
                },
            }
        },
        "/calls/{callSid}/clear": {
            "post": {
                "operationId": "clear",
                "summary": "Stop speech now: drop queued text and Twilio's buffered audio",
                "parameters": [_CALL_SID],
                "responses": {
                    "200": _json("ClearResponse", "The utterances stopped."),
                    **_errors(404),
                },
            }
        },
        "/calls/{callSid}/hangup": {
            "post": {
                "operationId": "hangup",
                "summary": "End the call's media stream",
                "parameters": [_CALL_SID],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("HangupRequest")}},
                },
                "responses": {
                    "200": _json("HangupResponse", "Hung up."),
                    **_errors(404, 408, 413, 422),
                },
            }
        },
        "/calls/{callSid}/events": {
            "get": {
                "operationId": "events",
                "summary": "The call's events as Server-Sent Events",
                "description": "One frame per event: `id: n` (from 1), `event: <type>`, "
                "`data: <json>` (type, callSid, streamSid, timestamp, …). Types: call.started, "
                "speech.started, speech.heard, speech.done, speech.interrupted, speech.failed, "
                "dtmf, caller.speaking, call.stopped; `overflow` when this reader fell 1000 "
                "events behind (the stream then ends). `: ping` every 15 s of quiet. "
                "Ends after call.stopped.",
                "parameters": [_CALL_SID],
                "responses": {
                    "200": {
                        "description": "An event stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(404, 429),
                },
            }
        },
    }


def openapi_spec(max_text_chars: int) -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``max_text_chars`` is the server's limit on ``say`` text."""
    _, top = models_json_schema(
        [
            (SayRequest, "validation"),
            (HangupRequest, "validation"),
            (CallList, "serialization"),
            (CallDetail, "serialization"),
            (UtteranceOut, "serialization"),
            (ClearResponse, "serialization"),
            (HangupResponse, "serialization"),
            (ErrorBody, "serialization"),
        ],
        ref_template=_REF,
        by_alias=True,
    )
    schemas: dict[str, Any] = top["$defs"]
    # The upper bound is a setting, checked in a validator; state it in the schema too.
    schemas["SayRequest"]["properties"]["text"]["maxLength"] = max_text_chars
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "callspeak control API",
            "version": __version__,
            "description": "Speak into live Twilio calls. With CALLSPEAK_API_TOKEN set, send "
            "`Authorization: Bearer <token>`; without it only loopback clients are served. "
            'Errors are `{"error": {"code", "message"}}`.',
        },
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        # Bearer token, or none at all (loopback clients while no token is configured).
        "security": [{"bearerAuth": []}, {}],
    }


def docs_html(spec: dict[str, Any]) -> str:
    """A readable, self-contained page for ``spec``: no scripts, no external resources."""
    e = html.escape
    info = spec["info"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{e(info['title'])}</title>",
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;"
        "padding:0 1em}code,pre{font:13px ui-monospace,monospace}pre{background:#f4f4f4;"
        "padding:.6em;overflow:auto}h3{margin-top:1.6em}.m{font-weight:bold;"
        "text-transform:uppercase}</style></head><body>",
        f"<h1>{e(info['title'])} <small>{e(info['version'])}</small></h1>",
        f"<p>{e(info['description'])}</p>",
        '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a>.</p>',
        "<h2>Endpoints</h2>",
    ]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            parts.append(f"<h3><span class=m>{e(method)}</span> <code>{e(path)}</code></h3>")
            parts.append(f"<p>{e(op['summary'])}</p>")
            if "description" in op:
                parts.append(f"<p>{e(op['description'])}</p>")
            params = [
                f"<li><code>{e(p['name'])}</code> ({e(p['in'])}) {e(p.get('description', ''))}"
                for p in op.get("parameters", [])
            ]
            if params:
                parts.append("<p>Parameters:</p><ul>" + "".join(params) + "</ul>")
            body = op.get("requestBody")
            if body:
                ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                parts.append(f'<p>Body: <a href="#{e(ref)}">{e(ref)}</a></p>')
            rows = [
                f"<li><code>{e(status)}</code> {e(resp['description'])}"
                for status, resp in op["responses"].items()
            ]
            parts.append("<p>Responses:</p><ul>" + "".join(rows) + "</ul>")
    parts.append("<h2>Schemas</h2>")
    for name, schema in spec["components"]["schemas"].items():
        parts.append(f'<h3 id="{e(name)}">{e(name)}</h3>')
        parts.append(f"<pre>{e(json.dumps(schema, indent=2))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
