"""Failover between voices: every Deepgram failure ends with the caller hearing speech."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import struct
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from callspeak.config import Settings
from callspeak.emulator import CallReport, DialOptions, dial
from callspeak.server import create_app
from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_deepgram import FakeDeepgram
from callspeak.tts.base import TTSAuthError, TTSError, TTSProvider, TTSService
from callspeak.tts.deepgram_rest import DeepgramRestService
from callspeak.tts.deepgram_ws import DeepgramWebSocketService
from callspeak.tts.fallback import FallbackService, load_apology
from tests.conftest import serve_app
from tests.fakes import FakeProvider, FakeService, SettableClock, tone_for

KEY = "test-key"
TEXT = "Your appointment is confirmed."
#: What the calls below are greeted with: short (about 1 s of the fake's audio), as every test
#: is a real call that lasts as long as its audio.
CALL_TEXT = "Booked for Monday."


class ScriptedProvider(FakeProvider):
    """Fails the first ``failures`` streams, optionally after some audio."""

    def __init__(self, errors: list[TTSError], after_bytes: int = 0) -> None:
        super().__init__(chunk=160)
        self.errors = list(errors)
        self.after_bytes = after_bytes

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        self.texts.append(text)
        self.continuations.append(continuation)
        if self.errors:
            error = self.errors.pop(0)
            if self.after_bytes:
                yield tone_for(text)[: self.after_bytes]
            raise error
        yield tone_for(text)


class ScriptedService(FakeService):
    def __init__(self, provider: ScriptedProvider) -> None:
        super().__init__("primary")
        self.provider = provider

    def open(self) -> ScriptedProvider:  # type: ignore[override]
        return self.provider


async def collect(service: FallbackService, text: str, continuation: bool = False) -> bytes:
    provider = service.open()
    return b"".join([c async for c in provider.stream(text, continuation=continuation)])


def retryable(msg: str = "503") -> TTSError:
    return TTSError("primary", msg, retryable=True, status=503, request_id="req-1")


async def test_retryable_failure_before_audio_is_retried_once_on_the_same_voice() -> None:
    primary = ScriptedProvider([retryable()])
    chain = FallbackService([ScriptedService(primary), FakeService("backup")], apology=b"sorry")
    assert await collect(chain, TEXT) == tone_for(TEXT)
    assert primary.texts == [TEXT, TEXT]


def too_many(retry_after: float | None) -> TTSError:
    return TTSError(
        "primary", "Too many requests.", retryable=True, status=429, retry_after=retry_after
    )


class RestingService(ScriptedService):
    """Resting ``rest`` seconds from each text it was asked for (as if each were answered 429),
    as the REST voice rests: the chain does not retry it at once. ``until`` (monotonic time) can
    be moved, as another call's 429 makes a rest longer."""

    def __init__(self, provider: ScriptedProvider, rest: float = 0.05) -> None:
        super().__init__(provider)
        self.rest = rest
        self.until: float | None = None
        self._asked = 0

    def rest_remaining(self) -> float:
        if len(self.provider.texts) != self._asked:  # asked since: a rest from now
            self._asked = len(self.provider.texts)
            self.until = time.monotonic() + self.rest
        return 0.0 if self.until is None else max(0.0, self.until - time.monotonic())


