"""The check every base URL callspeak is given goes through (the public URL, the Twilio API's,
Deepgram's REST and WebSocket ones): pure, no I/O, so settings and TwiML share it."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

__all__ = ["checked_base_url"]


def checked_base_url(
    name: str, value: str, schemes: Literal["https", "http(s)", "ws(s)"], example: str
) -> str:
    """``value`` without a trailing slash, or a ValueError calling it ``name`` (a setting, or
    "public URL"): it must be an absolute URL of ``schemes`` ("https", "http(s)" or "ws(s)")
    with a host, a port from 1 to 65535 (plain digits) if it gives one, and no query string,
    fragment, user name, password, space or control character."""
    if "?" in value or "#" in value:
        raise ValueError(f"{name} {value!r} must not carry a query string or fragment")
    # urlsplit() drops tabs and line breaks without a word, so the URL checked (and signed)
    # would not be the one written into TwiML; a space makes a URL Twilio cannot dial.
    if any(char.isspace() or not char.isprintable() for char in value):
        raise ValueError(f"{name} {value!r} must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:  # "https://h:abc", "https://h:99999", "https://[::1"
        raise ValueError(
            f"{name} {value!r} is not a valid URL ({exc}): give a host and optionally a port "
            f"from 1 to 65535, {example}"
        ) from None
    allowed = {"https": ("https",), "http(s)": ("https", "http"), "ws(s)": ("wss", "ws")}[schemes]
    if parts.scheme not in allowed:
        raise ValueError(
            f"{name} {value!r} is not an absolute {schemes} URL with a host, {example}"
        )
    if not parts.hostname:
        raise ValueError(f"{name} {value!r} names no host, {example}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{name} must not carry a user name or password (URLs are written into the log, "
            f"the public one into TwiML), {example}"
        )
    if port == 0:
        raise ValueError(f"{name} {value!r} has port 0: give a port from 1 to 65535")
    # urlsplit reads "host:" as no port and "host:0443" as 443, but the URL is used as typed
    # (written into TwiML, signed by Twilio) while the signature checks rebuild it from the
    # number: neither "host::443" nor "host:443" is what Twilio signed.
    after_host = parts.netloc.rpartition("@")[2].rpartition("]")[2]
    written = after_host.rpartition(":")[2] if ":" in after_host else None
    if written is not None and written != str(port):
        raise ValueError(
            f"{name} {value!r} has a port written {written!r}: give a port from 1 to 65535 "
            f"as plain digits (no leading zero), or none, {example}"
        )
    return value.rstrip("/")
