"""The emulated caller: one Twilio Media Stream client on a real-time clock.

``dial(options)`` connects, sends ``connected`` and ``start``, then every 20 ms: plays one frame
of the server's audio (or silence), echoes the marks whose audio has now played, and sends one
inbound ``media`` frame (silence, or the given caller audio). It sends any scheduled ``dtmf`` and
ends with ``stop`` after ``duration`` seconds, or — when no duration is given — once the server's
speech has been heard and it has been quiet for ``quiet_seconds``. It returns a
:class:`~callspeak.emulator.report.CallReport`.

Ticks follow a drift-free schedule (``start + n × 20 ms``); after a stall the missed ticks are
played back to back, so the recording keeps real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from callspeak.audio.format import FRAME_BYTES, FRAME_SECONDS
from callspeak.audio.mulaw import MULAW_SILENCE
from callspeak.clock import Clock, MonotonicClock
from callspeak.emulator.playback import PlaybackBuffer
from callspeak.emulator.report import CallReport, MarkRecord
from callspeak.protocol import (
    AccountSid,
    CallSid,
    Clear,
    Connected,
    Dtmf,
    Mark,
    Media,
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
    max_seconds: float = 120.0
    headers: Mapping[str, str] = field(default_factory=dict)
    account_sid: str = field(default_factory=lambda: _sid("AC"))
    call_sid: str = field(default_factory=lambda: _sid("CA"))
    stream_sid: str = field(default_factory=lambda: _sid("MZ"))
    open_timeout: float = 10.0
    ssl: object | None = None  # an ssl.SSLContext for wss:// with a private CA
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
        self._buffer = PlaybackBuffer()
        self._marks: dict[str, MarkRecord] = {}
        self._seq = 0
        self._t0 = 0.0
        self._last_server_message = 0.0
        self._server_closed = False
        self._warned_31951 = False
        self._send_lock = asyncio.Lock()

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
            async with asyncio.timeout(opts.max_seconds + 5):
                await self._tick_loop()
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
            self.report.duration = self.elapsed()
            await self._hang_up()
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
            if self.report.first_audio_at is None:
                self.report.first_audio_at = now
            if not self._buffer.add_audio(message.payload):
                self._warn("31931 more than 10 minutes of audio buffered; media discarded")
        elif isinstance(message, OutboundMark):
            record = MarkRecord(message.name, received_at=now)
            self.report.marks.append(record)
            self._marks[message.name] = record
            for name in self._buffer.add_mark(message.name):
                await self._echo_mark(name, flushed=False)
        else:
            assert isinstance(message, Clear)
            self.report.clears.append(now)
            for name in self._buffer.clear():
                await self._echo_mark(name, flushed=True)

    def _warn(self, text: str) -> None:
        self.report.warnings.append((self.elapsed(), text))

    # -- caller -> server, on the 20 ms clock ----------------------------------------------

    async def _tick_loop(self) -> None:
        opts = self.options
        caller_audio = opts.caller_audio
        audio_start_tick = round(opts.caller_audio_at / FRAME_SECONDS)
        dtmf = sorted(opts.dtmf)
        tick = 0
        quiet_since: float | None = None
        while True:
            due = self._t0 + tick * FRAME_SECONDS
            delay = due - self._clock.now()
            if delay > 0:
                await self._clock.sleep(delay)
            now = tick * FRAME_SECONDS
            frame, taken, echoed = self._buffer.play(FRAME_BYTES)
            self.report.heard += frame
            self.report.played += frame[:taken]
            self.report.played_per_tick.append(taken)
            for name in echoed:
                await self._echo_mark(name, flushed=False)
            offset = (tick - audio_start_tick) * FRAME_BYTES
            if 0 <= offset < len(caller_audio):
                inbound = caller_audio[offset : offset + FRAME_BYTES].ljust(
                    FRAME_BYTES, bytes([MULAW_SILENCE])
                )
            else:
                inbound = _SILENCE_FRAME
            if not await self._send_media(tick, inbound):
                self.report.ended_by = "server"
                return
            while dtmf and dtmf[0][0] <= now:
                _, digit = dtmf.pop(0)
                self.report.dtmf_sent.append((now, digit))
                if not await self._send(self._dtmf(digit)):
                    self.report.ended_by = "server"
                    return
            if self._server_closed:
                self.report.ended_by = "server"
                return
            if opts.duration is not None:
                if now >= opts.duration:
                    self.report.ended_by = "caller"
                    return
            else:
                idle = (
                    self.report.first_audio_at is not None
                    and self._buffer.buffered == 0
                    and not self._buffer.pending_marks
                    and not dtmf
                    and offset >= len(caller_audio)
                )
                if idle:
                    quiet_since = now if quiet_since is None else quiet_since
                    recent = now - self._last_server_message
                    if now - quiet_since >= opts.quiet_seconds and recent >= opts.quiet_seconds:
                        self.report.ended_by = "caller"
                        return
                else:
                    quiet_since = None
            if now >= opts.max_seconds:
                self.report.ended_by = "timeout"
                return
            tick += 1

    async def _echo_mark(self, name: str, *, flushed: bool) -> None:
        record = self._marks.get(name)
        if record is not None:
            record.echoed_at = self.elapsed()
            record.flushed = flushed
        await self._send(Mark(self._next_seq(), StreamSid(self.options.stream_sid), name).to_json())

    async def _send_media(self, tick: int, payload: bytes) -> bool:
        media = Media(
            sequence_number=self._next_seq(),
            stream_sid=StreamSid(self.options.stream_sid),
            track="inbound",
            chunk=tick + 1,
            timestamp=tick * 20,
            payload=payload,
        )
        return await self._send(media.to_json())

    def _dtmf(self, digit: str) -> str:
        return Dtmf(
            self._next_seq(), StreamSid(self.options.stream_sid), "inbound_track", digit
        ).to_json()

    async def _hang_up(self) -> None:
        if not self._server_closed:
            stop = Stop(
                self._next_seq(),
                StreamSid(self.options.stream_sid),
                AccountSid(self.options.account_sid),
                CallSid(self.options.call_sid),
            )
            await self._send(stop.to_json())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ws.close(), 5)

    async def _send(self, text: str) -> bool:
        try:
            async with self._send_lock:
                await self._ws.send(text)
        except ConnectionClosed:
            self._server_closed = True
            return False
        return True

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
        max_size=2**22,
        compression=None,
        **tls,
    ) as websocket:
        return await EmulatedCall(options, websocket, clock).run()
