"""The offline voice: real Piper synthesis, its cache, clause splitting and scheduling."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from callspeak.audio.format import TWILIO_FORMAT
from callspeak.audio.mulaw import decode
from callspeak.tts.base import TTSError
from callspeak.tts.fallback import FallbackService
from callspeak.tts.piper import (
    PIECE_MAX_CHARS,
    PiperService,
    PiperUnavailable,
    _PiperProvider,
    bundled_voice_paths,
    priority,
    split_first_clause,
)
from callspeak.tts.priority_pool import PriorityPool
from tests.test_session import Harness, start_json


async def test_speaks_mulaw_at_8khz_sentence_by_sentence(piper: PiperService) -> None:
    provider = piper.open()
    assert provider.audio_format == TWILIO_FORMAT
    chunks = [c async for c in provider.stream("Good morning. The weather is fine.")]
    assert len(chunks) == 2  # one chunk per sentence: first audio after the first sentence
    for chunk in chunks:
        seconds = len(chunk) / 8000
        assert 0.4 < seconds < 4.0
        pcm = decode(np.frombuffer(chunk, np.uint8)).astype(np.float64)
        assert np.sqrt(np.mean(pcm**2)) > 500
    await provider.aclose()


async def test_rendered_sentences_are_cached_and_prerender_fills_the_cache(
    piper: PiperService,
) -> None:
    await piper.prerender(["A sentence for the cache."])
    first = piper.render_sentence("A sentence for the cache.")
    # Piper samples noise, so a fresh synthesis would differ: equality proves the cache served it.
    assert piper.render_sentence("A sentence for the cache.") == first


async def test_a_prerendered_long_greeting_is_served_whole_from_the_cache(
    piper: PiperService,
) -> None:
    greeting = "Thank you for calling Acme Plumbing, how can I help you this afternoon?"
    assert len(split_first_clause(greeting)) == 2  # long enough to be split when not cached
    await piper.prerender([greeting])
    prerendered = piper.cached(greeting)
    assert prerendered is not None
    provider = piper.open()
    # A call's first words (ahead=0): the cached sentence whole, not two clauses synthesised live.
    chunks = [c async for c in provider.stream(greeting, ahead=0.0)]
    assert chunks == [prerendered]
    await provider.aclose()


async def test_an_onnx_runtime_failure_is_raised_as_a_non_retryable_tts_error(
    piper: PiperService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(sentence: str) -> bytes:
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code")

    monkeypatch.setattr(piper, "render_sentence", fail)
    provider = piper.open()
    with pytest.raises(TTSError, match="Fail: .*Non-zero status code") as caught:
        _ = [c async for c in provider.stream("This sentence breaks the engine.")]
    assert caught.value.provider == "piper"
    assert caught.value.retryable is False
    assert isinstance(caught.value.__cause__, Fail)
    await provider.aclose()


def test_long_openings_split_after_the_first_clause() -> None:
    assert split_first_clause("Hello caller number 3, how are you today?") == [
        "Hello caller number 3,",
        "how are you today?",
    ]
    assert split_first_clause("Hello, how are you today?") == ["Hello, how are you today?"]
    assert split_first_clause("Hi, this sentence has a lead-in that is far too short.") == [
        "Hi, this sentence has a lead-in that is far too short."
    ]
    long_plain = "This is a long sentence without any clause break inside it at all"
    assert split_first_clause(long_plain) == [long_plain]


def test_speech_in_progress_outranks_new_calls() -> None:
    speaking, waiting = priority(2.0), priority(0.0)
    assert speaking < waiting  # continuing a caller's speech before anyone's first words
    assert priority(0.5) < priority(3.0)  # the sooner needed, the sooner done


async def test_missing_voice_files_are_reported_clearly(tmp_path: Path) -> None:
    service = PiperService(tmp_path / "nope.onnx")
    with pytest.raises(PiperUnavailable, match=r"voice file not found: .*nope\.onnx"):
        await service.start()
    await service.aclose()


def _voice_files(directory: Path, model: str, config: str) -> Path:
    """voice.onnx (the bundled one, or "truncated") and its .onnx.json ("good", or this text)."""
    bundled_model, bundled_config = bundled_voice_paths()
    onnx = bundled_model.read_bytes()
    path = directory / "voice.onnx"
    path.write_bytes(onnx if model == "good" else onnx[:1000])
    Path(f"{path}.json").write_text(bundled_config.read_text() if config == "good" else config)
    return path


@pytest.mark.parametrize(
    ("model", "config", "message"),
    [
        ("truncated", "good", r"cannot load Piper voice .*voice\.onnx: .*INVALID_PROTOBUF"),
        (
            "good",
            "not json",
            r"cannot read Piper voice config .*voice\.onnx\.json: JSONDecodeError",
        ),
        ("good", "{}", r"cannot read Piper voice config .*voice\.onnx\.json: KeyError"),
    ],
)
async def test_voice_files_that_are_not_a_voice_are_reported_as_unavailable(
    model: str, config: str, message: str, tmp_path: Path
) -> None:
    """A corrupt model or config was ONNX Runtime's or json's own error: not PiperUnavailable,
    so not reported as a voice that cannot start."""
    service = PiperService(_voice_files(tmp_path, model, config), workers=1)
    with pytest.raises(PiperUnavailable, match=message):
        await service.start()
    await service.aclose()


async def test_concurrent_syntheses_all_complete(piper: PiperService) -> None:
    texts = [f"Concurrent sentence number {n}." for n in range(4)]
    results = await asyncio.gather(
        *(piper.synthesize_sentence(t, priority=priority(0.0)) for t in texts)
    )
    assert all(len(r) > 4000 for r in results)


async def test_a_closed_voice_answers_with_a_tts_error_and_is_not_healthy() -> None:
    """A call still ending as the server stops asks a closed voice: a TTSError (the fallback's
    apology follows), not a RuntimeError logged as a bug."""
    service = PiperService()
    await service.start()
    assert service.healthy
    await service.aclose()
    assert not service.healthy
    provider = service.open()
    with pytest.raises(TTSError, match="closed"):
        async for _ in provider.stream("Anything not in the cache."):
            pass


class SlowEngine:
    """Stands in for PiperService behind a provider: each piece takes 0.1 s to render and is
    one second of audio; it notes the deadline each piece was given."""

    def __init__(self) -> None:
        self.deadlines: list[float] = []

    def cached(self, sentence: str) -> bytes | None:
        return None

    def defer_sentence(self, sentence: str, *, then: object) -> None:
        return None  # nothing made ahead: each piece is asked for in turn

    async def synthesize_sentence(
        self, sentence: str, *, priority: tuple[float, float], then: object = None
    ) -> bytes:
        self.deadlines.append(priority[1])
        await asyncio.sleep(0.1)
        return b"\xff" * 8000


async def test_each_piece_of_a_text_is_due_when_the_audio_before_it_runs_out() -> None:
    """With 2 s of the call's audio still to play, the pieces of a three-sentence text are due
    2, 3 and 4 s from the start, however long rendering takes: the time spent rendering comes
    off what is left to play (it was counted again for every piece, later and later)."""
    engine = SlowEngine()
    provider = _PiperProvider(engine)  # type: ignore[arg-type]
    start = time.monotonic()
    chunks = [c async for c in provider.stream("One. Two. Three.", continuation=True, ahead=2.0)]
    assert len(chunks) == 3
    due = [deadline - start for deadline in engine.deadlines]
    assert due == [
        pytest.approx(2.0, abs=0.02),
        pytest.approx(3.0, abs=0.02),
        pytest.approx(4.0, abs=0.02),
    ]


class RecordingEngine(SlowEngine):
    """As SlowEngine, noting each piece it is asked to render, at once; ``cache`` holds
    sentences already rendered."""

    def __init__(self, cache: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__()
        self.pieces: list[str] = []
        self.cache = set(cache)

    def cached(self, sentence: str) -> bytes | None:
        return b"\xff" * 8000 if sentence in self.cache else None

    async def synthesize_sentence(
        self, sentence: str, *, priority: tuple[float, float], then: object = None
    ) -> bytes:
        self.pieces.append(sentence)
        return b"\xff" * 8000


async def test_a_run_on_sentence_is_rendered_in_pieces_of_bounded_length() -> None:
    """A sentence is heard only once all of it is rendered: a 1500-character one without a
    full stop kept the caller waiting 9 s, and one with commas left seconds of silence between
    its two pieces. Every piece is now at most PIECE_MAX_CHARS, split at clauses, then words."""
    clause = "and then the caller hears about one more thing on the list"
    run_on = ", ".join([clause] * 25) + "."  # 1524 characters, one sentence
    wordy = " ".join(["word"] * 400) + "."  # no clause break at all
    engine = RecordingEngine()
    provider = _PiperProvider(engine)  # type: ignore[arg-type]
    chunks = [c async for c in provider.stream(f"Short one. {run_on} {wordy}", ahead=1.0)]
    assert len(chunks) == len(engine.pieces)
    assert engine.pieces[0] == "Short one."
    assert all(len(piece) <= PIECE_MAX_CHARS for piece in engine.pieces)
    assert all(piece.endswith(",") for piece in engine.pieces[1:5])  # split at clause breaks
    # Nothing lost, nothing said twice.
    assert " ".join(engine.pieces) == f"Short one. {run_on} {wordy}"


async def test_a_long_sentence_already_rendered_is_served_whole() -> None:
    """A pre-rendered long greeting is cached as one sentence: it is not split and rendered
    again."""
    greeting = "Welcome, " + ", ".join(["this is a long pre-rendered greeting"] * 10) + "."
    engine = RecordingEngine({greeting})
    provider = _PiperProvider(engine)  # type: ignore[arg-type]
    assert len(greeting) > PIECE_MAX_CHARS
    assert [c async for c in provider.stream(greeting)] != []
    assert engine.pieces == [greeting]


async def test_starting_twice_at_once_starts_one_pool_of_workers() -> None:
    """The pool was kept only once the model had loaded: a second start() meanwhile made a
    second pool, whose workers nothing stopped."""

    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("callspeak-synth")}

    before = workers()
    service = PiperService(workers=2)
    await asyncio.gather(service.start(), service.start())
    assert len(workers() - before) == 2
    await service.aclose()
    assert not {t for t in workers() - before if t.is_alive()}


class TimedEngine:
    """Stands in for PiperService: each piece takes ``wait`` s (queue and render) and is
    ``audio`` s long; notes each piece's priority as due-in seconds; ``fail_at`` raises there."""

    def __init__(self, wait: float, audio: float, fail_at: int | None = None) -> None:
        self.wait, self.audio, self.fail_at = wait, audio, fail_at
        self.asked: list[tuple[str, float, float]] = []

    def cached(self, sentence: str) -> bytes | None:
        return None

    def defer_sentence(self, sentence: str, *, then: object) -> None:
        return None  # nothing made ahead: each piece is asked for in turn

    async def synthesize_sentence(
        self, sentence: str, *, priority: tuple[float, float], then: object = None
    ) -> bytes:
        self.asked.append((sentence, priority[0], priority[1] - time.monotonic()))
        if len(self.asked) - 1 == self.fail_at:
            raise TTSError("piper", "synthesis failed: Fail: boom", retryable=False)
        await asyncio.sleep(self.wait)
        return b"\xff" * int(8000 * self.audio)


