from __future__ import annotations

import pytest

from callspeak.signatures import (
    SignatureCheck,
    TwilioSignatureVerifier,
    new_call_token,
    sign,
)
from callspeak.twiml import TwiMLError

TOKEN = "12345678901234567890123456789012"
PUBLIC = "https://callspeak.example.com"
PARAMS = {"CallSid": "CA" + "1" * 32, "From": "+15551230000", "To": "+15559870000"}


@pytest.fixture
def verifier() -> TwilioSignatureVerifier:
    return TwilioSignatureVerifier(TOKEN, PUBLIC)


def test_sign_matches_twilios_published_vector() -> None:
    # The worked example in Twilio's webhook-security docs and every helper library's tests.
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
    assert sign("12345", url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert (
        TwilioSignatureVerifier("12345", "https://mycompany.com")
        .check_webhook("/myapp.php?foo=1&bar=2", params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
        .ok
    )


def test_webhook_valid(verifier: TwilioSignatureVerifier) -> None:
    signature = sign(TOKEN, f"{PUBLIC}/voice", PARAMS)
    assert verifier.check_webhook("/voice", PARAMS, signature) == SignatureCheck(True, "valid")


def test_webhook_params_order_does_not_matter(verifier: TwilioSignatureVerifier) -> None:
    signature = sign(TOKEN, f"{PUBLIC}/voice", PARAMS)
    reordered = dict(reversed(list(PARAMS.items())))
    assert verifier.check_webhook("/voice", reordered, signature).ok


@pytest.mark.parametrize("signature", [None, ""])
def test_webhook_missing_signature(
    verifier: TwilioSignatureVerifier, signature: str | None
) -> None:
    check = verifier.check_webhook("/voice", PARAMS, signature)
    assert check == SignatureCheck(False, "missing X-Twilio-Signature header")


def test_webhook_wrong_signature(verifier: TwilioSignatureVerifier) -> None:
    wrong_token = sign("another-token", f"{PUBLIC}/voice", PARAMS)
    check = verifier.check_webhook("/voice", PARAMS, wrong_token)
    assert check == SignatureCheck(
        False,
        f"signature does not match {PUBLIC}/voice (or TWILIO_AUTH_TOKEN is not this account's)",
    )
    tampered = {**PARAMS, "To": "+15550000000"}
    assert not verifier.check_webhook("/voice", tampered, sign(TOKEN, f"{PUBLIC}/voice", PARAMS)).ok
    assert not verifier.check_webhook("/voice", PARAMS, "not base64 at all").ok


def test_webhook_url_comes_from_public_url_not_request(verifier: TwilioSignatureVerifier) -> None:
    # What the server behind a tunnel sees: plain http on a local port.
    local = sign(TOKEN, "http://127.0.0.1:8000/voice", PARAMS)
    assert not verifier.check_webhook("/voice", PARAMS, local).ok


def test_webhook_signed_over_wss_is_refused(verifier: TwilioSignatureVerifier) -> None:
    signature = sign(TOKEN, "wss://callspeak.example.com/voice", PARAMS)
    assert not verifier.check_webhook("/voice", PARAMS, signature).ok


def test_webhook_signed_with_explicit_default_port_is_accepted(
    verifier: TwilioSignatureVerifier,
) -> None:
    signature = sign(TOKEN, "https://callspeak.example.com:443/voice", PARAMS)
    assert verifier.check_webhook("/voice", PARAMS, signature).ok


def test_webhook_with_query_string_in_path(verifier: TwilioSignatureVerifier) -> None:
    signature = sign(TOKEN, f"{PUBLIC}/status?call=7", PARAMS)
    assert verifier.check_webhook("/status?call=7", PARAMS, signature).ok
    assert not verifier.check_webhook("/status?call=8", PARAMS, signature).ok


def test_stream_upgrade_valid(verifier: TwilioSignatureVerifier) -> None:
    signature = sign(TOKEN, "wss://callspeak.example.com/twilio")
    assert verifier.check_stream_upgrade("/twilio", signature) == SignatureCheck(True, "valid")


def test_stream_upgrade_signed_over_https_is_refused(verifier: TwilioSignatureVerifier) -> None:
    signature = sign(TOKEN, "https://callspeak.example.com/twilio")
    check = verifier.check_stream_upgrade("/twilio", signature)
    assert check == SignatureCheck(
        False,
        "signature does not match wss://callspeak.example.com/twilio "
        "(or TWILIO_AUTH_TOKEN is not this account's)",
    )


@pytest.mark.parametrize("signature", [None, ""])
def test_stream_upgrade_missing(verifier: TwilioSignatureVerifier, signature: str | None) -> None:
    assert verifier.check_stream_upgrade("/twilio", signature) == SignatureCheck(
        False, "missing X-Twilio-Signature header"
    )


def test_stream_upgrade_wrong(verifier: TwilioSignatureVerifier) -> None:
    assert not verifier.check_stream_upgrade("/twilio", sign("x", f"wss://{PUBLIC[8:]}/twilio")).ok
    # Signed over a different path, or with params it does not carry.
    assert not verifier.check_stream_upgrade("/twilio", sign(TOKEN, f"wss://{PUBLIC[8:]}/other")).ok
    signed_with_params = sign(TOKEN, f"wss://{PUBLIC[8:]}/twilio", PARAMS)
    assert not verifier.check_stream_upgrade("/twilio", signed_with_params).ok


def test_stream_upgrade_default_port_is_443_for_wss(verifier: TwilioSignatureVerifier) -> None:
    assert verifier.check_stream_upgrade(
        "/twilio", sign(TOKEN, f"wss://{PUBLIC[8:]}:443/twilio")
    ).ok
    # twilio's RequestValidator.validate would also accept :80 here; we do not.
    assert not verifier.check_stream_upgrade(
        "/twilio", sign(TOKEN, f"wss://{PUBLIC[8:]}:80/twilio")
    ).ok


def test_public_url_with_port_and_prefix() -> None:
    verifier = TwilioSignatureVerifier(TOKEN, "https://h.example:8443/cs/")
    ws = sign(TOKEN, "wss://h.example:8443/cs/twilio")
    assert verifier.check_stream_upgrade("/twilio", ws).ok
    assert not verifier.check_stream_upgrade(
        "/twilio", sign(TOKEN, "https://h.example:8443/cs/twilio")
    ).ok
    hook = sign(TOKEN, "https://h.example:8443/cs/voice", PARAMS)
    assert verifier.check_webhook("/voice", PARAMS, hook).ok
    # Same port, other scheme: refused.
    assert not verifier.check_webhook(
        "/voice", PARAMS, sign(TOKEN, "http://h.example:8443/cs/voice", PARAMS)
    ).ok


def test_construction_refusals() -> None:
    with pytest.raises(ValueError, match="auth_token"):
        TwilioSignatureVerifier("", PUBLIC)
    with pytest.raises(TwiMLError):
        TwilioSignatureVerifier(TOKEN, "https://h.example/?x=1")
    with pytest.raises(TwiMLError):
        TwilioSignatureVerifier(TOKEN, "h.example")


@pytest.mark.parametrize(
    "public",
    [
        "https://h.example:abc",
        "https://h.example:99999",
        "https://h.example:",
        "https://h.example:0443",
    ],
)
def test_a_public_url_with_a_bad_port_is_refused_at_construction_not_per_request(
    public: str,
) -> None:
    with pytest.raises(TwiMLError, match="port from 1 to 65535"):
        TwilioSignatureVerifier(TOKEN, public)


def test_call_tokens() -> None:
    a, b = new_call_token(), new_call_token()
    assert a != b and len(a) >= 43
