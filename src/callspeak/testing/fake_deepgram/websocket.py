"""One accepted ``/v1/speak`` WebSocket after the handshake (which :class:`FakeDeepgram` does).

Contract: client messages are handled strictly in order. ``Speak`` texts are buffered; ``Flush``
sends the buffer's audio in ``fake.chunk_size`` binary messages ``fake.first_byte_delay`` after
the Flush was read from the socket (as Deepgram's time to first byte runs from its arrival),
then ``Flushed`` with a sequence id counting from 0, unless the flush limit (``fake.flush_limit``
per ``fake.flush_window`` seconds) is reached, when a ``FLUSH_LIMIT`` ``Warning`` replaces it.
``Clear`` drops the buffer and any audio of earlier flushes not yet sent, then sends ``Cleared``.
``Close`` flushes what is buffered and closes with 1000. A binary message closes with 1003, a
``Speak`` over :data:`MAX_CHARS` with 1009; unparsable or unknown messages get a ``Warning``.
WebSocket faults (``ws_*``) are taken from ``faults`` once per flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from callspeak.testing.fake_deepgram.audio import synthesize
from callspeak.testing.fake_deepgram.faults import Fault, take
from callspeak.testing.fake_deepgram.validation import MAX_CHARS

if TYPE_CHECKING:
    from callspeak.testing.fake_deepgram import FakeDeepgram

__all__ = ["ABRUPT_CLOSE", "Peer", "WebSocketSession"]

log = logging.getLogger("callspeak.testing.fake_deepgram")

#: The close code of a ``ws_close`` fault that drops the connection without a close frame.
ABRUPT_CLOSE = 1006


class Peer(Protocol):
    """The client's end of an accepted socket, as the session needs it."""

    async def receive(self) -> tuple[str | bytes, float] | None:
        """The next message and when it was read from the socket (``fake.clock()``); None once
        the client has closed or gone."""

    async def send_text(self, text: str) -> None:
        """Raises ``ConnectionError`` once the socket is closing or gone."""

    async def send_bytes(self, data: bytes) -> None:
        """Raises ``ConnectionError`` once the socket is closing or gone."""

    async def close(self, code: int = 1000, reason: str = "") -> None: ...

    def abort(self) -> None:
        """Drop the connection at once, without a close frame."""


