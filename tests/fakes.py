"""Shared in-memory fakes: a recording transport, a scripted TTS provider, a manual clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from callspeak.audio.format import TWILIO_FORMAT, AudioFormat
from callspeak.clock import Clock
from callspeak.protocol import OutboundMessage, parse_outbound
from callspeak.tts.base import TTSError


class FakeTransport:
    """A Media Streams socket in memory: tests push inbound text, read what the session sent."""

    def __init__(self) -> None:
        self.inbound: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None
        self.sent_event = asyncio.Event()
        #: Set it to have the socket drop (a peer gone) once that many messages were sent.
        self.drop_after: int | None = None
        #: Set it to record in ``sent_at`` when (on this clock) each message was sent.
        self.clock: Clock | None = None
        self.sent_at: list[float] = []
        #: How many messages each write to the socket carried (a send one, a send_all all).
        self.writes: list[int] = []

    def push(self, message: str | bytes | None) -> None:
        self.inbound.put_nowait(message)

    async def receive(self) -> str | bytes | None:
        if self.closed is not None:
            return None
        return await self.inbound.get()

    async def send(self, text: str) -> None:
        if self.drop_after is not None and len(self.sent) >= self.drop_after:
            await self.close(1006, "dropped")
        if self.closed is not None:
            from callspeak.session import TransportClosed

            raise TransportClosed("closed")
        if self.clock is not None:
            self.sent_at.append(self.clock.now())
        self.sent.append(text)
        self.writes.append(1)
        self.sent_event.set()

    async def send_all(self, texts: Sequence[str]) -> None:
        """In one write; a drop (``drop_after``) falling within them writes those before it,
        and raises saying how many, as a transport writing them one by one does."""
        from callspeak.session import TransportClosed

        if self.closed is not None:
            raise TransportClosed("closed")
        room = len(texts)
        if self.drop_after is not None:
            room = max(0, min(room, self.drop_after - len(self.sent)))
        if room:
            if self.clock is not None:
                self.sent_at.extend(self.clock.now() for _ in texts[:room])
            self.sent.extend(texts[:room])
            self.writes.append(room)
            self.sent_event.set()
        if room < len(texts):
            await self.close(1006, "dropped")
            raise TransportClosed("closed", sent=room)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed is None:
            self.closed = (code, reason)
            self.inbound.put_nowait(None)

    def messages(self) -> list[OutboundMessage]:
        return [parse_outbound(text) for text in self.sent]

    async def wait_for(self, predicate: Callable[[list[OutboundMessage]], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate(self.messages()):
                self.sent_event.clear()
                await self.sent_event.wait()


class DirectTransport(FakeTransport):
    """A FakeTransport that also hands messages straight to the session
    (:class:`~callspeak.session.DirectDelivery`), on the same terms as the native ``/twilio``
    socket: only while the reader is not busy with a message (a ``receive()`` waits, or none
    was made yet) and nothing is queued ahead."""

    def __init__(self) -> None:
        super().__init__()
        self.handler: Callable[[str | bytes], bool] | None = None
        self.busy = False  # receive() returned a message and was not called again yet
        self.direct = 0  #: messages the session handled straight away

    def deliver_to(self, handler: Callable[[str | bytes], bool]) -> None:
        self.handler = handler

    def push(self, message: str | bytes | None) -> None:
        handler = self.handler
        if message is not None and handler and not self.busy and self.inbound.empty():
            if handler(message):
                self.direct += 1
                return
        super().push(message)

    async def receive(self) -> str | bytes | None:
        self.busy = False
        message = await super().receive()
        self.busy = True
        return message


def tone_for(text: str, seconds_per_char: float = 0.01) -> bytes:
    """Deterministic non-silent μ-law 'speech' for a text: distinct bytes per text."""
    n = max(160, int(len(text) * seconds_per_char * 8000))
    seed = sum(map(ord, text)) % 50
    return bytes((0x10 + seed + (i % 37)) & 0x7F for i in range(n))


class FakeProvider:
    """A TTS provider that yields :func:`tone_for` in chunks, optionally slowly or failing."""

    def __init__(
        self,
        *,
        chunk: int = 333,
        delay: float = 0.0,
        first_delay: float = 0.0,
        fail_on: str | None = None,
        audio_format: AudioFormat = TWILIO_FORMAT,
        seconds_per_char: float = 0.01,
    ) -> None:
        self.seconds_per_char = seconds_per_char
        self.chunk = chunk
        self.delay = delay
        self.first_delay = first_delay
        self.fail_on = fail_on
        self._format = audio_format
        self.texts: list[str] = []
        self.continuations: list[bool] = []
        self.aheads: list[float] = []
        self.cleared = 0
        self.warmed = 0
        self.closed = False
        self.cancelled = 0

    @property
    def name(self) -> str:
        return "fake"

    @property
    def audio_format(self) -> AudioFormat:
        return self._format

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        self.texts.append(text)
        self.continuations.append(continuation)
        self.aheads.append(ahead)
        if self.fail_on is not None and self.fail_on in text:
            raise TTSError("fake", f"refused {text!r}", retryable=False)
        audio = tone_for(text, self.seconds_per_char)
        try:
            if self.first_delay:
                await asyncio.sleep(self.first_delay)
            for i in range(0, len(audio), self.chunk):
                if self.delay and i:
                    await asyncio.sleep(self.delay)
                yield audio[i : i + self.chunk]
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def warm_up(self) -> None:
        self.warmed += 1

    async def clear(self) -> None:
        self.cleared += 1

    async def aclose(self) -> None:
        self.closed = True


class FakeService:
    """A :class:`~callspeak.tts.base.TTSService` handing each call a :class:`FakeProvider`.

    ``provider_options`` go to every provider; ``providers`` keeps them, in the order opened.
    """

    def __init__(self, name: str = "fake", **provider_options: object) -> None:
        self._name = name
        self.provider_options = provider_options
        self.providers: list[FakeProvider] = []
        self.started = False
        self.closed = False
        self.healthy = True

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        self.started = True

    def open(self) -> FakeProvider:
        provider = FakeProvider(**self.provider_options)  # type: ignore[arg-type]
        self.providers.append(provider)
        return provider

    async def aclose(self) -> None:
        self.closed = True


def spoken(text: str, seconds_per_char: float = 0.01) -> bytes:
    """What a caller hears from a :class:`FakeProvider` for ``text``: each sentence's tone, padded
    with μ-law silence to whole 20 ms frames."""
    from callspeak.tts.sentences import split_sentences

    out = b""
    for sentence in split_sentences(text):
        audio = tone_for(sentence, seconds_per_char)
        out += audio + b"\xff" * (-len(audio) % 160)
    return out


class SettableClock:
    """A clock function (``clock()`` → seconds) that moves only when a test sets ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class InstantClock:
    """A :class:`~callspeak.clock.Clock` whose sleeps take no real time: each moves it on at once
    (by the time slept) and yields once. For one sleeper at a time: the session's sender."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)