async def test_the_last_voice_tries_once_more_after_a_short_rest_rather_than_apologise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no other voice to turn to, a 429 asking for a short rest is waited out and tried
    once more (a moment's silence rather than the apology); one asking for longer, or a second
    429, plays the apology at once."""
    monkeypatch.setattr("callspeak.tts.too_many_requests.DEFAULT_REST", 0.05)  # the shortest
    primary = ScriptedProvider([too_many(0.05)])
    chain = FallbackService([RestingService(primary)], apology=b"sorry")
    assert await collect(chain, TEXT) == tone_for(TEXT)
    assert primary.texts == [TEXT, TEXT]
    for errors in ([too_many(5.0)], [too_many(0.05), too_many(0.05)]):
        primary = ScriptedProvider(errors)
        chain = FallbackService([RestingService(primary)], apology=b"\xff" * 160)
        with pytest.raises(TTSError, match="every voice failed"):
            await collect(chain, TEXT)
        assert primary.texts == [TEXT] * len(errors)


async def test_mid_utterance_the_last_voice_also_waits_out_a_short_rest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A later sentence of an utterance refused with 429 on the only voice: it too waits out
    the rest and is tried once more, rather than the apology at once (and the log does not
    say "falling back" with no voice to fall back to)."""
    monkeypatch.setattr("callspeak.tts.too_many_requests.DEFAULT_REST", 0.05)
    primary = ScriptedProvider([too_many(None)])
    chain = FallbackService([RestingService(primary)], apology=b"sorry")
    with caplog.at_level(logging.WARNING, "callspeak.tts"):
        assert await collect(chain, TEXT, continuation=True) == tone_for(TEXT)
    assert primary.texts == [TEXT, TEXT] and "retrying once" in caplog.text
    primary = ScriptedProvider([too_many(None), too_many(None)])
    chain = FallbackService([RestingService(primary)], apology=b"\xff" * 160)
    with caplog.at_level(logging.WARNING, "callspeak.tts"), pytest.raises(TTSError):
        await collect(chain, TEXT, continuation=True)
    assert primary.texts == [TEXT, TEXT]  # once more, not twice
    assert "no other voice left" in caplog.text and "falling back" not in caplog.text


async def test_the_last_voice_is_not_asked_again_if_the_rest_grew_while_it_waited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Waiting out a short rest after a 429, another call's 429 makes it 30 s: the text is not
    sent again (it would be refused), the apology plays."""
    monkeypatch.setattr("callspeak.tts.too_many_requests.DEFAULT_REST", 0.05)
    primary = ScriptedProvider([too_many(None)])
    voice = RestingService(primary)
    chain = FallbackService([voice], apology=b"\xff" * 160)
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        voice.until = time.monotonic() + 30  # meanwhile, another call is refused
        await real_sleep(seconds)

    monkeypatch.setattr("callspeak.tts.fallback.asyncio.sleep", sleep)
    with pytest.raises(TTSError, match=r"resting (29\.9|30\.0) s more"):
        await collect(chain, TEXT)
    assert primary.texts == [TEXT]


async def test_a_text_waits_for_a_rest_once_not_before_and_again_after_asking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last voice found resting is waited for, then asked; refused again with 429, the
    apology plays rather than a second wait (the caller's silence stays within a second)."""
    monkeypatch.setattr("callspeak.tts.too_many_requests.DEFAULT_REST", 0.05)
    primary = ScriptedProvider([])
    voice = RestingService(primary, rest=0.5)
    chain = FallbackService([voice], apology=b"\xff" * 160)
    assert await collect(chain, TEXT) == tone_for(TEXT)  # its rest starts now (see the fake)
    primary.errors = [too_many(None), too_many(None)]
    with pytest.raises(TTSError, match="every voice failed"):
        await collect(chain, TEXT)
    assert primary.texts == [TEXT, TEXT]  # the first call's, then one after the wait: no third


async def test_a_last_voice_found_resting_is_waited_for_briefly_else_not_asked() -> None:
    """The last voice is asked even when it cannot be skipped for another, but not while it
    rests after a 429: a short rest is waited out first, a long one plays the apology without
    a request (which would only be refused again, adding to the load)."""
    for rest, asked in ((0.05, [TEXT, TEXT]), (30.0, [TEXT])):
        primary = ScriptedProvider([])
        chain = FallbackService([RestingService(primary, rest)], apology=b"\xff" * 160)
        assert await collect(chain, TEXT) == tone_for(TEXT)  # not resting yet
        if rest > 1:
            with pytest.raises(TTSError, match="resting 30.0 s more"):
                await collect(chain, TEXT)
        else:
            assert await collect(chain, TEXT) == tone_for(TEXT)
        assert primary.texts == asked


async def test_the_apology_names_the_voices_skipped_as_well_as_those_that_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A voice not asked (refused credentials, a 429's rest) is among the causes the apology's
    log line gives, not only the last voice's failure."""
    refused, resting = FakeService("refused"), RestingService(ScriptedProvider([]), rest=30)
    refused.healthy = False
    resting.provider.texts.append("an earlier text")  # its rest runs from then
    last = ScriptedProvider([TTSError("last", "boom", retryable=False)])
    chain = FallbackService([refused, resting, ScriptedService(last)], apology=b"\xff" * 160)
    with caplog.at_level(logging.ERROR, "callspeak.tts"), pytest.raises(TTSError):
        await collect(chain, TEXT)
    [line] = [r.getMessage() for r in caplog.records if "every voice failed" in r.getMessage()]
    assert "refused: not asked: its credentials stand refused" in line
    assert "primary: resting 30.0 s more" in line and "last: boom" in line


async def test_second_failure_falls_back_and_logs_the_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    primary = ScriptedProvider([retryable(), retryable()])
    backup = FakeService("backup")
    chain = FallbackService([ScriptedService(primary), backup], apology=b"sorry")
    with caplog.at_level(logging.WARNING, "callspeak.tts"):
        assert await collect(chain, TEXT) == tone_for(TEXT)
    assert backup.providers[0].texts == [TEXT]
    assert "request_id=req-1" in caplog.text and "falling back" in caplog.text


async def test_mid_stream_cut_continues_the_utterance_on_the_fallback() -> None:
    primary = ScriptedProvider([retryable("cut")], after_bytes=400)
    backup = FakeService("backup")
    chain = FallbackService([ScriptedService(primary), backup], apology=b"sorry")
    provider = chain.open()
    first = b"".join([c async for c in provider.stream("One.")])
    # What was heard of the cut sentence, then the sentence again on the backup voice.
    assert first == tone_for("One.")[:400] + tone_for("One.")
    assert primary.texts == ["One."]  # no retry: audio had already played
    second = b"".join([c async for c in provider.stream("Two.", continuation=True)])
    assert second == tone_for("Two.") and backup.providers[0].texts == ["One.", "Two."]
    assert primary.texts == ["One."]  # the rest of the utterance stayed on the backup
    third = b"".join([c async for c in provider.stream("Three.")])
    assert third == tone_for("Three.")
    assert primary.texts == ["One.", "Three."]  # a new utterance tries the preferred voice


async def test_a_long_text_cut_in_a_later_part_goes_on_from_that_part_on_the_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The REST voice asks for a text over its limit in parts: those streamed whole before a
    cut are not said again by the fallback voice, only the part cut and the ones after it."""
    monkeypatch.setattr("callspeak.tts.deepgram_rest.DEFAULT_CHUNK_LIMIT", 40)
    parts = [
        "The first part is said by Deepgram.",
        "The second part is cut midway through.",
        "The third part never reaches Deepgram.",
    ]
    fake = FakeDeepgram(KEY)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        backup = FakeService("backup")
        chain = FallbackService([deepgram_voice(dg_url, websocket=False), backup])
        heard = b""
        async for chunk in chain.open().stream(" ".join(parts)):
            if not heard:
                fake.cut_after(800)  # the next request: the second part's
            heard += chunk
        await chain.aclose()
    first = fake.audio_for(parts[0])
    assert [request.text for request in fake.requests] == parts[:2]
    assert backup.providers[0].texts == [" ".join(parts[1:])]
    rest = tone_for(" ".join(parts[1:]))
    rest += b"\xff" * (-len(rest) % 160)  # padded to whole frames
    # The first part whole, what came of the second before the cut (to the last whole frame),
    # then the second and third parts once, on the backup voice.
    assert heard.startswith(first) and heard.endswith(rest)
    assert 800 - 160 < len(heard) - len(first) - len(rest) <= 800


async def test_a_refused_key_mid_text_hands_each_call_its_own_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refusal is kept and raised to every call until the key is tried again: the rest
    of the first call's text was written on it, and a second call's fallback voice said it
    (another caller's account number) instead of its own."""
    monkeypatch.setattr("callspeak.tts.deepgram_rest.DEFAULT_CHUNK_LIMIT", 40)
    alice = "Alice part one is spoken here. Alice account number 1234. Alice third part."
    bob = "Bob part one is spoken here okay. Bob second part of his text. Bob third part."
    fake = FakeDeepgram(KEY)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        backup = FakeService("backup")
        chain = FallbackService([deepgram_voice(dg_url, websocket=False), backup])
        streams = [chain.open().stream(text) for text in (bob, alice)]
        for stream in streams:
            await anext(stream)  # each call's first part is being heard
        fake.fail_next(401, error_body("INVALID_AUTH", "r401"))  # the balance ran out
        for stream in reversed(streams):
            async for _ in stream:
                pass
        await chain.aclose()
    said = [provider.texts for provider in backup.providers]  # Bob's call, then Alice's
    assert said == [
        ["Bob second part of his text. Bob third part."],
        ["Alice account number 1234. Alice third part."],
    ]


class FailingClearService(FakeService):
    """Its providers' ``clear()`` fails, as a Deepgram socket's can mid-reconnect."""

    def open(self) -> FakeProvider:
        provider = super().open()

        async def clear() -> None:
            provider.cleared += 1
            raise TTSError(self.name, "socket closed while clearing", retryable=True)

        provider.clear = clear  # type: ignore[method-assign]
        return provider


async def test_clearing_reaches_every_voice_even_past_one_that_fails_to_clear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A barge-in clears every voice of the chain (any of them may hold text of the
    utterance); one failing to clear is logged and does not keep the others from it."""
    voices = [FakeService("first"), FailingClearService("second"), FakeService("third")]
    provider = FallbackService(voices, apology=b"sorry").open()
    with caplog.at_level(logging.WARNING, "callspeak.tts"):
        await provider.clear()
    assert [voice.providers[0].cleared for voice in voices] == [1, 1, 1]
    assert "clearing fake failed: second: socket closed while clearing" in caplog.text


async def test_the_last_voice_is_asked_even_when_unhealthy_before_the_apology() -> None:
    """Skipping an unhealthy voice is for passing to the next one: the last has no next, and
    may still speak (a Piper voice serving a cached greeting, a Deepgram key refused a moment
    ago by a blip), so it is asked rather than going straight to the apology."""
    primary, last = FakeService("primary"), FakeService("last")
    primary.healthy = last.healthy = False
    chain = FallbackService([primary, last], apology=b"sorry")
    assert await collect(chain, TEXT) == tone_for(TEXT)
    assert primary.providers[0].texts == [] and last.providers[0].texts == [TEXT]


async def test_auth_failure_marks_unhealthy_and_everything_failing_plays_the_apology() -> None:
    auth = TTSAuthError("primary", "bad key")
    primary = ScriptedProvider([auth])
    only = ScriptedService(primary)
    chain = FallbackService([only], apology=b"\x01sorry")
    heard: list[bytes] = []
    with pytest.raises(TTSError, match="heard the apology instead") as info:
        async for chunk in chain.open().stream(TEXT):
            heard.append(chunk)
    assert b"".join(heard) == b"\x01sorry".ljust(160, b"\xff")  # in whole frames
    assert info.value.code == "APOLOGY" and "bad key" in str(info.value)
    assert primary.texts == [TEXT]  # an auth failure is never retried
    assert load_apology()[:4] != b"RIFF" and len(load_apology()) > 8000


async def test_a_deepgram_socket_that_cannot_connect_hands_over_after_its_own_retries() -> None:
    """The WebSocket voice retries its connect itself: its final error is not retried again by
    the fallback, which would double the caller's silence (8 attempts rather than 4 before the
    next voice speaks)."""
    dials = 0

    async def refused(url: str, **kwargs: Any) -> ClientConnection:
        nonlocal dials
        dials += 1
        raise ConnectionRefusedError(111, "Connection refused")

    deepgram = DeepgramWebSocketService(
        KEY, ws_url="ws://127.0.0.1:9", connect=refused, connect_timeout=2.0, backoff=0.01
    )
    backup = FakeService("backup")
    chain = FallbackService([deepgram, backup], apology=b"sorry")
    assert await collect(chain, TEXT) == tone_for(TEXT)
    assert dials == deepgram.max_reconnects + 1 and backup.providers[0].texts == [TEXT]
    await chain.aclose()


async def test_past_deepgrams_concurrency_limit_the_next_voice_speaks_and_deepgram_rests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Deepgram's per-project limit (one request at a time here): a text asked for while
    another streams is refused with 429 once, not sent again at once, and the backup voice says
    it; texts after it go to the backup without a request until the Retry-After has passed."""
    fake = FakeDeepgram(
        KEY, first_byte_delay=0.05, bytes_per_second=8000, max_concurrent=1, retry_after=3
    )
    clock = SettableClock()
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramRestService(KEY, base_url=dg_url, clock=clock)
        backup = FakeService("backup")
        chain = FallbackService([deepgram, backup], apology=b"sorry")
        first = chain.open().stream(LONG := "One, two, three, four, five.")
        head = await anext(first)  # streaming (in real time): it holds the project's one slot
        with caplog.at_level(logging.WARNING, "callspeak.tts"):
            assert await collect(chain, "Two.") == tone_for("Two.")
            assert await collect(chain, "Three.") == tone_for("Three.")  # resting: no request
        assert [request.status for request in fake.requests] == [200, 429]
        # (a provider per call: the first is the streaming call's)
        assert [provider.texts for provider in backup.providers] == [[], ["Two."], ["Three."]]
        assert caplog.text.count("too many at once") == 1 and "falling back" in caplog.text
        assert deepgram.healthy  # load, not a setting to fix: /healthz stays ok
        one = head + b"".join([chunk async for chunk in first])
        assert one.rstrip(b"\xff") == fake.audio_for(LONG).rstrip(b"\xff")
        clock.now += 3  # the Retry-After has passed: Deepgram again
        four = await collect(chain, "Four.")
        assert four.rstrip(b"\xff") == fake.audio_for("Four.").rstrip(b"\xff")
        assert [request.status for request in fake.requests] == [200, 429, 200]
        await chain.aclose()


async def test_during_a_rest_a_websocket_call_without_a_socket_goes_to_the_next_voice_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Deepgram refused a call's socket with 429: that call's next texts go to the backup voice
    with no attempt, warning or error counted for each (as the REST voice is skipped), while
    a call with its socket open goes on speaking on Deepgram."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, max_concurrent=1, retry_after=30)
    failures: list[TTSError] = []
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = deepgram_voice(dg_url, websocket=True)
        backup = FakeService("backup")
        chain = FallbackService([deepgram, backup], apology=b"sorry")
        chain.on_failure(lambda name, error: failures.append(error))
        holding, refused = chain.open(), chain.open()
        one = b"".join([chunk async for chunk in holding.stream("One.")])
        assert one.rstrip(b"\xff") == fake.audio_for("One.").rstrip(b"\xff")
        with caplog.at_level(logging.WARNING, "callspeak.tts"):
            for text in ("Two.", "Three.", "Four."):
                heard = b"".join([chunk async for chunk in refused.stream(text)])
                assert heard.rstrip(b"\xff") == tone_for(text).rstrip(b"\xff")
        assert [error.status for error in failures] == [429]  # the refusal, once
        assert caplog.text.count("failed before any audio") == 1
        assert fake.ws_connections == 2
        assert backup.providers[1].texts == ["Two.", "Three.", "Four."]
        five = b"".join([chunk async for chunk in holding.stream("Five.")])
        assert five.rstrip(b"\xff") == fake.audio_for("Five.").rstrip(b"\xff")
        await chain.aclose()


# -- against the fake Deepgram, over real sockets, through the server and the emulator ----------


@dataclass(frozen=True)
class Heard:
    """What one call through the server to the fake Deepgram came to."""

    report: CallReport
    backup: FakeService | None

    @property
    def played(self) -> bytes:
        return bytes(self.report.played)


def deepgram_voice(dg_url: str, *, websocket: bool) -> TTSService:
    """Deepgram at ``dg_url`` with short timeouts, so that failures show within a test."""
    if websocket:
        return DeepgramWebSocketService(
            KEY,
            ws_url=dg_url.replace("http", "ws"),
            receive_timeout=0.5,
            stall_timeout=0.3,
            connect_timeout=0.5,
            max_reconnects=1,
            backoff=0.01,
        )
    return DeepgramRestService(
        KEY, base_url=dg_url, first_byte_timeout=0.5, stall_timeout=0.3, connect_timeout=0.3
    )


async def call_through(
    fake: FakeDeepgram,
    *,
    websocket: bool = False,
    backup: FakeService | None = None,
    primary: TTSService | None = None,
) -> Heard:
    """One emulated call to a server whose voice is Deepgram (the fake, or ``primary``), then
    ``backup`` if given, then the apology; the call hangs up once the server goes quiet."""
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        engines = [primary or deepgram_voice(dg_url, websocket=websocket)]
        chain = FallbackService(engines + ([backup] if backup else []), apology=load_apology())
        app = create_app(Settings(validate_signatures=False, greeting=CALL_TEXT), tts=chain)
        async with serve_app(app) as url:
            report = await dial(
                DialOptions(url=url.replace("http", "ws") + "/twilio", quiet_seconds=0.7)
            )
        await chain.aclose()
    return Heard(report, backup)


@dataclass(frozen=True)
class Fault:
    """A failure injected into the fake, what the log must say of it, and how many requests
    (REST) or handshakes (WebSocket) Deepgram sees before the backup voice speaks — two where a
    failure before any audio is retried once."""

    inject: Callable[[FakeDeepgram], None]
    causes: tuple[str, ...]
    attempts: int


def error_body(code: str, request_id: str) -> dict[str, str]:
    return {"err_code": code, "err_msg": f"{code} (injected)", "request_id": request_id}


REST_FAULTS = {
    "401 invalid auth": Fault(
        lambda f: f.fail_next(401, error_body("INVALID_AUTH", "r401")),
        ("INVALID_AUTH", "request_id=r401", "DEEPGRAM_API_KEY"),
        1,  # never retried
    ),
    "403 insufficient permissions": Fault(
        lambda f: f.fail_next(403, error_body("INSUFFICIENT_PERMISSIONS", "r403")),
        ("INSUFFICIENT_PERMISSIONS", "request_id=r403", "DEEPGRAM_API_KEY"),
        1,
    ),
    "402 payment required": Fault(
        lambda f: f.fail_next(402, error_body("PAYMENT_REQUIRED", "r402")),
        ("PAYMENT_REQUIRED", "request_id=r402", "was refused for payment", "no credit left"),
        1,  # never retried: the balance is for the operator to top up
    ),
    "429 too many requests": Fault(
        lambda f: f.fail_next(429, error_body("TOO_MANY_REQUESTS", "r429"), count=2),
        ("status=429", "TOO_MANY_REQUESTS", "request_id=r429", "too many at once", "falling back"),
        1,  # not sent again at once: that would add to the load Deepgram refused
    ),
    "500 plain text": Fault(
        lambda f: f.fail_next(500, "Internal Server Error", count=2),
        ("status=500", "Internal Server Error", "retrying once"),
        2,
    ),
    "503 error_code": Fault(
        lambda f: f.fail_next(
            503, {"error_code": "SERVICE_UNAVAILABLE", "err_msg": "busy"}, count=2
        ),
        ("status=503", "SERVICE_UNAVAILABLE", "retrying once"),
        2,
    ),
    "stall before first byte": Fault(
        lambda f: f.stall_after(0, count=2),
        ("no audio within 0.5 s (first byte)", "request_id=", "retrying once"),
        2,
    ),
    "stall mid-stream": Fault(
        lambda f: f.stall_after(1000),
        ("stalled after 1000 bytes (no data for 0.3 s)", "request_id=", "failed mid-stream"),
        1,  # audio had played: the backup voice speaks the text, no retry
    ),
    "cut mid-stream": Fault(
        lambda f: f.cut_after(1000),
        ("connection cut after 1000 bytes", "request_id=", "failed mid-stream"),
        1,
    ),
}

WS_FAULTS = {  # (the fake answers a refused handshake with a request id of its own)
    "refuse 401": Fault(
        lambda f: f.refuse_ws(401, error_body("INVALID_AUTH", "w401"), count=None),
        ("INVALID_AUTH", "request_id=", "DEEPGRAM_API_KEY"),
        1,  # no reconnect loop
    ),
    "refuse 403": Fault(
        lambda f: f.refuse_ws(403, error_body("INSUFFICIENT_PERMISSIONS", "w403"), count=None),
        ("INSUFFICIENT_PERMISSIONS", "request_id=", "DEEPGRAM_API_KEY"),
        1,
    ),
    "refuse 402": Fault(
        lambda f: f.refuse_ws(402, error_body("PAYMENT_REQUIRED", "w402"), count=None),
        ("PAYMENT_REQUIRED", "was refused for payment", "no credit left"),
        1,
    ),
    "refuse 429": Fault(
        lambda f: f.refuse_ws(429, error_body("TOO_MANY_REQUESTS", "w429"), count=None),
        ("status=429", "TOO_MANY_REQUESTS", "too many at once", "falling back"),
        1,  # neither reconnected nor retried: either would add to the load Deepgram refused
    ),
    # Other refused handshakes are retried by the voice itself (max_reconnects=1 here), not
    # again by the chain: that would double the caller's silence.
    "refuse 503": Fault(
        lambda f: f.refuse_ws(503, error_body("SERVICE_UNAVAILABLE", "w503"), count=None),
        ("503", "could not connect after 2 attempts"),
        2,
    ),
    "close 1011 mid-stream": Fault(
        lambda f: f.ws_close_after(500, 1011, "internal error", count=None),
        ("socket closed mid-utterance: code 1011 'internal error'", "failed mid-stream"),
        1,
    ),
    "close 1011 before audio": Fault(
        lambda f: f.ws_close_after(0, 1011, "NET-0001", count=None),
        ("socket closed mid-utterance: code 1011 'NET-0001'", "retrying once"),
        2,  # Deepgram's own trouble: worth the one retry, on a new socket
    ),
    "close 1008 before audio": Fault(
        lambda f: f.ws_close_after(0, 1008, "DATA-0000", count=None),
        ("socket closed mid-utterance: code 1008 'DATA-0000'", "falling back"),
        1,  # the request was at fault: the same text on a new socket would be refused again
    ),
    "close 1000 mid-stream": Fault(
        lambda f: f.ws_close_after(500, 1000, "bye", count=None),
        ("socket closed mid-utterance: code 1000 'bye'", "failed mid-stream"),
        1,
    ),
    "stall before first audio": Fault(
        lambda f: f.ws_stall(count=None),
        ("stalled: no audio and no Flushed for 0.5 s", "retrying once"),
        2,  # the socket is dropped, so the retry opens another
    ),
    "stall mid-stream": Fault(
        lambda f: f.ws_stall(1000, count=None),
        ("stalled: no more audio and no Flushed for 0.3 s", "failed mid-stream"),
        1,
    ),
    "flush limit": Fault(
        lambda f: setattr(f, "flush_limit", 0),  # Deepgram answers the Flush with a Warning
        ("FLUSH_LIMIT", "ignored the Flush"),
        1,  # not retried: the same socket would be refused again
    ),
}


def assert_clean_frames(report: CallReport) -> None:
    """Every media message whole 20 ms frames, and nothing the emulated Twilio refused."""
    assert report.media_messages > 0
    assert report.partial_frame_messages == 0 and report.warnings == []


async def assert_backup_speaks(
    fault: Fault, heard: Heard, attempts: int, caplog: pytest.LogCaptureFixture
) -> None:
    assert heard.backup is not None and heard.backup.providers[0].texts == [CALL_TEXT]
    assert heard.played.endswith(tone_for(CALL_TEXT).rstrip(b"\xff"))  # the text, whole, at the end
    assert_clean_frames(heard.report)
    for cause in fault.causes:
        assert cause in caplog.text, (cause, caplog.text)
    assert attempts == fault.attempts


@pytest.mark.parametrize("fault", list(REST_FAULTS))
async def test_rest_failure_ends_with_the_fallback_voice(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    REST_FAULTS[fault].inject(fake)
    with caplog.at_level(logging.INFO, "callspeak.tts"):
        heard = await call_through(fake, backup=FakeService("backup"))
    await assert_backup_speaks(REST_FAULTS[fault], heard, len(fake.requests), caplog)


@pytest.mark.parametrize("fault", list(WS_FAULTS))
async def test_websocket_failure_ends_with_the_fallback_voice(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    WS_FAULTS[fault].inject(fake)
    with caplog.at_level(logging.INFO, "callspeak.tts"):
        heard = await call_through(fake, websocket=True, backup=FakeService("backup"))
    await assert_backup_speaks(WS_FAULTS[fault], heard, fake.ws_connections, caplog)


@asynccontextmanager
async def never_answering_tls() -> AsyncIterator[str]:
    """An https:// base URL whose server accepts TCP and never answers the TLS handshake."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("websocket", [False, True], ids=["rest", "websocket"])
async def test_a_connection_that_never_opens_ends_with_the_fallback_voice(
    websocket: bool, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDeepgram(KEY)  # (serves nothing here: Deepgram is the silent TLS server)
    async with never_answering_tls() as dg_url:
        with caplog.at_level(logging.INFO, "callspeak.tts"):
            heard = await call_through(
                fake,
                primary=deepgram_voice(dg_url, websocket=websocket),
                backup=FakeService("backup"),
            )
    assert heard.backup is not None and heard.backup.providers[0].texts == [CALL_TEXT]
    assert heard.played.endswith(tone_for(CALL_TEXT).rstrip(b"\xff"))
    assert_clean_frames(heard.report)
    # Which bound runs out first — one attempt's connect timeout, or the first-byte deadline
    # (REST) or wait for a socket (WebSocket) around it — is a race; each names connecting.
    said = (
        ["could not connect after 2 attempts", "no connection within"]
        if websocket
        else ["timed out connecting", "no audio within 0.5 s (first byte, connecting included)"]
    )
    assert any(cause in caplog.text for cause in said), caplog.text


@pytest.mark.parametrize("websocket", [False, True], ids=["rest", "websocket"])
async def test_when_every_voice_fails_the_caller_hears_the_apology(
    websocket: bool, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    body = error_body("SERVICE_UNAVAILABLE", "r503")
    if websocket:
        fake.refuse_ws(503, body, count=None)
    else:
        fake.fail_next(503, body, count=None)
    with caplog.at_level(logging.WARNING, "callspeak.tts"):
        heard = await call_through(fake, websocket=websocket)
    apology = load_apology()
    assert heard.played.rstrip(b"\xff") == apology.rstrip(b"\xff")
    assert_clean_frames(heard.report)
    assert "every voice failed, playing the apology" in caplog.text
    assert ("could not connect" if websocket else "request_id=r503") in caplog.text


@pytest.mark.parametrize("websocket", [False, True], ids=["rest", "websocket"])
async def test_an_apology_is_one_error_line_not_three(
    websocket: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The chain's line names every voice's cause; the session's own lines for the same
    failure ("text-to-speech failed", "speaking utterance 1 failed") said it twice more."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    if websocket:
        fake.refuse_ws(503, count=None)
    else:
        fake.fail_next(503, count=None)
    with caplog.at_level(logging.WARNING):
        heard = await call_through(fake, websocket=websocket)
    assert heard.played.rstrip(b"\xff") == load_apology().rstrip(b"\xff")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("every voice failed, playing the apology")


@pytest.mark.parametrize("chunk_size", [333, 7])
@pytest.mark.parametrize("websocket", [False, True], ids=["rest", "websocket"])
async def test_healthy_deepgram_streams_bytes_untouched_in_whole_frames(
    websocket: bool, chunk_size: int
) -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, chunk_size=chunk_size)
    heard = await call_through(fake, websocket=websocket)
    expected = fake.audio_for(CALL_TEXT)
    # Byte for byte, but for the silence that fills its last frame.
    assert heard.played.rstrip(b"\xff") == expected.rstrip(b"\xff")
    assert_clean_frames(heard.report)


async def test_a_wav_headed_answer_reaches_the_caller_without_its_header() -> None:
    """Deepgram ignoring container=none: the header is dropped, the μ-law after it untouched."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, chunk_size=333)
    fake.answer_in_wav()
    heard = await call_through(fake)
    assert fake.requests[0].query["container"] == "none"  # asked for raw audio
    raw = fake.audio_for(CALL_TEXT)
    assert heard.played.rstrip(b"\xff") == raw.rstrip(b"\xff")
    assert b"RIFF" not in heard.played and b"WAVE" not in heard.played
    assert_clean_frames(heard.report)


async def test_refused_credentials_make_health_degraded_and_name_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import httpx

    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    fake.fail_next(401, {"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials."}, count=None)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        chain = FallbackService(
            [DeepgramRestService("wrong-key", base_url=dg_url), FakeService("backup")]
        )
        app = create_app(Settings(validate_signatures=False, greeting=CALL_TEXT), tts=chain)
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/healthz")).json()["status"] == "ok"
            with caplog.at_level(logging.WARNING, "callspeak.tts"):
                report = await dial(DialOptions(url=url.replace("http", "ws") + "/twilio"))
            health = (await client.get("/healthz")).json()
        await chain.aclose()
    assert tone_for(CALL_TEXT) in bytes(report.played)
    assert health["status"] == "degraded" and health["voice"] == "deepgram > backup"
    assert "DEEPGRAM_API_KEY" in caplog.text


class UnstartableService(FakeService):
    async def start(self) -> None:
        raise RuntimeError("the voice model is corrupt")


async def test_a_fallback_voice_that_cannot_start_makes_health_degraded_and_is_named() -> None:
    """It was dropped from the chain with a log line, and /healthz went on saying ok: the
    failover was gone and nothing an operator watches said so."""
    import httpx

    chain = FallbackService([FakeService("primary"), UnstartableService("backup")])
    app = create_app(Settings(validate_signatures=False), tts=chain)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        health = (await client.get("/healthz")).json()
    assert health["status"] == "degraded" and health["missing"] == ["backup"]
    assert health["voice"] == "primary"


async def test_each_voice_failure_is_counted_not_only_the_whole_chain_failing() -> None:
    """callspeak_tts_errors_total saw only the chain's failure (the apology): Deepgram
    failing while the backup covered left no sample at all."""
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    fake.fail_next(500, "internal error", count=2)  # retried once, then the backup speaks
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        chain = FallbackService([deepgram_voice(dg_url, websocket=False), FakeService("backup")])
        app = create_app(Settings(validate_signatures=False, greeting=CALL_TEXT), tts=chain)
        async with serve_app(app) as url:
            report = await dial(DialOptions(url=url.replace("http", "ws") + "/twilio"))
        await chain.aclose()
    registry = app.state.callspeak.metrics.registry
    labels = {"provider": "deepgram", "kind": "server"}  # (500)
    assert registry.get_sample_value("callspeak_tts_errors_total", labels) == 2
    assert (
        registry.get_sample_value(
            "callspeak_tts_errors_total", {"provider": "fallback", "kind": "apology"}
        )
        is None
    )  # the chain itself did not fail: the backup spoke
    assert tone_for(CALL_TEXT) in bytes(report.played)


async def test_a_refused_key_is_tried_again_every_auth_recheck_and_deepgram_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Calls skip a refused Deepgram (no request) until a minute after the refusal, when one
    tries it again: refused, another minute; accepted, Deepgram speaks again and the chain is
    healthy — no restart (a balance topped up, a permission granted)."""

    async def heard(chain: FallbackService, text: str) -> bytes:
        return (await collect(chain, text)).rstrip(b"\xff")  # whole frames: the last padded

    def heard_tone(text: str) -> bytes:
        return tone_for(text).rstrip(b"\xff")

    clock = SettableClock()
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    refusal = {"err_code": "INSUFFICIENT_PERMISSIONS", "err_msg": "Project lacks permission."}
    fake.fail_next(403, refusal, count=2)
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        deepgram = DeepgramRestService(KEY, base_url=dg_url, auth_recheck=60, clock=clock)
        chain = FallbackService([deepgram, FakeService("backup")], apology=b"sorry")
        assert await heard(chain, "One.") == heard_tone("One.")
        assert not chain.healthy and len(fake.requests) == 1
        clock.now += 59.9
        assert await heard(chain, "Two.") == heard_tone("Two.")  # skipped: no request
        assert len(fake.requests) == 1
        clock.now += 0.1
        assert await heard(chain, "Three.") == heard_tone("Three.")  # tried, refused again
        assert len(fake.requests) == 2 and not chain.healthy
        clock.now += 59.9
        assert await heard(chain, "Four.") == heard_tone("Four.")
        assert len(fake.requests) == 2
        clock.now += 0.1
        with caplog.at_level(logging.INFO, "callspeak.tts"):
            spoken = await heard(chain, "Five.")
        assert spoken == fake.audio_for("Five.").rstrip(b"\xff")
        assert chain.healthy and len(fake.requests) == 3
        assert "accepted again" in caplog.text
        await chain.aclose()


async def test_warm_up_reaches_the_first_healthy_voice_only() -> None:
    primary, backup = FakeService("primary"), FakeService("backup")
    chain = FallbackService([primary, backup], apology=b"sorry")
    chain.open().warm_up()
    assert [p.warmed for p in primary.providers + backup.providers] == [1, 0]
    primary.healthy = False  # e.g. Deepgram refused the key: the next voice is the one used
    chain.open().warm_up()
    assert [p.warmed for p in primary.providers + backup.providers] == [1, 0, 0, 1]


class FullProvider(FakeProvider):
    """A voice whose engine has every slot of its limit taken (the WebSocket voice's sockets)."""

    def at_capacity(self) -> bool:
        return True


class FullService(FakeService):
    def open(self) -> FullProvider:
        provider = FullProvider()
        self.providers.append(provider)
        return provider


async def test_warm_up_skips_a_voice_the_chain_would_skip_for_the_first_text() -> None:
    """Every Deepgram socket taken: the call's first text goes to the next voice, so that is
    the one to warm up (its connection opened ahead of start), not the full one."""
    full, backup = FullService("deepgram-ws"), FakeService("backup")
    chain = FallbackService([full, backup], apology=b"sorry")
    call = chain.open()
    call.warm_up()  # type: ignore[attr-defined]
    assert [p.warmed for p in full.providers + backup.providers] == [0, 1]
    heard = b"".join([chunk async for chunk in call.stream("Hi.")])
    assert heard.rstrip(b"\xff") == tone_for("Hi.")  # (padded to a whole frame)
    assert full.providers[0].texts == [] and backup.providers[0].texts == ["Hi."]


class RaisingProvider(FakeProvider):
    """A voice that fails with its engine's own exception, not a TTSError."""

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        self.texts.append(text)
        raise KeyError("an engine's own exception")
        yield b""  # pragma: no cover - makes this an async generator


async def test_an_unexpected_error_from_a_voice_falls_back_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    primary = RaisingProvider()
    chain = FallbackService(
        [ScriptedService(primary), FakeService("backup")],  # type: ignore[arg-type]
        apology=b"sorry",
    )
    with caplog.at_level(logging.WARNING, "callspeak.tts"):
        assert await collect(chain, CALL_TEXT) == tone_for(CALL_TEXT)
    assert primary.texts == [CALL_TEXT]  # not retried: it would most likely fail again
    assert "unexpected error: KeyError" in caplog.text and "falling back" in caplog.text


async def test_when_every_voice_fails_the_apology_is_heard_then_the_failure_raised() -> None:
    """The caller hears the apology, not the text: the stream says so with an error after it,
    so the utterance ends failed, not heard. A new utterance tries the voices again."""
    chain = FallbackService(
        [FakeService("a", fail_on="e"), FakeService("b", fail_on="e")], apology=b"SORRY"
    )
    provider = chain.open()
    heard: list[bytes] = []
    with pytest.raises(TTSError, match="every voice failed") as info:
        async for chunk in provider.stream("One sentence."):
            heard.append(chunk)
    assert b"".join(heard) == b"SORRY".ljust(160, b"\xff")
    assert not info.value.retryable and info.value.code == "APOLOGY"
    assert str(info.value).count("refused 'One sentence.'") == 2  # each voice's cause
    spoken = await collect(chain, "Hi now.")  # (no "e": spoken; in whole frames, padded)
    assert spoken.rstrip(b"\xff") == tone_for("Hi now.").rstrip(b"\xff")


def wav_headed(audio: bytes) -> bytes:
    fmt = struct.pack("<HHIIHH", 7, 1, 8000, 8000, 1, 8)  # μ-law, mono, 8 kHz
    return (
        b"RIFF" + struct.pack("<I", 36 + len(audio)) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", len(audio)) + audio
    )  # fmt: skip


class HeadedThenCut(FakeProvider):
    """Answers with a WAV header (as a Deepgram ignoring ``container=none`` would) and is cut
    after ``cut`` bytes of its first answer; its later answers are whole."""

    def __init__(self, cut: int) -> None:
        super().__init__()
        self.cut = cut

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        self.texts.append(text)
        answer = wav_headed(tone_for(text))
        if len(self.texts) == 1:
            yield answer[: self.cut]
            raise TTSError("primary", "connection cut", retryable=True)
        yield answer


async def test_a_cut_inside_a_wav_header_is_retried_since_nothing_was_heard() -> None:
    primary = HeadedThenCut(cut=20)
    chain = FallbackService([ScriptedService(primary), FakeService("backup")])  # type: ignore[arg-type]
    heard = await collect(chain, CALL_TEXT)
    assert primary.texts == [CALL_TEXT, CALL_TEXT]
    assert heard == tone_for(CALL_TEXT)  # the retry's header stripped too


async def test_after_a_wav_headed_answer_is_cut_the_next_voice_is_heard_whole() -> None:
    """The first answer's header declares its length: the next voice's audio must not be cut
    to what was left of it (one header per answer, not one per sentence)."""
    primary = HeadedThenCut(cut=44 + 800)
    chain = FallbackService(
        [ScriptedService(primary), FakeService("backup", chunk=333)],  # type: ignore[arg-type]
    )
    heard = await collect(chain, CALL_TEXT, continuation=True)  # mid-utterance: no retry
    tone = tone_for(CALL_TEXT)
    assert heard == tone[:800] + tone  # the next voice says the text again, from its start


async def test_a_fallback_voice_whose_key_is_refused_makes_health_degraded() -> None:
    backup = FakeService("deepgram")
    chain = FallbackService([FakeService("piper"), backup])
    assert chain.healthy
    backup.healthy = False  # what a 401 from Deepgram does
    assert not chain.healthy


class OneTextAtATime(FakeProvider):
    """As the WebSocket voice: a stream still open when the next one starts is refused."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.streaming = False

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        if self.streaming:
            raise RuntimeError("streams one text at a time")
        self.streaming = True
        try:
            async for chunk in super().stream(text, continuation=continuation, ahead=ahead):
                yield chunk
        finally:
            self.streaming = False


class OneAtATimeService(FakeService):
    def open(self) -> OneTextAtATime:  # type: ignore[override]
        provider = OneTextAtATime(**self.provider_options)
        self.providers.append(provider)
        return provider


async def test_closing_the_chains_stream_early_closes_the_voices_stream_before_returning() -> None:
    """What the session does at a barge-in while its producer waits on a full frame queue: the
    voice's stream was left open until the collector finalised it, loop turns later, and the
    WebSocket voice refused a text asked for meanwhile ("streams one text at a time") — which
    the chain took for a failure and gave to the next voice."""
    primary, backup = OneAtATimeService("primary", chunk=160), FakeService("backup")
    chain = FallbackService([primary, backup], apology=b"\xff" * 160)
    provider = chain.open()
    stream = provider.stream("A long reply that the caller interrupts.")
    await anext(stream)  # type: ignore[arg-type]
    await stream.aclose()  # type: ignore[attr-defined]
    assert not primary.providers[0].streaming
    assert [c async for c in provider.stream("Sorry, go ahead.")]
    assert backup.providers[0].texts == []


class FailsAfter(FakeProvider):
    """Yields ``audio`` bytes at once, then ``delay`` s later fails (not retryable)."""

    def __init__(self, audio: int, delay: float) -> None:
        super().__init__()
        self.audio, self.delay = audio, delay

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        if self.audio:
            yield b"\x7f" * self.audio
        await asyncio.sleep(self.delay)
        raise TTSError("primary", "stalled", retryable=False)


class FailsAfterService(FakeService):
    def __init__(self, audio: int, delay: float) -> None:
        super().__init__("primary")
        self.provider = FailsAfter(audio, delay)

    def open(self) -> FailsAfter:  # type: ignore[override]
        return self.provider


@pytest.mark.parametrize(
    ("ahead", "audio", "delay", "left"),
    [
        (1.0, 0, 0.3, 0.7),  # the failure took 0.3 s of the 1 s the caller had
        (0.5, 0, 0.7, 0.0),  # the caller ran dry waiting for it
        (0.0, 8000, 0.2, 0.8),  # it yielded 1 s of audio, 0.2 s of which has played
    ],
)
async def test_the_next_voice_is_told_what_the_caller_has_left_now(
    ahead: float, audio: int, delay: float, left: float
) -> None:
    """``ahead`` went unchanged to the voice asked after another failed: after a 2 s first-byte
    timeout the REST fallback waited for a slot (and Piper set its deadline) as if the caller
    still had all of it to play."""
    backup = FakeService("backup")
    chain = FallbackService([FailsAfterService(audio, delay), backup], apology=b"\xff" * 160)
    provider = chain.open()
    async for _ in provider.stream("Your table is ready.", continuation=True, ahead=ahead):
        pass
    (told,) = backup.providers[0].aheads
    # Time only takes from it: at most what was left, and less only by how late the loop ran
    assert left - 0.3 <= told <= left + 0.01


@pytest.mark.parametrize("then", ["the next voice speaks", "the apology plays"])
async def test_a_voice_failing_leaves_no_cycle_for_the_collector(then: str) -> None:
    """A failure the chain caught is kept (for the apology's causes) in the chain's frame, which
    is in that failure's traceback: unless dropped as the stream ends, a cycle that keeps the
    call's voices until the collector runs (one pass walks every call's leftovers at once)."""
    primary = ScriptedProvider([retryable(), retryable()])
    backup: TTSService = (
        FakeService("backup")
        if then == "the next voice speaks"
        else ScriptedService(ScriptedProvider([retryable(), retryable()]))
    )
    chain = FallbackService([ScriptedService(primary), backup], apology=b"sorry")
    was_on = gc.isenabled()
    gc.disable()
    try:
        provider = chain.open()
        kept = weakref.ref(provider)
        with contextlib.suppress(TTSError):
            assert await collect_from(provider, TEXT)
        del provider
        assert kept() is None  # freed by reference counting, the stream over
    finally:
        if was_on:
            gc.enable()


async def collect_from(provider: TTSProvider, text: str) -> bytes:
    return b"".join([c async for c in provider.stream(text)])
