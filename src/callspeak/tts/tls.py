"""Whom the Deepgram voices trust over TLS: one answer for both, made once per service.

Loading a CA bundle takes milliseconds of CPU (tens with OpenSSL 3 and a full system store):
each service makes its context once and every connection shares it, never one per connection
on the event loop (asyncio's and websockets' default for ``ssl=True``).
"""

from __future__ import annotations

import os
import ssl

import certifi

__all__ = ["client_tls_context"]


def client_tls_context() -> ssl.SSLContext:
    """The CAs in ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set (a private CA, a proxy's), else
    certifi's bundle: the same on every machine, where the system store may be missing or old."""
    if cafile := os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=cafile)
    if capath := os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=capath)
    return ssl.create_default_context(cafile=certifi.where())