async def test_the_second_clause_of_first_words_is_due_when_the_first_has_played() -> None:
    """The first clause waited 0.3 s for a worker and is 0.2 s of audio: the caller has just
    begun hearing it when the second is asked for. The wait was taken off that audio too, so the
    second clause went in with nothing left to play: the class of new calls' first words, behind
    every speaking call's work — the middle of a sentence waiting, as the pool's rule forbids."""
    engine = TimedEngine(wait=0.3, audio=0.2)
    provider = _PiperProvider(engine)  # type: ignore[arg-type]
    text = "Hello caller number 3, how are you today?"
    assert [c async for c in provider.stream(text, ahead=0.0)]
    (_, first_class, _), (_, second_class, due) = engine.asked
    assert first_class == 1.0  # first words
    assert second_class == 0.0  # speech under way
    assert due <= 0.21  # the rest of the first clause, at most (less, if the loop ran late)


async def test_speech_under_way_that_has_run_dry_is_the_most_urgent() -> None:
    """A later sentence of an utterance whose caller has nothing left to play (ahead 0) went in
    behind every other call's speech, however far ahead those were."""
    assert priority(0.0, continuing=True) < priority(0.5) < priority(9.0) < priority(0.0)
    engine = TimedEngine(wait=0.0, audio=1.0)
    provider = _PiperProvider(engine)  # type: ignore[arg-type]
    assert [c async for c in provider.stream("And the rest.", continuation=True, ahead=0.0)]
    assert engine.asked[0][1] == 0.0


