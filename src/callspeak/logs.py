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
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from logging.handlers import QueueHandler
from typing import Literal, TextIO

__all__ = [
    "LOG_QUEUE_LIMIT",
    "CallIds",
    "LogBudget",
    "configure_logging",
    "flush_logs",
    "held_back",
    "log_as_call",
    "printable_id",
    "stop_log_writer",
]

#: Records waiting for the writer thread at most; beyond, new ones are dropped (and counted).
LOG_QUEUE_LIMIT = 10_000
#: Seconds the process's exit waits for the lines still queued to be written.
EXIT_FLUSH_SECONDS = 2.0


@dataclass(slots=True)
class CallIds:
    """The ids a call's lines carry: ``-`` until its ``start`` names them."""

    call_sid: str = "-"
    stream_sid: str = "-"


#: The call whose work the running task does, for lines logged without ``extra`` ids: a voice
#: failing is logged by the voice, which knows nothing of calls. Mutable, so that work begun
#: before the call's start (a voice warming up) names the call once it is known.
_call_ids: ContextVar[CallIds | None] = ContextVar("callspeak_call_ids", default=None)


def log_as_call(ids: CallIds) -> None:
    """Lines logged from here on in the running task, and in tasks it starts later, carry
    ``ids`` as they are when logged (unless they name a call themselves). Other tasks are
    untouched: each has its own copy of the context."""
    _call_ids.set(ids)


class _CallIds(logging.Filter):
    """Give every record ``call_sid``/``stream_sid`` so formats can always name them: its own,
    else those of the call its task works for (:func:`log_as_call`), else ``-``."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _call_ids.get()
        call_sid = getattr(record, "call_sid", None)
        stream_sid = getattr(record, "stream_sid", None)
        record.call_sid = printable_id(call_sid if call_sid is not None else ids and ids.call_sid)
        record.stream_sid = printable_id(
            stream_sid if stream_sid is not None else ids and ids.stream_sid
        )
        return True


class LogBudget:
    """How many lines of one kind to write: at most ``per_window`` in each ``window`` seconds;
    the first line written after some were held back says how many. For lines anyone can
    cause without a secret (refused requests): one peer must not flood the log, nor push the
    lines of real calls out of the writer's queue. The counters keep the totals."""

    def __init__(
        self,
        per_window: int = 10,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_window = per_window
        self._window = window
        self._clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # start, written, held back

    def take(self, kind: str) -> int | None:
        """None: do not write this line. Else the number of lines of ``kind`` held back
        since the last one written (0 mostly), for the line to say."""
        now = self._clock()
        start, written, held = self._windows.get(kind, (now, 0, 0))
        if now - start >= self._window:
            start, written = now, 0
        if written >= self._per_window:
            self._windows[kind] = (start, written, held + 1)
            return None
        self._windows[kind] = (start, written + 1, 0)
        return held

    def warning(self, logger: logging.Logger, kind: str, msg: str, *args: object) -> None:
        """``logger.warning(msg, *args)`` if the ration of ``kind`` allows, saying how many
        lines like it were held back before it."""
        held = self.take(kind)
        if held is not None:
            logger.warning(msg + "%s", *args, held_back(held))


def held_back(count: int) -> str:
    """What a line says of the ``count`` lines like it not written before it."""
    return f" (and {count} more like it not logged)" if count else ""


#: Longest id a line shows (Twilio's are 34 characters).
_SID_CHARS = 64


def printable_id(sid: object) -> str:
    """``sid`` as a line shows it. The ids come from the peer's ``start``: a line break in one
    would forge log lines, on every line of that call, so anything but printable characters is
    escaped, and a long one is cut."""
    if not sid:
        return "-"
    text = str(sid)
    if not text.isprintable() or " " in text:
        text = repr(text)[1:-1].replace(" ", "\\x20")
    return text if len(text) <= _SID_CHARS else text[:_SID_CHARS] + "…"


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
    """The thread that writes queued records to ``stream``. Not the standard library's
    ``QueueListener`` with a handler: a handler blocked by its reader would hold its lock, and
    ``logging.shutdown()`` at the process's exit waits for every handler's lock, for good; and
    ``QueueListener.stop()`` waits for good too. This one is given
    :data:`EXIT_FLUSH_SECONDS` at exit."""

    def __init__(
        self,
        records: queue.Queue[logging.LogRecord | None],
        stream: TextIO,
        formatter: logging.Formatter,
    ) -> None:
        self.records, self.stream, self.formatter = records, stream, formatter
        self.thread = threading.Thread(target=self._run, name="callspeak-log-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (record := self.records.get()) is not None:
            try:
                self.stream.write(self.formatter.format(record) + "\n")
                self.stream.flush()
            except Exception:  # (a closed or broken stream: nowhere to say so)
                pass
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

    def stop(self, timeout: float) -> bool:
        """Write what is queued (``timeout`` seconds at most), then end the thread; True if
        all was written and the thread ended."""
        if not self.flush(timeout):
            return False
        try:
            self.records.put_nowait(None)
        except queue.Full:  # (other threads logging meanwhile: left to end with the process)
            return False
        self.thread.join(timeout)
        return not self.thread.is_alive()


_writer: _Writer | None = None


def flush_logs(timeout: float = EXIT_FLUSH_SECONDS) -> bool:
    """Wait (``timeout`` seconds at most) until every line logged so far is written; True if it
    was. For a command that reads its own log, and at the process's exit."""
    return _writer is None or _writer.flush(timeout)


def stop_log_writer() -> None:
    """Write what is queued (:data:`EXIT_FLUSH_SECONDS` at most) and end the writer thread.
    Lines logged after that are written as they are logged, if the writer caught up; if its
    reader was stuck, they are dropped (the exit must not wait for that reader). Done at the
    process's exit."""
    global _writer
    writer, _writer = _writer, None
    if writer is None:
        return
    root = logging.getLogger()
    hand_over = [h for h in root.handlers if isinstance(h, _HandOver)]
    if writer.stop(EXIT_FLUSH_SECONDS) and hand_over:
        direct = logging.StreamHandler(writer.stream)
        direct.setFormatter(writer.formatter)
        direct.addFilter(_CallIds())
        root.handlers[:] = [direct if h in hand_over else h for h in root.handlers]


atexit.register(stop_log_writer)


def configure_logging(
    level: str = "info", fmt: Literal["text", "json"] = "text", stream: object = None
) -> None:
    """Send callspeak's (and uvicorn's) logs to stderr (or ``stream``) in the chosen format,
    written by a thread of their own (see the module's docstring). Called again, the lines the
    last call queued are written first (2 s at most), then the new set-up takes over."""
    global _writer
    formatter = (
        _JsonFormatter()
        if fmt == "json"
        else logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s [%(call_sid)s %(stream_sid)s] %(message)s"
        )
    )
    stop_log_writer()  # (the last set-up's lines first)
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(LOG_QUEUE_LIMIT)
    hand_over = _HandOver(records)
    hand_over.addFilter(_CallIds())  # here: the call's ids are the logging task's
    root = logging.getLogger()
    root.handlers[:] = [hand_over]
    root.setLevel(level.upper())
    _writer = _Writer(records, stream or sys.stderr, formatter)  # type: ignore[arg-type]
