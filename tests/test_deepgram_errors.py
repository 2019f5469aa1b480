"""Mapping Deepgram error responses to TTSError / TTSAuthError (pure)."""

from __future__ import annotations

import json

import pytest
from websockets.datastructures import Headers

from callspeak.tts.base import APOLOGY, TTSAuthError, TTSError
from callspeak.tts.deepgram_errors import parse_error


def _body(**fields: str) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "INVALID_AUTH"), (402, "PAYMENT_REQUIRED"), (403, "INSUFFICIENT_PERMISSIONS")],
)
def test_auth_errors_name_the_setting(status: int, code: str) -> None:
    error = parse_error(status, _body(err_code=code, err_msg="Nope.", request_id="r-1"), {})
    assert isinstance(error, TTSAuthError)
    assert not error.retryable
    assert (error.status, error.code, error.request_id) == (status, code, "r-1")
    text = str(error)
    assert "DEEPGRAM_API_KEY" in text and "Nope." in text and code in text and "r-1" in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, "refused"),
        (403, "refused"),
        (402, "payment"),
        (429, "too_many"),
        (500, "server"),
        (503, "server"),
        (400, "request"),
        (413, "request"),
    ],
)
def test_each_failure_has_a_kind_for_the_error_metric(status: int, kind: str) -> None:
    """``callspeak_tts_errors_total``'s ``kind`` said only TTSError or TTSAuthError: a 429, a
    5xx and a stall could not be told apart there."""
    assert parse_error(status, _body(err_msg="m"), {}).kind == kind


def test_failures_without_a_status_are_kinds_too() -> None:
    assert TTSError("deepgram", "stalled after 999 bytes", retryable=True).kind == "connection"
    assert TTSError("deepgram", "closed", retryable=False).kind == "other"
    assert TTSAuthError("deepgram", "the API key was refused").kind == "refused"
    apology = TTSError("fallback", "every voice failed", retryable=False, code=APOLOGY)
    assert apology.kind == "apology"


def test_payment_required_names_the_balance() -> None:
    """402: the project has no credit left. A refusal like the key's (health degraded, one
    re-check a minute), but what to fix is the balance, not the key's text."""
    error = parse_error(402, _body(err_msg="Insufficient credits."), {})
    assert isinstance(error, TTSAuthError) and "no credit left" in str(error)
    assert "top up its balance" in str(error)


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (413, False), (415, False), (422, False), (429, True), (500, True)],
)
def test_retryable_by_status(status: int, retryable: bool) -> None:
    error = parse_error(status, _body(err_code="X", err_msg="m", request_id="r"), {})
    assert type(error) is TTSError
    assert error.retryable is retryable
    assert error.code == "X" and error.message == "m"


def test_503_body_uses_error_code() -> None:
    error = parse_error(503, _body(error_code="SERVICE_BUSY", err_msg="Try later."), {})
    assert error.retryable and error.code == "SERVICE_BUSY" and error.message == "Try later."


def test_plain_text_body_and_header_request_id() -> None:
    error = parse_error(502, b"Bad gateway\n<html>\n", {"DG-Request-Id": "hdr-9"})
    assert error.retryable
    assert error.message == "Bad gateway <html>"
    assert error.request_id == "hdr-9" and error.code is None


def test_body_request_id_wins_over_header() -> None:
    error = parse_error(
        400, _body(err_code="Bad Request", request_id="body"), {"dg-request-id": "h"}
    )
    assert error.request_id == "body"
    assert error.message == "HTTP 400 with no error text"


def test_category_shape_and_details() -> None:
    body = _body(category="INVALID_JSON", message="Invalid JSON.", details="line 1", request_id="q")
    error = parse_error(400, body, {})
    assert (error.code, error.message, error.request_id) == (
        "INVALID_JSON",
        "Invalid JSON. (line 1)",
        "q",
    )


def test_empty_body_falls_back_to_dg_error_header() -> None:
    header = json.dumps({"err_code": "INVALID_AUTH", "err_msg": "Bad key", "request_id": "w"})
    error = parse_error(401, b"", {"dg-error": header})
    assert isinstance(error, TTSAuthError)
    assert (error.code, error.request_id) == ("INVALID_AUTH", "w")
    assert "Bad key" in error.message


def test_long_and_binary_bodies_are_one_bounded_line() -> None:
    error = parse_error(500, b"\xff\xfe" + b"x" * 5000, {})
    assert len(error.message) <= 300 and "\n" not in str(error)
    assert parse_error(500, b"", {}).message == "HTTP 500 with no error text"
    assert parse_error(500, b"[1, 2]", {}).message == "[1, 2]"


def test_repeated_headers_of_a_refused_handshake_are_read_not_raised() -> None:
    """websockets' ``Headers`` (a refused WebSocket handshake) raise ``MultipleValuesError`` when
    a repeated name is read as a mapping: a load balancer's two ``Set-Cookie``, or two ids."""
    cookies = Headers([("Set-Cookie", "AWSALB=a"), ("Set-Cookie", "AWSALBCORS=b")])
    error = parse_error(502, b"Bad Gateway", cookies)
    assert error.retryable and error.message == "Bad Gateway" and error.request_id is None
    ids = Headers([("dg-request-id", "first"), ("DG-Request-Id", "second")])
    refused = parse_error(401, b"", ids)
    assert isinstance(refused, TTSAuthError) and refused.request_id == "first"