def new_call_arrives_during(
    service: PiperService, piece: str, rendered: list[str]
) -> list[asyncio.Future[bytes]]:
    """Stand in for the service's renderer (each piece 800 bytes, noted in ``rendered``): as
    ``piece`` renders, a new call asks for its first words and they are queued before the render
    ends. Returns where the new call's render will be."""
    loop = asyncio.get_running_loop()
    new_call: list[asyncio.Future[bytes]] = []

    def first_words() -> None:
        words = service.synthesize_sentence("Welcome, new caller.", priority=priority(0.0))
        new_call.append(asyncio.ensure_future(words))

    def render_sentence(sentence: str) -> bytes:
        if sentence == piece:
            loop.call_soon_threadsafe(first_words)
            deadline = time.monotonic() + 5
            while service._pool is not None and not service._pool.queued:  # queued meanwhile
                assert time.monotonic() < deadline
                time.sleep(0.001)
        rendered.append(sentence)
        return b"\xff" * 800

    service.render_sentence = render_sentence  # type: ignore[method-assign]
    return new_call


@pytest.mark.parametrize("chained", [False, True], ids=["alone", "in-a-fallback-chain"])
async def test_the_next_sentence_of_a_speaking_call_goes_before_new_calls_first_words(
    chained: bool,
) -> None:
    """A call is speaking "One. Two. Three." when a new call asks for its first words, while
    "Two." renders on the only worker. "Three." was asked for once "Two." had reached the event
    loop — by then the worker had taken the new call's words, and the speaking call waited a
    whole render (seconds, under load: the caller of the twenty-calls test heard 1-3 s of
    silence, and hung up in it). The session names each next sentence ahead, and the worker
    that renders "Two." queues "Three." as it finishes (also behind the fallback chain, which
    ``callspeak serve`` always puts the voice in)."""
    service = PiperService(workers=1)
    service._pool = PriorityPool(1)  # no model: render_sentence is stood in for below
    rendered: list[str] = []
    new_call = new_call_arrives_during(service, "Two.", rendered)
    try:
        voice = FallbackService([service], apology=b"sorry") if chained else service
        async with Harness(voice.open(), greeting=None) as h:
            h.transport.push(start_json(say="One. Two. Three."))
            await h.transport.wait_for(lambda ms: len(h.marks()) == 3)
            await asyncio.gather(*new_call)
    finally:
        await service.aclose()
    assert rendered == ["One.", "Two.", "Three.", "Welcome, new caller."]


