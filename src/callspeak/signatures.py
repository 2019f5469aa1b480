"""Checking that HTTP webhooks and Media Stream WebSocket upgrades really come from Twilio.

Twilio signs each request with ``X-Twilio-Signature`` = base64(HMAC-SHA1(auth token, URL +
sorted POST params as name+value)). The URL is the one Twilio *requested*, which behind a proxy or
tunnel differs from what the server sees (scheme, host, port), so the verifier always rebuilds it
from the configured public URL and never from the request.

The WebSocket upgrade is signed over the ``wss://`` URL as written in the TwiML, with no params.
Twilio does not document this exactly (see ``shared/reference/twilio-media-streams.md``): log the
result on a first real call before enforcing it, and keep the per-call token
(:func:`new_call_token` in a ``<Parameter>``, redeemed once on ``start``: see
:class:`~callspeak.call_tokens.CallTokenStore`) as a second line of defence.

https://www.twilio.com/docs/usage/webhooks/webhooks-security
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator

from callspeak.twiml import stream_url_from_public, webhook_url_from_public

__all__ = [
    "SIGNATURE_HEADER",
    "SignatureCheck",
    "TwilioSignatureVerifier",
    "new_call_token",
    "sign",
]

SIGNATURE_HEADER: Final = "X-Twilio-Signature"
"""The header carrying the signature (HTTP header names are case-insensitive)."""

_DEFAULT_PORTS: Final = {"https": 443, "wss": 443, "http": 80, "ws": 80}


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome of one signature check; ``reason`` is safe to log (it never holds a secret)."""

    ok: bool
    reason: str


_VALID: Final = SignatureCheck(ok=True, reason="valid")
_MISSING: Final = SignatureCheck(ok=False, reason=f"missing {SIGNATURE_HEADER} header")


class TwilioSignatureVerifier:
    """Verify Twilio's signatures against URLs built from the server's public base URL.

    ``public_url`` is what Twilio is told to call, e.g. ``https://abc.ngrok.app`` or
    ``https://example.com:8443/callspeak``. Raises :class:`ValueError` for an empty ``auth_token``
    and :class:`callspeak.twiml.TwiMLError` (a ``ValueError``) for a malformed ``public_url``
    (scheme, host or port), so a bad one fails here rather than on every request.
    """

    def __init__(self, auth_token: str, public_url: str) -> None:
        if not auth_token:
            raise ValueError("auth_token is empty: set the Twilio auth token to verify signatures")
        webhook_url_from_public(public_url, "/")  # validate now, not on the first request
        self._validator = RequestValidator(auth_token)
        self._public_url = public_url

    def check_webhook(
        self, path: str, params: Mapping[str, str], signature: str | None
    ) -> SignatureCheck:
        """Check a webhook POST to ``path`` (which may include Twilio's query string).

        ``params`` are the form fields as received; a multidict with ``getlist`` (Starlette's
        ``FormData``) is passed through so repeated fields are signed the way Twilio signs them.
        """
        return self._check(webhook_url_from_public(self._public_url, path), params, signature)

    def check_stream_upgrade(self, path: str, signature: str | None) -> SignatureCheck:
        """Check the ``x-twilio-signature`` of the WebSocket upgrade GET on ``path``.

        Validated against the ``wss://`` form of the URL with empty params: a signature computed
        over the ``https://`` form is refused.
        """
        return self._check(stream_url_from_public(self._public_url, path), {}, signature)

    def _check(self, url: str, params: Mapping[str, str], signature: str | None) -> SignatureCheck:
        if not signature:
            return _MISSING
        for candidate in _url_variants(url):
            expected: str = self._validator.compute_signature(candidate, params)
            if hmac.compare_digest(expected.encode(), signature.encode()):
                return _VALID
        return SignatureCheck(
            ok=False,
            reason=f"signature does not match {url} (or TWILIO_AUTH_TOKEN is not this account's)",
        )


def _url_variants(url: str) -> tuple[str, ...]:
    """``url`` without and with its port, as Twilio may sign either.

    Mirrors ``RequestValidator.validate``, which tries both because Twilio's signing is
    inconsistent about ports, but uses 443 as the default for ``wss`` (the library assumes 80 for
    every scheme but https) and compares in constant time. Only the port varies: never the scheme.
    """
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    userinfo = parts.netloc[: len(parts.netloc) - len(host)]
    bare_host = host.rsplit(":", 1)[0] if parts.port is not None else host
    # The URL comes from stream_url_from_public / webhook_url_from_public: one of four schemes.
    port = parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]
    without = urlunsplit(parts._replace(netloc=userinfo + bare_host))
    with_port = urlunsplit(parts._replace(netloc=f"{userinfo}{bare_host}:{port}"))
    return (without, with_port)


def sign(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Return the ``X-Twilio-Signature`` Twilio would send for ``url`` and POST ``params``.

    For the Twilio emulator and tests. ``url`` is used exactly as given (scheme, port, query).
    """
    signature: str = RequestValidator(auth_token).compute_signature(url, params or {})
    return signature


def new_call_token() -> str:
    """Return a fresh unguessable per-call token (URL-safe, 256 bits) for a ``<Parameter>``."""
    return secrets.token_urlsafe(32)
