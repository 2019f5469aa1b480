"""The seam between a call and a text-to-speech engine.

Two small protocols:

* :class:`TTSService` is process-wide: it owns what is expensive to make (a loaded voice model, a
  pooled HTTP client) and hands each call its own :class:`TTSProvider` with :meth:`TTSService.open`.
* :class:`TTSProvider` is per call: it streams the audio of one text at a time, says what format the
  bytes are in, can drop work in flight (barge-in), and is closed when the call ends. Closing a
  provider never closes the service that made it.

Contract of :meth:`TTSProvider.stream`: an async iterator of non-empty ``bytes`` chunks in
``audio_format``; chunk boundaries are arbitrary (odd sizes, a 16-bit sample split across two
chunks, a WAV header split across chunks are all legal). The first chunk is yielded as soon as the
engine has it. Closing the iterator early (``aclose()``, or cancelling the task iterating it) stops
the engine's work for that text. Failures raise :class:`TTSError`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol, Self, runtime_checkable

from callspeak.audio.format import AudioFormat

__all__ = [
    "APOLOGY",
    "CONCURRENCY_LIMIT",
    "TTSAuthError",
    "TTSError",
    "TTSProvider",
    "TTSService",
    "aclose_stream",
    "at_capacity",
    "rest_remaining",
    "prefetch",
    "warm_up",
    "worth_trying",
]

_log = logging.getLogger("callspeak.tts")


#: The ``code`` of the :class:`TTSError` a stream raises after yielding an apology in place of
#: its text (every voice failed): the audio sent for that text was not the text.
APOLOGY = "APOLOGY"
#: The ``code`` of the :class:`TTSError` of a Deepgram voice that found every slot of its
#: concurrency limit taken (``CALLSPEAK_DEEPGRAM_MAX_CONCURRENT``): no request was sent.
CONCURRENCY_LIMIT = "CONCURRENCY_LIMIT"
#: The code of a WebSocket text not spoken for Deepgram's limit of flushes a minute (ours
#: counted, or Deepgram's Warning).
FLUSH_LIMIT = "FLUSH_LIMIT"


class TTSError(Exception):
    """A text-to-speech engine failed for one text.

    ``retryable`` says whether the same request may succeed if sent again (429, 5xx, timeouts, a
    stall, a cut connection); ``request_id`` is the engine's id for the request when it gave one.
    ``unspoken``, when an engine sets it, is the end of the text whose audio it had not yet
    yielded whole when it failed (the REST voice's parts after the last it finished, the local
    voice's sentences and clauses after the last it yielded): what a fallback voice still has to
    say. None means the whole text. ``retry_after`` is the wait in seconds the engine asked for
    before another request (a 429's ``Retry-After``), if it said.
    """

    unspoken: str | None = None

    def copy(self, **changes: object) -> Self:
        """A new error like this one, with ``changes`` to its fields. An error kept to be
        raised again (a refused key's, for every call) must be raised as a copy: raising one
        object again adds each raise's frames, and their locals, to its traceback for good,
        and a field set on it by one call would be seen by the next."""
        unknown = set(changes) - set(vars(self)) - {"unspoken"}
        if unknown:
            raise TypeError(f"TTSError has no field {', '.join(sorted(unknown))}")
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        if "__notes__" in clone.__dict__:  # (a list: each copy gets its own)
            clone.__notes__ = list(self.__notes__)
        clone.__dict__.update(changes)
        clone.args = (clone.message,) if "message" in changes else self.args
        return clone

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self._kind = kind  # (see the property: None derives it)
        self.provider = provider
        self.message = message
        self.retryable = retryable
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        """The failure in a word (the ``kind`` label of ``callspeak_tts_errors_total``):
        ``refused`` (credentials, 401/403), ``payment`` (402), ``too_many`` (429), ``server``
        (5xx), ``request`` (another status: the request was at fault), ``apology`` (every voice
        failed), ``busy`` (our own limit of requests in progress was reached: none was sent),
        ``flush_limit`` (the WebSocket's flushes a minute), ``connection`` (no status, worth
        trying again: a timeout, a stall, a cut; or ``kind="connection"`` given, as for a socket
        that no attempt could open), ``other``. A ``kind`` given to the constructor wins: whether
        an error is worth retrying does not say what it was."""
        if self._kind is not None:
            return self._kind
        status = self.status
        if isinstance(self, TTSAuthError):
            return "payment" if status == 402 else "refused"
        if self.code == APOLOGY:
            return "apology"
        if self.code == CONCURRENCY_LIMIT:
            return "busy"
        if self.code == FLUSH_LIMIT:
            return "flush_limit"
        if status is None:
            return "connection" if self.retryable else "other"
        if status == 429:
            return "too_many"
        return "server" if status >= 500 else "request"

    def __str__(self) -> str:
        parts = [f"{self.provider}: {self.message}"]
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.code:
            parts.append(f"code={self.code}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        return " ".join(parts)


class TTSAuthError(TTSError):
    """Credentials were refused (401/403), or the account cannot pay (402): retrying cannot
    help; the operator must fix a setting or the account."""

    def __init__(self, provider: str, message: str, **kwargs: object) -> None:
        kwargs.pop("retryable", None)
        super().__init__(provider, message, retryable=False, **kwargs)  # type: ignore[arg-type]


@runtime_checkable
class TTSProvider(Protocol):
    """One call's voice. See the module docstring for the streaming contract.

    Optional: ``warm_up() -> None``, for an engine that opens something per call (a
    connection): open it now, in the background, so the first :meth:`stream` does not wait for
    it. The session calls it once the call's stream is accepted, before its ``start``. It must be
    idempotent and must not raise; a failure is the first :meth:`stream`'s to report.

    Optional: ``prefetch(text: str) -> None``, for an engine with a queue of work shared by
    calls (the local voice): ``text`` will be asked for, as a continuation, right after the text
    the next :meth:`stream` is for — the session names each sentence of an utterance so before
    asking for the one before it — so the engine can have it queued by the time it is needed.
    A hint, which must not raise; the stream that asks for something else drops it.

    Optional: ``stream_min_chars: int``, for an engine limited in how many texts it may be asked
    for a minute (the WebSocket voice's flushes): the session asks it for texts of at least that
    many characters, short sentences grouped, each group one mark (see
    :func:`~callspeak.tts.sentences.group_sentences`).
    """

    @property
    def name(self) -> str:
        """Short engine name for logs and metrics, e.g. ``"piper"`` or ``"deepgram"``."""
        ...

    @property
    def audio_format(self) -> AudioFormat:
        """The format of every chunk :meth:`stream` yields."""
        ...

    def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        """Stream the audio of ``text``, first bytes first.

        Scheduling hints, which engines may ignore: ``continuation`` says this text continues an
        utterance already under way; ``ahead`` is how many seconds of this call's audio are
        already produced and not yet played — how long the caller can wait for this text without
        hearing a gap (0: the caller is waiting now). The local voice runs its work earliest
        deadline first from it.
        """
        ...

    async def clear(self) -> None:
        """Drop any text and audio in flight (the caller barged in). A no-op where nothing is."""
        ...

    async def aclose(self) -> None:
        """Release what this call holds (and stop a warm-up under way). Idempotent."""
        ...


@runtime_checkable
class TTSService(Protocol):
    """A process-wide engine that makes per-call providers."""

    @property
    def name(self) -> str: ...

    @property
    def healthy(self) -> bool:
        """False once the engine reported a failure an operator must fix (e.g. bad credentials)."""
        ...

    async def start(self) -> None:
        """Load models / open pools. Called once before the first :meth:`open`."""
        ...

    def open(self) -> TTSProvider:
        """A provider for one call."""
        ...

    async def aclose(self) -> None:
        """Release everything. Idempotent."""
        ...


def worth_trying(service: TTSService) -> bool:
    """Whether to ask ``service`` for speech now: it is not resting after refusing too many
    requests (:func:`rest_remaining`), and it is healthy or its refused credentials are due to
    be tried again (an engine with a ``recheck_due()`` method, as Deepgram's voices)."""
    if rest_remaining(service) > 0:
        return False
    if service.healthy:
        return True
    due = getattr(service, "recheck_due", None)
    return bool(due is not None and due())


def rest_remaining(voice: TTSService | TTSProvider) -> float:
    """Seconds ``voice`` still rests after Deepgram refused too many requests at once (a 429),
    from its optional ``rest_remaining()`` method (see :mod:`~callspeak.tts.too_many_requests`):
    the REST Deepgram service has one (no request goes out), and the WebSocket voice's provider
    (a call with no socket open, since no socket may be opened). 0 when it has none."""
    method = getattr(voice, "rest_remaining", None)
    return float(method()) if method is not None else 0.0


def at_capacity(provider: TTSProvider) -> bool:
    """Whether ``provider`` cannot speak for its call now because every slot of its engine's
    limit of requests in progress is another call's, from its optional ``at_capacity()`` method
    (see :mod:`~callspeak.tts.request_slots`): the WebSocket voice's, for a call with no socket
    open. False when it has none (the REST voice waits for a slot instead)."""
    method = getattr(provider, "at_capacity", None)
    return bool(method()) if method is not None else False


def warm_up(provider: TTSProvider) -> None:
    """Call ``provider.warm_up()`` if it has one (the method is optional: see
    :class:`TTSProvider`). Raises nothing: warming up only saves time, so a failure is logged
    and the call goes on (its first request meets the problem again and reports it)."""
    method = getattr(provider, "warm_up", None)
    if method is None:
        return
    try:
        method()
    except Exception:
        _log.exception("warming up the voice %s failed", getattr(provider, "name", "?"))


def prefetch(provider: TTSProvider, text: str) -> None:
    """Call ``provider.prefetch(text)`` if it has one (optional: see :class:`TTSProvider`).
    Raises nothing: a failure is logged, and the text is asked for as usual when its turn
    comes."""
    method = getattr(provider, "prefetch", None)
    if method is None:
        return
    try:
        method(text)
    except Exception:
        _log.exception("prefetching with the voice %s failed", getattr(provider, "name", "?"))


async def aclose_stream(stream: AsyncIterator[bytes]) -> None:
    """Close an audio stream early (an async generator's ``aclose``), ending the engine's work."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