@pytest.mark.parametrize(
    ("text", "continuation", "ahead"),
    [
        ("Hello there my dear caller, this is the first sentence.", False, 0.0),
        ("One. Two.", True, 1.0),
    ],
    ids=["after-a-first-clause", "in-a-group-of-sentences"],
)
async def test_the_next_piece_of_a_text_goes_before_new_calls_first_words(
    text: str, continuation: bool, ahead: float
) -> None:
    """As the next sentence, the next piece of one text: the rest of a first sentence split at
    its clause (a caller with only that clause to hear), the next sentence of a text the session
    grouped for a pay-per-text voice or the rest another voice left. Asked for by the event loop
    once the piece before it had arrived, it came after the worker had taken a new call's first
    words, and waited a whole render."""
    service = PiperService(workers=1)
    service._pool = PriorityPool(1)  # no model: render_sentence is stood in for below
    rendered: list[str] = []
    provider = service.open()
    pieces = provider._pieces(text)  # type: ignore[attr-defined]
    if ahead <= 0:
        pieces[:1] = split_first_clause(pieces[0])
    assert len(pieces) == 2
    new_call = new_call_arrives_during(service, pieces[0], rendered)
    try:
        chunks = [c async for c in provider.stream(text, continuation=continuation, ahead=ahead)]
        assert len(chunks) == 2
        await asyncio.gather(*new_call)
    finally:
        await provider.aclose()
        await service.aclose()
    assert rendered == [*pieces, "Welcome, new caller."]


