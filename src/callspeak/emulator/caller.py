"""The emulated caller: one Twilio Media Stream client on a real-time clock.

``dial(options)`` connects, sends ``connected`` and ``start``, then every 20 ms: plays one frame
of the server's audio (or silence), echoes the marks whose audio has now played, and sends one
inbound ``media`` frame (silence, or the given caller audio). It sends any scheduled ``dtmf`` and
ends with ``stop`` after ``duration`` seconds, or — when no duration is given — once the server's
speech has been heard and it has been quiet for ``quiet_seconds``. It returns a
:class:`~callspeak.emulator.report.CallReport`.

Ticks follow a drift-free schedule (``start + n × 20 ms``); after a stall the missed ticks are
played back to back, so the recording keeps real time.

The benchmarks place 200 calls from one process, 10,000 ticks a second, and the emulator's CPU
competes with the server it measures, so a tick is kept cheap: it is synchronous code (it plays,
builds its messages and writes them to the socket without awaiting anything), and all the calls
on the real clock in one event loop are ticked by one shared :class:`~.ticker.Ticker` task
instead of a task each.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from callspeak.audio.format import FRAME_BYTES, FRAME_SECONDS
from callspeak.audio.mulaw import MULAW_SILENCE
from callspeak.clock import Clock, MonotonicClock
from callspeak.emulator.frames import ClientTextFrames
from callspeak.emulator.playback import PlaybackBuffer
from callspeak.emulator.report import CallReport, MarkRecord
from callspeak.emulator.ticker import Ticker, shared_ticker
from callspeak.protocol import (
    AccountSid,
    CallSid,
    Clear,
    Connected,
    Dtmf,
    Mark,
    MediaEncoder,
    MediaFormat,
    OutboundMark,
    OutboundMedia,
    ProtocolError,
    Start,
    Stop,
    StreamSid,
    parse_outbound,
)
from callspeak.signatures import SIGNATURE_HEADER, sign

__all__ = ["DialOptions", "EmulatedCall", "dial"]

_SILENCE_FRAME = bytes([MULAW_SILENCE]) * FRAME_BYTES
#: Seconds hanging up (``stop``, then the close handshake) may take before the emulator drops
#: the connection.
HANG_UP_SECONDS = 5.0
#: Seconds past its time limit a call held back by a server that stopped reading is cut off.
STUCK_GRACE = 5.0
_FRAMES = ClientTextFrames()


def _write_now(websocket: ClientConnection, text: str) -> bool:
    """Send one whole text message without awaiting; False, and nothing sent, when the
    connection is not open.

    ``await websocket.send(text)`` frames the message and hands it to the transport before its
    first ``await``; this does the same, with the frame built by :class:`ClientTextFrames`, and
    without the coroutine and the async context manager around ``send()``. (200 calls of 8 s
    from one process: the emulator's CPU went from about 7.7 s to under 5 s with synchronous
    ticks on a shared ticker, and to 3.7 s with these frames.) What ``send()`` does after
    writing is then the caller's: wait while the transport's write buffer is over its limit
    (:meth:`EmulatedCall._drain`). Where this returns False, ``send()`` would wait for the
    connection to close and raise ``ConnectionClosed``; the caller gets that by calling it.

    Frames written here and by websockets itself (pongs, the close) never interleave: each is
    written whole, synchronously. This and ``_drain`` use the connection's ``transport``,
    ``paused`` and ``drain()``, the same from websockets 14 to 17; ``tests/test_emulator_wire.py``
    goes through all three.
    """
    if websocket.state is not State.OPEN:
        return False
    websocket.transport.write(_FRAMES.frame(text.encode()))
    return True


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


@dataclass
class DialOptions:
    """How the emulated caller behaves. Times are seconds since ``start`` was sent."""

    url: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    #: μ-law 8 kHz audio the caller "speaks" (sent as inbound media), from ``caller_audio_at``.
    caller_audio: bytes = b""
    caller_audio_at: float = 0.0
    dtmf: Sequence[tuple[float, str]] = ()
    #: Hang up after this long; None = once speech was heard and it has been quiet a while.
    duration: float | None = None
    quiet_seconds: float = 1.0
    #: Hang up after this long whatever else happens — or after ``duration``, if that is longer.
    max_seconds: float = 120.0
    headers: Mapping[str, str] = field(default_factory=dict)
    account_sid: str = field(default_factory=lambda: _sid("AC"))
    call_sid: str = field(default_factory=lambda: _sid("CA"))
    stream_sid: str = field(default_factory=lambda: _sid("MZ"))
    open_timeout: float = 10.0
    ssl: object | None = None  # an ssl.SSLContext for wss:// with a private CA

    @property
    def time_limit(self) -> float:
        """Seconds after which the call ends whatever happens (see ``max_seconds``)."""
        return self.max_seconds if self.duration is None else max(self.max_seconds, self.duration)

    #: Sign the upgrade as Twilio does: ``x-twilio-signature`` computed with this auth token.
    sign_with: str | None = None
    #: The URL to sign, as written in the TwiML's ``<Stream url>`` (the server checks its public
    #: URL, e.g. wss://calls.example.com/twilio, not the loopback address dialled). Default: the
    #: dial URL with ``ws://`` turned into ``wss://``.
    signed_url: str | None = None

    def upgrade_headers(self) -> dict[str, str]:
        """The extra headers of the upgrade request, with the signature when ``sign_with``."""
        headers = dict(self.headers)
        if self.sign_with is not None:
            url = self.signed_url or _as_wss(self.url)
            headers[SIGNATURE_HEADER] = sign(self.sign_with, url, {})
        return headers


def _as_wss(url: str) -> str:
    return "wss://" + url[len("ws://") :] if url.startswith("ws://") else url


class EmulatedCall:
    """One call in progress; most users want :func:`dial`."""

    def __init__(
        self, options: DialOptions, websocket: ClientConnection, clock: Clock | None = None
    ) -> None:
        self.options = options
        self.report = CallReport(
            call_sid=options.call_sid,
            stream_sid=options.stream_sid,
            parameters=dict(options.parameters),
        )
        self._ws = websocket
        self._clock = clock or MonotonicClock()
        # Calls on the real clock share their loop's ticker (see run); one on a clock of its
        # own has a ticker of its own.
        self._ticker = Ticker(clock, FRAME_SECONDS) if clock is not None else None
        self._buffer = PlaybackBuffer()
        #: Marks not yet echoed, by name, oldest first (a server may reuse a name).
        self._marks: dict[str, deque[MarkRecord]] = {}
        self._seq = 0
        self._t0 = 0.0
        self._last_server_message = 0.0
        self._server_closed = False
        self._media = MediaEncoder(StreamSid(options.stream_sid), "inbound")
        # The tick loop's state, kept between ticks (see _tick).
        self._audio_start_tick = round(options.caller_audio_at / FRAME_SECONDS)
        self._dtmf = sorted(options.dtmf)
        self._quiet_since: float | None = None
        #: A message a tick could not write because the connection is no longer open.
        self._unsent: str | None = None

    def elapsed(self) -> float:
        return self._clock.now() - self._t0

    async def run(self) -> CallReport:
        opts = self.options
        await self._send(Connected(protocol="Call", version="1.0.0").to_json())
        self._t0 = self.report.started_at = self._clock.now()
        self._last_server_message = 0.0
        await self._send(
            Start(
                sequence_number=self._next_seq(),
                stream_sid=StreamSid(opts.stream_sid),
                account_sid=AccountSid(opts.account_sid),
                call_sid=CallSid(opts.call_sid),
                tracks=("inbound",),
                custom_parameters=dict(opts.parameters),
                media_format=MediaFormat("audio/x-mulaw", 8000, 1),
            ).to_json()
        )
        receiver = asyncio.create_task(self._receive_loop())
        try:
            async with asyncio.timeout(opts.time_limit + STUCK_GRACE):
                await self._tick_loop()
        except TimeoutError:  # held back past its time limit by a server that stopped reading
            self.report.ended_by = "timeout"
            self._warn("the server stopped reading: the call was cut off past its time limit")
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
            self.report.duration = self.elapsed()
            await self._hang_up()
            self.report.close_code = self._ws.close_code
            self.report.close_reason = self._ws.close_reason or ""
        return self.report

    # -- server -> caller ---------------------------------------------------------------

    async def _receive_loop(self) -> None:
        try:
            async for message in self._ws:
                self._last_server_message = self.elapsed()
                if isinstance(message, bytes):
                    self._warn("31950 binary frame received (Twilio takes text frames only)")
                    continue
                await self._on_server_message(message)
        except ConnectionClosed:
            pass
        self._server_closed = True

    async def _on_server_message(self, text: str) -> None:
        try:
            message = parse_outbound(text)
        except ProtocolError as exc:
            self._warn(f"31951 invalid message: {exc.reason}")
            return
        if message.stream_sid != self.options.stream_sid:
            self._warn(f"31951 message for unknown streamSid {message.stream_sid!r}")
            return
        now = self.elapsed()
        if isinstance(message, OutboundMedia):
            self.report.media_messages += 1
            self.report.audio_bytes_received += len(message.payload)
            if len(message.payload) % FRAME_BYTES:
                self.report.partial_frame_messages += 1
            if message.payload:  # (an empty one plays nothing: no audio begins with it)
                if self.report.first_audio_at is None:
                    self.report.first_audio_at = now
                if self._buffer.idle:
                    self.report.audio_starts.append(now)
            if not self._buffer.add_audio(message.payload):
                self._warn("31931 more than 10 minutes of audio buffered; media discarded")
        elif isinstance(message, OutboundMark):
            record = MarkRecord(message.name, received_at=now)
            self.report.marks.append(record)
            self._marks.setdefault(message.name, deque()).append(record)
            for name in self._buffer.add_mark(message.name):
                await self._send(self._mark_echo(name, flushed=False))
        else:
            assert isinstance(message, Clear)
            self.report.clears.append(now)
            for name in self._buffer.clear():
                await self._send(self._mark_echo(name, flushed=True))

    def _warn(self, text: str) -> None:
        self.report.warnings.append((self.elapsed(), text))

    # -- caller -> server, on the 20 ms clock ----------------------------------------------

    async def _tick_loop(self) -> None:
        """Run ticks 0, 1, 2, … each at ``t0 + n × 20 ms`` (at once when late) until the call
        is over; ``report.ended_by`` says why."""
        ticker = self._ticker or shared_ticker(FRAME_SECONDS)
        tick = 0
        while True:
            tick = await ticker.run(self._t0, self._tick, tick)
            if self.report.ended_by:
                return
            if self._unsent is not None:
                # The connection is no longer open: send() waits for it to close and fails.
                await self._send(self._unsent)
                self.report.ended_by = "server"
                return
            # The write buffer is full: wait for it to drain as send() would, then go on.
            await self._drain()
            tick += 1

    def _tick(self, tick: int) -> bool:
        """Tick ``tick``, at ``t0 + tick × 20 ms``: play a frame, echo the marks whose audio
        has now played, send one inbound media frame and any DTMF due, and decide whether to
        hang up. Synchronous: a tick costs no task switch.

        Returns False when the ticks stop here: the call is over (``report.ended_by`` says why),
        a message could not be written because the connection is no longer open (``_unsent``
        holds it; the rest of the tick is not done), or the transport's write buffer is full
        (the tick is done; the next one waits for the buffer to drain).
        """
        opts = self.options
        report = self.report
        now = tick * FRAME_SECONDS
        frame, taken, echoed = self._buffer.play(FRAME_BYTES)
        report.heard += frame  # bytearrays: appending is amortised O(1)
        if taken:
            report.played += frame[:taken]
        report.played_per_tick.append(taken)
        for name in echoed:
            if not self._write(self._mark_echo(name, flushed=False)):
                return False
        caller_audio = opts.caller_audio
        offset = (tick - self._audio_start_tick) * FRAME_BYTES
        if 0 <= offset < len(caller_audio):
            inbound = caller_audio[offset : offset + FRAME_BYTES].ljust(
                FRAME_BYTES, bytes([MULAW_SILENCE])
            )
        else:
            inbound = _SILENCE_FRAME
        media = self._media.encode(self._next_seq(), tick + 1, tick * 20, inbound)
        if not self._write(media):
            return False
        dtmf = self._dtmf
        while dtmf and dtmf[0][0] <= now:
            _, digit = dtmf.pop(0)
            report.dtmf_sent.append((now, digit))
            if not self._write(self._dtmf_message(digit)):
                return False
        if self._server_closed:
            report.ended_by = "server"
            return False
        if opts.duration is not None:
            if now >= opts.duration:
                report.ended_by = "caller"
                return False
        else:
            idle = (
                report.first_audio_at is not None
                and self._buffer.buffered == 0
                and not self._buffer.pending_marks
                and not dtmf
                and offset >= len(caller_audio)
            )
            if idle:
                quiet_since = self._quiet_since = (
                    now if self._quiet_since is None else self._quiet_since
                )
                recent = now - self._last_server_message
                if now - quiet_since >= opts.quiet_seconds and recent >= opts.quiet_seconds:
                    report.ended_by = "caller"
                    return False
            else:
                self._quiet_since = None
        if now >= opts.time_limit:
            report.ended_by = "timeout"
            return False
        return not self._ws.paused

    def _mark_echo(self, name: str, *, flushed: bool) -> str:
        """The echo of mark ``name``, recorded in the report as sent now."""
        waiting = self._marks.get(name)
        if waiting:
            record = waiting.popleft()
            record.echoed_at = self.elapsed()
            record.flushed = flushed
            if not waiting:
                del self._marks[name]
        return Mark(self._next_seq(), StreamSid(self.options.stream_sid), name).to_json()

    def _dtmf_message(self, digit: str) -> str:
        return Dtmf(
            self._next_seq(), StreamSid(self.options.stream_sid), "inbound_track", digit
        ).to_json()

    async def _hang_up(self) -> None:
        """Send ``stop`` and close, within :data:`HANG_UP_SECONDS`; then drop the connection (a
        server that stopped reading would otherwise hold the call, and ``dial``, for good)."""
        try:
            async with asyncio.timeout(HANG_UP_SECONDS):
                if not self._server_closed:
                    stop = Stop(
                        self._next_seq(),
                        StreamSid(self.options.stream_sid),
                        AccountSid(self.options.account_sid),
                        CallSid(self.options.call_sid),
                    )
                    await self._send(stop.to_json())
                with contextlib.suppress(Exception):
                    await self._ws.close()
        except TimeoutError:
            self._ws.transport.abort()

    # -- sending ---------------------------------------------------------------------------
    #
    # No lock: a whole message is framed and handed to the transport in one synchronous step
    # (here, and in websockets' own send()), so messages from the tick loop and the receive loop
    # never interleave, and they reach the wire in the order of their sequence numbers.

    def _write(self, text: str) -> bool:
        """Send ``text`` now (from a tick); False, keeping it in ``_unsent``, when the
        connection is no longer open."""
        if _write_now(self._ws, text):
            return True
        self._unsent = text
        return False

    async def _send(self, text: str) -> bool:
        """Send ``text`` as ``websocket.send()`` would; False once the connection is closed."""
        if _write_now(self._ws, text):
            await self._drain()
            return True
        try:
            await self._ws.send(text)  # not open: waits for the close, then raises
        except ConnectionClosed:
            self._server_closed = True
            return False
        return True

    async def _drain(self) -> None:
        """Wait while the transport's write buffer is over its limit, as ``send()`` does after
        writing (the server is not reading)."""
        if self._ws.paused:
            # Raised when the connection is lost meanwhile; the next write finds it closed.
            with contextlib.suppress(OSError):
                await self._ws.drain()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq


async def dial(options: DialOptions, *, clock: Clock | None = None) -> CallReport:
    """Place one emulated call and return what the caller experienced.

    A refused upgrade raises :class:`websockets.exceptions.InvalidStatus` (its ``response`` holds
    the status and the server's reason), as Twilio would log error 31920. A ``wss://`` URL without
    ``options.ssl`` verifies the server against the system's trusted CAs.
    """
    # websockets refuses an explicit ssl=None for wss://; leaving it out means "default context".
    tls: dict[str, Any] = {"ssl": options.ssl} if options.ssl is not None else {}
    async with connect(
        options.url,
        additional_headers=options.upgrade_headers(),
        open_timeout=options.open_timeout,
        # Twilio takes media "of any size": 16 MiB is some 20 minutes of audio as base64, twice
        # what its buffer keeps (31931), and bounds what a broken server can make us hold.
        max_size=2**24,
        compression=None,
        **tls,
    ) as websocket:
        return await EmulatedCall(options, websocket, clock).run()
