"""Turn a failed Deepgram response into a :class:`~callspeak.tts.base.TTSError`. Pure.

Deepgram's documented error body is JSON ``{"err_code", "err_msg", "request_id"}``
(https://developers.deepgram.com/reference/errors). Variants seen in the docs and the field:
503 bodies name the code ``error_code``; some endpoints answer
``{"category", "message", "details", "request_id"}``; proxies in front of the API answer plain text
or nothing. The request id falls back to the ``dg-request-id`` header, and the error text of a
refused WebSocket handshake may come only in the ``dg-error`` header.

Mapping: 401/403 → :class:`TTSAuthError` naming ``DEEPGRAM_API_KEY``; 402 (the project has no
credit left: every request is refused until the balance is topped up) → :class:`TTSAuthError`
too, naming the balance; 408, 429 and 5xx are retryable, a 429 with its ``Retry-After``
(:attr:`TTSError.retry_after`); every other status (400, 413, 415, 422…) is not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping

from callspeak.tts.base import TTSAuthError, TTSError
from callspeak.tts.too_many_requests import parse_retry_after

__all__ = ["API_KEY_SETTING", "is_retryable_status", "parse_error"]

#: The setting an operator fixes when Deepgram refuses the credentials.
API_KEY_SETTING = "DEEPGRAM_API_KEY"

_MAX_MESSAGE = 300


def is_retryable_status(status: int) -> bool:
    """True when sending the same request again may succeed (timeouts, rate limits, 5xx)."""
    return status in (408, 429) or 500 <= status <= 599


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The first value of header ``name`` (lower case), matched case-insensitively, from a plain
    dict, aiohttp's multidict or websockets' ``Headers`` — whose ``get()`` and ``items()`` raise
    ``MultipleValuesError`` for any name sent twice (a load balancer's two ``Set-Cookie``), so
    its ``raw_items()`` are read instead."""
    raw_items = getattr(headers, "raw_items", None)
    pairs: Iterable[tuple[str, str]] = raw_items() if callable(raw_items) else headers.items()
    for key, value in pairs:
        if key.lower() == name:
            return value
    return None


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 1] + "…"


def _fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    """``(code, message, request_id)`` from a JSON or plain-text error body."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return None, (text or None), None

    def pick(*keys: str) -> str | None:
        for key in keys:
            value = data.get(key)
            if value not in (None, ""):
                return str(value)
        return None

    message = pick("err_msg", "message", "reason", "error")
    details = pick("details")
    if details and message:
        message = f"{message} ({details})"
    return (
        pick("err_code", "error_code", "category", "code"),
        message or details,
        pick("request_id"),
    )


def parse_error(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    provider: str = "deepgram",
    now: Callable[[], float] = time.time,
) -> TTSError:
    """The :class:`TTSError` for a non-success Deepgram response. Never raises.

    ``str()`` of the result is one line with the message, status, Deepgram's error code and the
    request id, e.g. ``deepgram: Invalid credentials. status=401 code=INVALID_AUTH
    request_id=…`` (plus the hint to check ``DEEPGRAM_API_KEY`` for 401/403, the balance for
    402). ``now``: the wall clock, for a ``Retry-After`` given as a date.
    """
    code, message, request_id = _fields(body)
    if message is None:
        message = _header(headers, "dg-error")
        if message is not None:
            header_code, header_message, header_id = _fields(message.encode())
            code, message, request_id = (
                code or header_code,
                header_message,
                request_id or header_id,
            )
    request_id = request_id or _header(headers, "dg-request-id")
    text = _one_line(message) if message else f"HTTP {status} with no error text"
    if status in (401, 403):
        what = "refused the API key" if status == 401 else "denied this API key the permission"
        return TTSAuthError(
            provider,
            f"Deepgram {what} ({text}); check the {API_KEY_SETTING} setting",
            status=status,
            code=code,
            request_id=request_id,
        )
    if status == 402:
        return TTSAuthError(
            provider,
            f"Deepgram asks for payment ({text}): the project of {API_KEY_SETTING} has no credit"
            f" left; top up its balance, or set a key of a project that has some",
            status=status,
            code=code,
            request_id=request_id,
        )
    return TTSError(
        provider,
        text,
        retryable=is_retryable_status(status),
        status=status,
        code=code,
        request_id=request_id,
        retry_after=parse_retry_after(_header(headers, "retry-after"), now)
        if status == 429
        else None,
    )
