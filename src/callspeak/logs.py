"""Logging set-up: text or JSON lines, every line carrying the call's ids when it has them."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Literal

__all__ = ["configure_logging", "log_as_call"]

#: The call whose work the running task does, for lines logged without ``extra`` ids: a voice
#: failing is logged by the voice, which knows nothing of calls.
_call_ids: ContextVar[tuple[str, str] | None] = ContextVar("callspeak_call_ids", default=None)


def log_as_call(call_sid: str, stream_sid: str) -> None:
    """Lines logged from here on in the running task, and in tasks it starts later, name this
    call (unless they name one themselves). Other tasks are untouched: each has its own copy
    of the context."""
    _call_ids.set((call_sid, stream_sid))


class _CallIds(logging.Filter):
    """Give every record ``call_sid``/``stream_sid`` so formats can always name them: its own,
    else those of the call its task works for (:func:`log_as_call`), else ``-``."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _call_ids.get()
        if not hasattr(record, "call_sid"):
            record.call_sid = ids[0] if ids else "-"
        if not hasattr(record, "stream_sid"):
            record.stream_sid = ids[1] if ids else "-"
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("call_sid", "stream_sid"):
            value = getattr(record, key, "-")
            if value != "-":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(
    level: str = "info", fmt: Literal["text", "json"] = "text", stream: object = None
) -> None:
    """Send callspeak's (and uvicorn's) logs to stderr in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.addFilter(_CallIds())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)-7s %(name)s [%(call_sid)s %(stream_sid)s] %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
