"""The check every base URL callspeak is given goes through (the public URL, the Twilio API's):
pure, no I/O, so settings and TwiML share it."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["checked_base_url"]


def checked_base_url(name: str, value: str, schemes: str, example: str) -> str:
    """``value`` without a trailing slash, or a ValueError calling it ``name`` (a setting, or
    "public URL"): it must be an absolute URL of ``schemes`` ("https" or "http(s)") with a host,
    a port from 1 to 65535 if it gives one, and no query string or fragment."""
    if "?" in value or "#" in value:
        raise ValueError(f"{name} {value!r} must not carry a query string or fragment")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:  # "https://h:abc", "https://h:99999", "https://[::1"
        raise ValueError(
            f"{name} {value!r} is not a valid URL ({exc}): give a host and optionally a port "
            f"from 1 to 65535, {example}"
        ) from None
    allowed = ("https",) if schemes == "https" else ("https", "http")
    if parts.scheme not in allowed:
        raise ValueError(
            f"{name} {value!r} is not an absolute {schemes} URL with a host, {example}"
        )
    if not parts.hostname:
        raise ValueError(f"{name} {value!r} names no host, {example}")
    if port == 0:
        raise ValueError(f"{name} {value!r} has port 0: give a port from 1 to 65535")
    return value.rstrip("/")