async def test_a_stream_closed_at_a_yield_drops_the_next_sentence_made_ahead() -> None:
    """Closed early while its audio waits to be taken (the session's producer cancelled while
    its frame queue was full, a socket closed under a send): the next sentence is not coming.
    Its job, queued as this one was rendered, was left to run — speech nobody hears, before
    every new call's first words — until the voice's clear() or aclose() came round."""
    service = PiperService(workers=1)
    pool = service._pool = PriorityPool(1)  # no model: render_sentence is stood in for below
    loop = asyncio.get_running_loop()
    gate = threading.Event()
    rendered: list[str] = []
    busy: list[asyncio.Future[object]] = []

    def another_call() -> None:  # more urgent: it keeps the worker until the stream is closed
        busy.append(asyncio.ensure_future(pool.run(gate.wait, priority=(0.0, -1.0))))

    def render_sentence(sentence: str) -> bytes:
        if sentence == "One.":
            loop.call_soon_threadsafe(another_call)
            deadline = time.monotonic() + 5
            while not pool.queued:
                assert time.monotonic() < deadline
                time.sleep(0.001)
        rendered.append(sentence)
        return b"\xff" * 800

    service.render_sentence = render_sentence  # type: ignore[method-assign]
    provider = service.open()
    try:
        provider.prefetch("Two.")  # type: ignore[attr-defined]
        stream = provider.stream("One.")
        assert await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        gate.set()
        await asyncio.gather(*busy)
        await pool.run(lambda: None, priority=(2.0, 0.0))  # after anything queued
        assert rendered == ["One."]
    finally:
        gate.set()
        await provider.aclose()
        await service.aclose()


@pytest.mark.parametrize("named_ahead", [False, True], ids=["same-text", "next-text"])
async def test_a_piece_made_ahead_is_due_when_the_one_before_it_has_played(
    named_ahead: bool,
) -> None:
    """The piece "One." waited 0.3 s for a worker, its caller with nothing left to play, and
    is 0.2 s of audio: "Two." is due 0.2 s after "One." came, when the caller has heard it.
    Queued by the worker, it was due 0.2 s after "One." was asked for — a tenth of a second
    before it came: the wait taken off the audio, as the stream's own reckoning no longer does
    (see test_the_second_clause_of_first_words_is_due_when_the_first_has_played), and the job
    put before other calls' speech due sooner than it."""
    service = PiperService(workers=1)
    pool = service._pool = PriorityPool(1)  # no model: render_sentence is stood in for below
    queued: list[tuple[float, float]] = []  # (due in, class) of each job made ahead, as queued
    queue_deferred = pool._queue_deferred

    def record(job: Any, priority: tuple[float, float]) -> None:
        queued.append((priority[1] - time.monotonic(), priority[0]))
        queue_deferred(job, priority)

    def render_sentence(sentence: str) -> bytes:
        if sentence == "One.":
            time.sleep(0.3)
        return b"\xff" * 1600  # 0.2 s

    pool._queue_deferred = record  # type: ignore[method-assign]
    service.render_sentence = render_sentence  # type: ignore[method-assign]
    provider = service.open()
    try:
        if named_ahead:
            provider.prefetch("Two.")  # type: ignore[attr-defined]
            assert [c async for c in provider.stream("One.", continuation=True)]
            assert [c async for c in provider.stream("Two.", continuation=True, ahead=0.2)]
        else:
            assert [c async for c in provider.stream("One. Two.", continuation=True)]
    finally:
        await provider.aclose()
        await service.aclose()
    due_in, klass = queued[0]
    assert klass == 0.0  # speech under way
    assert due_in == pytest.approx(0.2, abs=0.05)


async def test_after_piper_fails_mid_text_the_next_voice_says_only_the_rest() -> None:
    """Piper yields whole pieces: a failure after some says which were not heard, so a fallback
    voice (``--tts piper`` with ``CALLSPEAK_FALLBACK=deepgram``) does not say the first again."""
    engine = TimedEngine(wait=0.0, audio=0.5, fail_at=1)
    provider = _PiperProvider(engine)  # type: ignore[arg-type]
    heard = []
    with pytest.raises(TTSError) as caught:
        async for chunk in provider.stream("Your order has shipped. It arrives Monday. Bye."):
            heard.append(chunk)
    assert len(heard) == 1
    assert caught.value.unspoken == "It arrives Monday. Bye."
    # Nothing heard yet: the whole text is the next voice's.
    engine = TimedEngine(wait=0.0, audio=0.5, fail_at=0)
    with pytest.raises(TTSError) as caught:
        async for _ in _PiperProvider(engine).stream("One. Two."):  # type: ignore[arg-type]
            pass
    assert caught.value.unspoken is None
