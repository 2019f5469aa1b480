"""Failover between voice engines, ending in a pre-rendered apology: a caller never hears silence.

:class:`FallbackService` chains engines, e.g. Deepgram → Piper. For each text (the session asks
sentence by sentence) its provider tries the engines in order:

* an engine whose service is unhealthy (credentials refused) is skipped, until its refused
  credentials are due to be tried again (:func:`~callspeak.tts.base.worth_trying`);
* an engine resting after Deepgram refused too many requests at once (429) is skipped until
  the rest is over (:mod:`~callspeak.tts.too_many_requests`), and so is one that cannot speak
  for this call because every slot of its limit of requests in progress is another call's (the
  WebSocket voice with ``CALLSPEAK_DEEPGRAM_MAX_CONCURRENT`` sockets open;
  :mod:`~callspeak.tts.request_slots`) — the last voice too, with nobody to wait for;
* a failure before any audio of the text was yielded, at the start of an utterance, is retried
  once on the same engine when it is retryable (5xx, timeouts, a stall, a cut) — but a 429 is
  not: sending it again at once would add to the load Deepgram just refused. Only on the last
  engine of the chain (no other voice to turn to) is a 429 tried once more, after the rest it
  asked for, if that is at most :data:`LAST_VOICE_WAIT`; a last engine found resting waits out
  such a rest before it is asked, and is not asked at all during a longer one;
* any other failure moves on to the next engine — a text cut mid-stream is spoken again from its
  start by the next voice (where the cut fell in the text is unknowable), unless the engine
  says how much of it was streamed whole (:attr:`TTSError.unspoken`: the REST voice's parts
  of a text over 2000 characters, the local voice's sentences and clauses), when the next voice
  says only the rest; the rest of that utterance stays on the voice that took over. The next
  voice is told what the caller has left to play now (``ahead``, less the time the failure
  took, plus the audio it yielded), not when the text was first asked for;
* an engine failing with anything but a :class:`TTSError` (a bug, an engine's own exception, audio
  the converter refuses) is treated as a failure that is not retried;
* when every engine has failed, the pre-rendered apology is yielded instead (in whole 20 ms
  frames, the last padded with silence), then a :class:`TTSError` (``code="APOLOGY"``, not
  retryable) naming the causes is raised: the caller heard the apology, not the text, so the
  session ends the utterance failed — not heard — and speaks none of the rest of it.

A WAV header at the start of an engine's answer is stripped per answer (per attempt), so a retry
or the next voice starts clean, and an attempt counts as having yielded audio only once audio
past such a header came.

Every failure is logged with its cause (status, Deepgram's ``err_code``, request id). Output is
always Twilio's format; an engine with another format is converted on the way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources

from callspeak.audio.convert import TwilioAudioConverter
from callspeak.audio.format import FRAME_BYTES, TWILIO_FORMAT, AudioFormat
from callspeak.tts.base import (
    APOLOGY,
    CONCURRENCY_LIMIT,
    TTSAuthError,
    TTSError,
    TTSProvider,
    TTSService,
    aclose_stream,
    at_capacity,
    prefetch,
    rest_remaining,
    warm_up,
    worth_trying,
)
from callspeak.tts.left_to_play import LeftToPlay
from callspeak.tts.too_many_requests import rest_for

__all__ = ["APOLOGY_TEXT", "FallbackService", "load_apology"]

log = logging.getLogger("callspeak.tts")

APOLOGY_TEXT = "Sorry, I can't speak right now. Please try again later."

#: The longest a text waits on the chain's last voice after a 429 before its one more try:
#: a second's silence, rather than the apology, while Deepgram's requests in progress end.
LAST_VOICE_WAIT = 1.0
_TIMER_SLACK = 0.05
_BYTES_PER_SECOND = TWILIO_FORMAT.sample_rate  # (μ-law: a byte a sample)


def load_apology() -> bytes:
    """The apology, μ-law 8 kHz, rendered with the offline voice by scripts/render_apology.py."""
    return resources.files("callspeak.data").joinpath("apology.ulaw").read_bytes()


class FallbackService:
    """Engines in order of preference (implements :class:`~callspeak.tts.base.TTSService`)."""

    def __init__(
        self,
        services: Sequence[TTSService],
        *,
        apology: bytes | None = None,
        missing: Sequence[str] = (),
    ) -> None:
        """``missing``: fallback voices the settings asked for that could not be built."""
        if not services:
            raise ValueError("a fallback chain needs at least one engine")
        self._services = list(services)
        #: Voices asked for but not in the chain: skipped when built, or dropped at start().
        self.missing = list(missing)
        self._on_failure: Callable[[str, TTSError], None] | None = None
        apology = load_apology() if apology is None else apology
        # Whole frames: the stream ends in an error, after which no converter flushes a rest.
        self._apology = apology + b"\xff" * (-len(apology) % FRAME_BYTES)  # μ-law silence

    @property
    def services(self) -> list[TTSService]:
        return list(self._services)

    @property
    def name(self) -> str:
        return " > ".join(service.name for service in self._services)

    @property
    def healthy(self) -> bool:
        """Every engine asked for is there and usable: one whose credentials were refused, or
        a fallback that could not be built or started, needs attention (``/healthz`` says
        ``degraded``) even while calls are still spoken."""
        return not self.missing and all(service.healthy for service in self._services)

    def on_failure(self, callback: Callable[[str, TTSError], None]) -> None:
        """Call ``callback(engine name, error)`` at each engine's failure, retried or not
        (the server counts them in ``callspeak_tts_errors_total``): the session sees only the
        failure of the whole chain, when the apology plays."""
        self._on_failure = callback

    async def start(self) -> None:
        """Start every engine. A fallback that cannot start is dropped with an error in the log;
        the preferred engine failing to start is fatal."""
        await self._services[0].start()
        usable = [self._services[0]]
        for service in self._services[1:]:
            try:
                await service.start()
            except Exception as exc:
                log.error(
                    "fallback voice %s unavailable, dropped from the chain: %s", service.name, exc
                )
                self.missing.append(service.name)
                continue
            usable.append(service)
        self._services = usable

    async def prerender(self, texts: Sequence[str]) -> None:
        """Let the preferred engine cache ``texts`` if it keeps a cache (the local voice does)."""
        prerender = getattr(self._services[0], "prerender", None)
        if prerender is not None:
            await prerender(texts)

    def open(self) -> TTSProvider:
        return _FallbackProvider(
            [(service, service.open()) for service in self._services],
            self._apology,
            self._on_failure,
        )

    async def aclose(self) -> None:
        for service in self._services:
            await service.aclose()


class _FallbackProvider:
    def __init__(
        self,
        chain: list[tuple[TTSService, TTSProvider]],
        apology: bytes,
        on_failure: Callable[[str, TTSError], None] | None,
    ) -> None:
        self._chain = chain
        self._apology = apology
        self._on_failure = on_failure
        self._first = 0  # index of the engine the current utterance stays on
        self._following: str | None = None  # see prefetch()

    @property
    def name(self) -> str:
        return self._chain[self._first][1].name

    @property
    def audio_format(self) -> AudioFormat:
        return TWILIO_FORMAT

    @property
    def stream_min_chars(self) -> int:
        """The largest any voice of the chain asks for (any of them may speak the text)."""
        return max(getattr(provider, "stream_min_chars", 0) for _, provider in self._chain)

    def prefetch(self, text: str) -> None:
        """Kept for the next stream, which names it to each voice it asks (see
        :class:`~callspeak.tts.base.TTSProvider`)."""
        self._following = text

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        following, self._following = self._following, None
        if not continuation:
            self._first = 0  # a new utterance tries the preferred voice
        failures: list[TTSError] = []
        # ``ahead`` was measured when the text was asked for: a voice asked after another failed
        # is told what the caller has left now (less the time the failures took, plus the audio
        # they yielded), as the REST voice's wait for a slot and Piper's deadline depend on it.
        left = LeftToPlay(ahead)
        for index in range(self._first, len(self._chain)):
            service, provider = self._chain[index]
            last = index == len(self._chain) - 1
            if not _worth_asking(service, provider):
                # Named among the causes should the apology play: "every voice failed" with
                # only the last voice's failure would hide why the first was not asked.
                skipped = _skipped(service.name, _rest(service, provider), provider)
                if skipped.code == CONCURRENCY_LIMIT and self._on_failure is not None:
                    # Counted, as the REST voice's wait for a slot is when it gives up: how
                    # often the limit kept a text from the voice (a rest is counted once, at
                    # its 429).
                    self._on_failure(service.name, skipped)
                if not last:
                    failures.append(skipped)
                    continue
                if skipped.code == CONCURRENCY_LIMIT:
                    # The last voice, every slot of its limit another call's: none frees within
                    # a wait worth a caller's silence (a socket lasts a whole call).
                    failures.append(skipped)
                    break
                # The last voice, asked even when unhealthy (it may still speak), but not
                # while it rests after a 429: a rest of a second or less is waited out.
                rested = await _wait_out_rest(service, provider, 0.0, failures)
                if rested is None:
                    break
            else:
                rested = 0.0
            retry = not continuation
            # A 429 on the last voice: one wait and one more try per text (none more if the
            # voice was waited for before it was asked).
            waited = rested > 0
            while True:
                yielded = False
                if following is not None:
                    prefetch(provider, following)
                attempt = self._converted(provider, text, continuation, left.now())
                try:
                    async for chunk in attempt:
                        yielded = True
                        left.add(len(chunk) / _BYTES_PER_SECOND)
                        yield chunk
                    if index != self._first:
                        self._first = index
                    return
                except Exception as raised:
                    exc = _as_tts_error(provider.name, raised)
                    failures.append(exc)
                    # Not on an engine resting now: it refused as too many at once (429). The
                    # last voice has no next one, so it waits out a short rest and tries once
                    # more, mid-utterance too.
                    wait = _wait_for_last_voice(exc) if last and not waited else None
                    again = not yielded and (
                        (retry and exc.retryable and _worth_asking(service, provider))
                        or wait is not None
                    )
                    retry, waited = False, waited or wait is not None
                    _log_failure(provider.name, exc, yielded=yielded, retrying=again, last=last)
                    if self._on_failure is not None:
                        self._on_failure(provider.name, exc)
                    _drop_tracebacks(exc)
                    _drop_tracebacks(raised)  # (not exc's cause when it was not a TTSError)
                    if yielded and exc.unspoken is not None:
                        text = exc.unspoken  # what was heard whole is not said again
                    if not again:
                        break
                    if wait is not None:
                        if await _wait_out_rest(service, provider, wait, failures) is None:
                            break  # (another call's 429 made the rest longer meanwhile)
                finally:
                    # Closed here when this stream is closed early (at a yield), not left to
                    # the collector: the voice's own stream ends, and the voice is free for the
                    # next text, before aclose() returns. (After a failure: already ended.)
                    await aclose_stream(attempt)
            # The next engine takes over this text and the rest of the utterance.
            self._first = min(index + 1, len(self._chain) - 1)
        causes = "; ".join(str(exc) for exc in failures) or "no engine is healthy"
        log.error("every voice failed, playing the apology: %s", causes)
        yield self._apology
        raise TTSError(
            "fallback",
            f"every voice failed, the caller heard the apology instead: {causes}",
            retryable=False,
            code=APOLOGY,
        )

    async def _converted(
        self, provider: TTSProvider, text: str, continuation: bool, ahead: float
    ) -> AsyncIterator[bytes]:
        """One attempt's audio in Twilio's format, in whole frames: a converter per attempt, so
        a WAV header is stripped from each answer (μ-law 8 kHz goes through untouched)."""
        stream = provider.stream(text, continuation=continuation, ahead=ahead)
        try:
            converter = TwilioAudioConverter(provider.audio_format)
            async for chunk in stream:
                frames = converter.push(chunk)
                if frames:
                    yield b"".join(frames)
            tail = converter.flush()
            if tail:
                yield b"".join(tail)
        finally:
            await aclose_stream(stream)

    def warm_up(self) -> None:
        """Warm up the voice a new utterance tries first (the others are for bad moments), if
        it has anything to warm up (see :class:`~callspeak.tts.base.TTSProvider`): the first
        healthy one not skipped now (resting after a 429, or every slot of its limit taken)."""
        for service, provider in self._chain:
            if service.healthy and _worth_asking(service, provider):
                warm_up(provider)
                return

    async def clear(self) -> None:
        for _, provider in self._chain:
            try:
                await provider.clear()
            except TTSError as exc:
                log.warning("clearing %s failed: %s", provider.name, exc)

    async def aclose(self) -> None:
        for _, provider in self._chain:
            await provider.aclose()


def _as_tts_error(name: str, exc: Exception) -> TTSError:
    """``exc`` as the TTSError the chain acts on: not retryable unless it is a retryable
    TTSError (an engine's own exception or a bug would most likely happen again)."""
    if isinstance(exc, TTSError):
        return exc
    log.error("voice %s failed unexpectedly", name, exc_info=exc)
    return TTSError(name, f"unexpected error: {exc!r}", retryable=False)


def _rest(service: TTSService, provider: TTSProvider) -> float:
    """Seconds the voice still rests after a 429: the service's (no request goes out), or the
    provider's (the WebSocket voice's call with no socket open, as no socket may be opened)."""
    return max(rest_remaining(service), rest_remaining(provider))


def _worth_asking(service: TTSService, provider: TTSProvider) -> bool:
    """:func:`~callspeak.tts.base.worth_trying`, and this call's voice is not resting, nor at
    its limit of requests in progress, either."""
    return worth_trying(service) and rest_remaining(provider) == 0 and not at_capacity(provider)


async def _wait_out_rest(
    service: TTSService, provider: TTSProvider, first: float, failures: list[TTSError]
) -> float | None:
    """Wait ``first`` seconds, then what is left of the voice's rest after a 429 (another call's
    429 may have made it longer), as long as the whole wait stays within
    :data:`LAST_VOICE_WAIT` (and a timer's slack). The seconds waited; None, with a failure
    added to ``failures``, when the rest is longer: then no request goes out at all."""
    waited, pending = 0.0, first
    for _ in range(3):  # (a timer may wake a hair early: the rest is then checked again)
        left = max(pending, _rest(service, provider))
        if left <= 0:
            return waited
        if waited + left > LAST_VOICE_WAIT + _TIMER_SLACK:
            break
        await asyncio.sleep(left)
        waited, pending = waited + left, 0.0
    left = _rest(service, provider)
    if left <= 0:
        return waited
    failures.append(_resting_error(provider.name, left))
    return None


def _wait_for_last_voice(exc: TTSError) -> float | None:
    """Seconds the chain's last voice waits before trying a text again after Deepgram refused it
    as too many at once (429): the rest it asked for, if that is short (at most
    :data:`LAST_VOICE_WAIT`); None when the failure is no 429, or the rest is longer (the
    apology then plays at once rather than after a longer silence)."""
    if exc.status != 429 or isinstance(exc, TTSAuthError):
        return None
    rest = rest_for(exc.retry_after)
    return rest if rest <= LAST_VOICE_WAIT else None


def _skipped(name: str, rest: float, provider: TTSProvider) -> TTSError:
    """Why a voice was not asked for a text: resting after a 429, at its limit of requests in
    progress, else unhealthy."""
    if rest > 0:
        return _resting_error(name, rest)
    if at_capacity(provider):
        return TTSError(
            name,
            "not asked: every slot of CALLSPEAK_DEEPGRAM_MAX_CONCURRENT is another call's",
            retryable=False,
            code=CONCURRENCY_LIMIT,
        )
    return TTSError(name, "not asked: its credentials stand refused", retryable=False)


def _resting_error(name: str, rest: float) -> TTSError:
    return TTSError(
        name,
        f"resting {rest:.1f} s more after Deepgram refused a request as too many at once (429)",
        retryable=False,
        status=429,
        retry_after=rest,
    )


def _drop_tracebacks(exc: BaseException) -> None:
    """Forget the tracebacks of ``exc`` and the exceptions it was raised from or during: a
    failure is kept for the apology's causes (its text), and its traceback holds the frames that
    raised it — this chain's, the voice's, which often holds the error itself in a local — in
    cycles that would keep the call's voices until the collector runs."""
    seen: set[int] = set()
    pending: BaseException | None = exc
    while pending is not None and id(pending) not in seen:
        seen.add(id(pending))
        pending.__traceback__ = None
        pending = pending.__cause__ or pending.__context__


def _log_failure(
    name: str, exc: TTSError, *, yielded: bool, retrying: bool, last: bool = False
) -> None:
    if isinstance(exc, TTSAuthError):
        what = "was refused for payment" if exc.status == 402 else "refused the credentials"
    elif yielded:
        what = "failed mid-stream"
    else:
        what = "failed before any audio"
    then = "retrying once" if retrying else "no other voice left" if last else "falling back"
    log.warning("voice %s %s (%s); %s", name, what, exc, then)
