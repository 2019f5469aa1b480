"""The REST audio response: chunked, delayed, optionally paced, and cut or stalled by a fault.

Contract: the body is ``audio`` sent in ``fake.chunk_size`` pieces after ``fake.first_byte_delay``
(paced at ``fake.bytes_per_second`` when set), without a ``content-length``. A ``stall`` fault sends
``n_bytes`` and then holds the connection open until the client leaves (at most
``fake.stall_limit``, then drops it); a ``cut`` fault sends ``n_bytes`` and drops the connection.
Sending stops as soon as the client disconnects. ``fake.first_bytes[text]`` records when headers
went out.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from callspeak.testing.fake_deepgram.faults import Fault

if TYPE_CHECKING:
    from callspeak.testing.fake_deepgram import FakeDeepgram

__all__ = ["AudioStream"]


class AudioStream(Response):
    """Streams audio chunk by chunk (chunked encoding), honouring delay, pacing and faults."""

    def __init__(
        self,
        fake: FakeDeepgram,
        audio: bytes,
        headers: dict[str, str],
        fault: Fault | None,
        arrived: float,
    ):
        super().__init__(status_code=200, headers=headers)
        self.text = ""
        self.arrived = arrived  #: when the request was read: the first-byte delay starts here
        # no content-length: the body is chunked, like Deepgram's
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.fake, self.audio, self.fault = fake, audio, fault

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self._send_audio(send, gone)
        finally:
            self.fake.rest_in_progress -= 1  # (counted when the request was accepted)
            watcher.cancel()
            await asyncio.wait({watcher})

    async def _send_audio(self, send: Send, gone: asyncio.Event) -> None:
        fake, fault = self.fake, self.fault
        limit = len(self.audio) if fault is None else min(fault.n_bytes, len(self.audio))
        await fake.hold_first_byte(self.arrived)
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        fake.first_bytes[self.text] = fake.clock()
        sent = 0
        while sent < limit and not gone.is_set():
            piece = self.audio[sent : min(sent + fake.chunk_size, limit)]
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += len(piece)
            if fake.bytes_per_second:
                await fake.sleep(len(piece) / fake.bytes_per_second)
        if fault is not None and fault.kind == "stall":
            # hang without closing until the client gives up (bounded for shutdown's sake)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fake.stall_limit):
                    await gone.wait()
        if fault is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # A "cut" — and a "stall" past stall_limit — returns with the body incomplete: the server
        # drops the connection. (Ending the body would pass the audio so far off as the whole.)