def _json(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


class WebSocketSession:
    """One accepted WebSocket: a reader that parses client messages into ordered operations and a
    writer that performs them, so a ``Clear`` can stop audio of earlier flushes mid-way."""

    def __init__(
        self, fake: FakeDeepgram, ws: Peer, encoding: str, rate: int, faults: deque[Fault]
    ) -> None:
        self.fake, self.ws, self.encoding, self.rate = fake, ws, encoding, rate
        self.faults = faults
        self.buffer: list[str] = []
        self.generation = 0  # bumped by Clear; audio of older generations is dropped
        self.woken = asyncio.Event()
        self.ops: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.flush_times: deque[float] = deque()
        self.flushed_seq = self.cleared_seq = 0

    async def run(self) -> None:
        """Serve the socket until the client leaves or either side closes it."""
        writer = asyncio.create_task(self._write_loop())
        try:
            if await self._read_loop():  # the client sent Close: let the writer finish
                await asyncio.wait({writer}, timeout=self.fake.stall_limit)
        finally:
            writer.cancel()
            await asyncio.wait({writer})

    async def _read_loop(self) -> bool:
        """Turn client messages into ops; True when the writer should be let finish."""
        while True:
            received = await self.ws.receive()
            if received is None:
                self.woken.set()
                return False
            message, at = received
            if isinstance(message, bytes):
                self.ops.put_nowait(("close", (1003, "Binary messages are not accepted.")))
                return True
            try:
                data = json.loads(message)
                kind = data["type"]
            except (ValueError, TypeError, KeyError):
                self.ops.put_nowait(("warn", ("Could not parse the message.", "INVALID_MESSAGE")))
                continue
            self.fake.ws_messages.append(data)
            if kind == "Speak":
                text = data.get("text")
                if not isinstance(text, str) or len(text) > MAX_CHARS:
                    self.ops.put_nowait(
                        ("close", (1009, f"Speak text over {MAX_CHARS} characters."))
                    )
                    return True
                self.buffer.append(text)
            elif kind == "Flush":
                self._flush(at)
            elif kind == "Clear":
                self.buffer.clear()
                self.generation += 1
                self.woken.set()
                self.ops.put_nowait(("clear", None))
            elif kind == "Close":
                if self.buffer:
                    self.ops.put_nowait(("flush", (self.generation, "".join(self.buffer), at)))
                self.ops.put_nowait(("close", (1000, "")))
                return True
            else:
                self.ops.put_nowait(
                    ("warn", (f"Unknown message type {kind!r}.", "INVALID_MESSAGE"))
                )

    def _flush(self, now: float) -> None:
        while self.flush_times and now - self.flush_times[0] >= self.fake.flush_window:
            self.flush_times.popleft()
        if len(self.flush_times) >= self.fake.flush_limit:
            description = (
                f"Flush limit of {self.fake.flush_limit} per {self.fake.flush_window:g} s"
                " reached; flush ignored."
            )
            self.ops.put_nowait(("warn", (description, "FLUSH_LIMIT")))
            return
        self.flush_times.append(now)
        self.ops.put_nowait(("flush", (self.generation, "".join(self.buffer), now)))
        self.buffer.clear()

    async def _write_loop(self) -> None:
        try:
            while True:
                op, arg = await self.ops.get()
                if op == "flush" and not await self._speak(*arg):
                    return
                if op == "clear":
                    cleared = {"type": "Cleared", "sequence_id": self.cleared_seq}
                    await self.ws.send_text(_json(cleared))
                    self.cleared_seq += 1
                elif op == "warn":
                    await self.ws.send_text(
                        _json({"type": "Warning", "description": arg[0], "code": arg[1]})
                    )
                elif op == "close":
                    await self.ws.close(*arg)
                    return
        except ConnectionError:  # the client went away mid-send: nothing left to do
            return
        except Exception:  # a bug in the fake: say so, and do not leave the client waiting
            log.exception("the fake Deepgram's WebSocket writer failed")
            with contextlib.suppress(Exception):
                await self.ws.close(1011, "internal error")

    async def _stall(self) -> None:
        """Send nothing more until a Clear or a close wakes this socket (or ``stall_limit``)."""
        self.woken.clear()
        with contextlib.suppress(TimeoutError):  # (not wait_for: it can swallow a cancel)
            async with asyncio.timeout(self.fake.stall_limit):
                await self.woken.wait()

    async def _speak(self, generation: int, text: str, arrived: float) -> bool:
        """Audio of one flush (read at ``arrived``), then ``Flushed``. False when the socket was
        closed by a fault."""
        if generation != self.generation:
            return True
        fake = self.fake
        fake.arrivals[text] = arrived
        fault = take(
            self.faults, "ws_close", "ws_stall", "ws_warn", "ws_close_flushed", "ws_silent"
        )
        if fault is not None and fault.kind == "ws_warn":
            await self.ws.send_text(
                _json({"type": "Warning", "description": fault.body.decode(), "code": fault.reason})
            )
        stalling = fault is not None and fault.kind == "ws_stall"
        if stalling and fault is not None and not fault.n_bytes:
            await self._stall()
            return True
        silent = not text.strip() or (fault is not None and fault.kind == "ws_silent")
        audio = b"" if silent else synthesize(text, self.encoding, self.rate)
        closing = fault is not None and fault.kind == "ws_close"
        cut = fault is not None and (closing or stalling)
        limit = min(fault.n_bytes, len(audio)) if fault is not None and cut else len(audio)
        await fake.hold_first_byte(arrived)
        fake.first_bytes[text] = fake.clock()
        sent = 0
        while sent < limit and generation == self.generation:
            piece = audio[sent : min(sent + fake.chunk_size, limit)]
            await self.ws.send_bytes(piece)
            sent += len(piece)
            if fake.bytes_per_second:
                await fake.sleep(len(piece) / fake.bytes_per_second)
        if generation != self.generation:
            return True
        if stalling:
            await self._stall()
            return True
        if fault is not None and closing:
            await self._close(fault)
            return False
        await self.ws.send_text(_json({"type": "Flushed", "sequence_id": self.flushed_seq}))
        self.flushed_seq += 1
        if fault is not None and fault.kind == "ws_close_flushed":
            await self._close(fault)
            return False
        return True

    async def _close(self, fault: Fault) -> None:
        """End the socket as a ``ws_close*`` fault asks: a close frame, or (1006) none at all."""
        if fault.code == ABRUPT_CLOSE:
            self.ws.abort()
        else:
            await self.ws.close(fault.code, fault.reason)
