"""Failover between voices: every Deepgram failure ends with the caller hearing speech."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from callspeak.config import Settings
from callspeak.emulator import DialOptions, dial
from callspeak.server import create_app
from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_deepgram import FakeDeepgram
from callspeak.tts.base import TTSAuthError, TTSError
from callspeak.tts.deepgram_rest import DeepgramRestService
from callspeak.tts.deepgram_ws import DeepgramWebSocketService
from callspeak.tts.fallback import FallbackService, load_apology
from tests.conftest import serve_app
from tests.fakes import FakeProvider, FakeService, SettableClock, tone_for

KEY = "test-key"
TEXT = "Your appointment is confirmed."


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


# -- against the fake Deepgram, over real sockets, through the server and the emulator ----------


async def call_through(
    fake: FakeDeepgram, *, websocket: bool = False, backup: FakeService | None = None
) -> tuple[bytes, FakeService | None]:
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as dg_url:
        if websocket:
            primary: object = DeepgramWebSocketService(
                KEY,
                ws_url=dg_url.replace("http", "ws"),
                receive_timeout=0.5,
                max_reconnects=1,
                backoff=0.01,
            )
        else:
            primary = DeepgramRestService(
                KEY, base_url=dg_url, first_byte_timeout=0.5, stall_timeout=0.3
            )
        engines = [primary] + ([backup] if backup else [])
        chain = FallbackService(engines, apology=load_apology())  # type: ignore[arg-type]
        app = create_app(Settings(validate_signatures=False, greeting=TEXT), tts=chain)
        async with serve_app(app) as url:
            report = await dial(
                DialOptions(url=url.replace("http", "ws") + "/twilio", quiet_seconds=0.7)
            )
        await chain.aclose()
    return bytes(report.played), backup


REST_FAULTS = {
    "401 invalid auth": lambda f: f.fail_next(
        401, {"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.", "request_id": "r401"}
    ),
    "403 insufficient permissions": lambda f: f.fail_next(
        403, {"err_code": "INSUFFICIENT_PERMISSIONS", "err_msg": "no", "request_id": "r403"}
    ),
    "429 too many requests": lambda f: f.fail_next(
        429,
        {"err_code": "TOO_MANY_REQUESTS", "err_msg": "slow down", "request_id": "r429"},
        count=2,
    ),
    "500 plain text": lambda f: f.fail_next(500, "Internal Server Error", count=2),
    "503 error_code": lambda f: f.fail_next(
        503, {"error_code": "SERVICE_UNAVAILABLE", "err_msg": "busy"}, count=2
    ),
    "stall before first byte": lambda f: f.stall_after(0, count=2),
    "stall mid-stream": lambda f: f.stall_after(1000),
    "cut mid-stream": lambda f: f.cut_after(1000),
}

CAUSES = {
    "401 invalid auth": "INVALID_AUTH",
    "403 insufficient permissions": "INSUFFICIENT_PERMISSIONS",
    "429 too many requests": "status=429",
    "500 plain text": "status=500",
    "503 error_code": "SERVICE_UNAVAILABLE",
    "stall before first byte": "deepgram",
    "stall mid-stream": "stall",
    "cut mid-stream": "deepgram",
}


@pytest.mark.parametrize("fault", list(REST_FAULTS))
async def test_rest_failure_ends_with_the_fallback_voice(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    REST_FAULTS[fault](fake)
    with caplog.at_level(logging.WARNING, "callspeak.tts"):
        played, backup = await call_through(fake, backup=FakeService("backup"))
    assert backup is not None and backup.providers[0].texts == [TEXT]
    assert played.endswith(tone_for(TEXT)) or tone_for(TEXT) in played
    assert CAUSES[fault] in caplog.text, caplog.text


@pytest.mark.parametrize(
    "fault",
    ["refuse 401", "close mid-stream", "stall"],
)
async def test_websocket_failure_ends_with_the_fallback_voice(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    if fault == "refuse 401":
        fake.refuse_ws(401, count=None)
    elif fault == "close mid-stream":
        fake.ws_close_after(500, 1011, "internal error", count=None)
    else:
        fake.ws_stall(count=None)
    with caplog.at_level(logging.WARNING, "callspeak.tts"):
        played, backup = await call_through(fake, websocket=True, backup=FakeService("backup"))
    assert backup is not None and tone_for(TEXT) in played
    assert "deepgram-ws" in caplog.text and "falling back" in caplog.text


async def test_when_every_voice_fails_the_caller_hears_the_apology(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01)
    fake.fail_next(
        503,
        {"err_code": "SERVICE_UNAVAILABLE", "err_msg": "down", "request_id": "r503"},
        count=None,
    )
    with caplog.at_level(logging.WARNING, "callspeak.tts"):
        played, _ = await call_through(fake)
    apology = load_apology()
    assert played.rstrip(b"\xff") == apology.rstrip(b"\xff")
    assert "every voice failed" in caplog.text and "r503" in caplog.text


async def test_healthy_deepgram_streams_bytes_untouched() -> None:
    fake = FakeDeepgram(KEY, first_byte_delay=0.01, chunk_size=333)
    played, _ = await call_through(fake)
    expected = fake.audio_for(TEXT)
    assert played.rstrip(b"\xff") == expected.rstrip(b"\xff")


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
        app = create_app(Settings(validate_signatures=False, greeting=TEXT), tts=chain)
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/healthz")).json()["status"] == "ok"
            with caplog.at_level(logging.WARNING, "callspeak.tts"):
                report = await dial(DialOptions(url=url.replace("http", "ws") + "/twilio"))
            health = (await client.get("/healthz")).json()
        await chain.aclose()
    assert tone_for(TEXT) in bytes(report.played)
    assert health["status"] == "degraded" and health["voice"] == "deepgram > backup"
    assert "DEEPGRAM_API_KEY" in caplog.text


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
        assert await collect(chain, TEXT) == tone_for(TEXT)
    assert primary.texts == [TEXT]  # not retried: it would most likely fail again
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
    heard = await collect(chain, TEXT)
    assert primary.texts == [TEXT, TEXT]
    assert heard == tone_for(TEXT)  # the retry's header stripped too


async def test_after_a_wav_headed_answer_is_cut_the_next_voice_is_heard_whole() -> None:
    """The first answer's header declares its length: the next voice's audio must not be cut
    to what was left of it (one header per answer, not one per sentence)."""
    primary = HeadedThenCut(cut=44 + 800)
    chain = FallbackService(
        [ScriptedService(primary), FakeService("backup", chunk=333)],  # type: ignore[arg-type]
    )
    heard = await collect(chain, TEXT, continuation=True)  # mid-utterance: no retry
    tone = tone_for(TEXT)
    assert heard == tone[:800] + tone  # the next voice says the text again, from its start


async def test_a_fallback_voice_whose_key_is_refused_makes_health_degraded() -> None:
    backup = FakeService("deepgram")
    chain = FallbackService([FakeService("piper"), backup])
    assert chain.healthy
    backup.healthy = False  # what a 401 from Deepgram does
    assert not chain.healthy
