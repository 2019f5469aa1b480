"""Logging set-up: text or JSON lines, every line carrying the call's ids when it has them.

Lines are written by a thread of their own, never by the event loop: a log reader that stops
reading (a full pipe, a stuck log shipper) would otherwise stop every call with the next line
logged. The loop only hands records over, to a bounded queue; when that is full a record is
dropped and counted, and the next line that fits says how many were lost.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import queue
import sys
import threading
import time
from contextvars import ContextVar
from logging.handlers import QueueHandler
from typing import Literal

__all__ = ["LOG_QUEUE_LIMIT", "configure_logging", "flush_logs", "log_as_call"]

#: Records waiting for the writer thread at most; beyond, new ones are dropped (and counted).
LOG_QUEUE_LIMIT = 10_000
#: Seconds the process's exit waits for the lines still queued to be written.
EXIT_FLUSH_SECONDS = 2.0

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
        elif record.exc_text:  # (formatted when it was handed to the writer thread)
            entry["exception"] = record.exc_text
        return json.dumps(entry)


class _HandOver(QueueHandler):
    """Hands each record, its message formatted, to the writer thread's queue without waiting;
    a record that finds the queue full is dropped and counted."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # What the message names may change once this returns: formatted now, in this thread.
        # The exception too (its traceback holds frames); its place in the line is the
        # writer's formatter's to choose (a field of its own in JSON).
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.dropped and self._put(_dropped_notice(self.dropped)):
            self.dropped = 0
        if not self._put(record):
            self.dropped += 1

    def _put(self, record: logging.LogRecord) -> bool:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            return False
        return True


def _dropped_notice(count: int) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": __name__,
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": f"{count} log line(s) dropped: whatever reads this log is not keeping up",
            "call_sid": "-",
            "stream_sid": "-",
        }
    )


class _Writer:
    """The thread that writes queued records with ``handler``. Not the standard library's
    ``QueueListener``: its ``stop()`` waits for good on a writer blocked by its reader, and
    would hold the process's exit with it; this one waits :data:`EXIT_FLUSH_SECONDS`."""

    def __init__(
        self, records: queue.Queue[logging.LogRecord | None], handler: logging.Handler
    ) -> None:
        self.records, self.handler = records, handler
        self.thread = threading.Thread(target=self._run, name="callspeak-log-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (record := self.records.get()) is not None:
            try:
                self.handler.handle(record)
            finally:
                self.records.task_done()
        self.records.task_done()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every queued record to be written."""
        deadline = time.monotonic() + timeout
        while self.records.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self, timeout: float) -> None:
        """Write what is queued (``timeout`` seconds at most), then end the thread."""
        if self.flush(timeout):
            self.records.put(None)
            self.thread.join(timeout)


_writer: _Writer | None = None


def flush_logs(timeout: float = EXIT_FLUSH_SECONDS) -> bool:
    """Wait (``timeout`` seconds at most) until every line logged so far is written; True if it
    was. For a command that reads its own log, and at the process's exit."""
    return _writer is None or _writer.flush(timeout)


def _stop_writer() -> None:
    global _writer
    writer, _writer = _writer, None
    if writer is not None:
        writer.stop(EXIT_FLUSH_SECONDS)


atexit.register(_stop_writer)


def configure_logging(
    level: str = "info", fmt: Literal["text", "json"] = "text", stream: object = None
) -> None:
    """Send callspeak's (and uvicorn's) logs to stderr (or ``stream``) in the chosen format,
    written by a thread of their own (see the module's docstring). Called again, the lines the
    last call queued are written first (2 s at most), then the new set-up takes over."""
    global _writer
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)-7s %(name)s [%(call_sid)s %(stream_sid)s] %(message)s"
            )
        )
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(LOG_QUEUE_LIMIT)
    hand_over = _HandOver(records)
    hand_over.addFilter(_CallIds())  # here: the call's ids are the logging task's
    root = logging.getLogger()
    root.handlers[:] = [hand_over]
    root.setLevel(level.upper())
    _stop_writer()
    _writer = _Writer(records, handler)
