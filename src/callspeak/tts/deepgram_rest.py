"""Deepgram Aura over REST: one streamed ``POST /v1/speak`` per text (per 2000-character chunk).

https://developers.deepgram.com/reference/text-to-speech-api — we always ask for
``encoding=mulaw&sample_rate=8000&container=none`` (raw telephone audio: without
``container=none`` the body starts with a WAV header a caller would hear as a click).

The service owns one pooled :class:`httpx.AsyncClient` (HTTP/1.1 keep-alive) shared by every call;
each call gets a cheap :class:`DeepgramRestProvider`. Audio is yielded as it arrives from the
socket, never buffered. Timeouts are ours, enforced with :func:`asyncio.timeout`:

* ``first_byte_timeout`` — from sending the request (connecting included, when the pool has no
  idle connection) to the first audio byte;
* ``stall_timeout`` — the longest gap between two body chunks.

Both raise a retryable :class:`TTSError`. We use a thin client rather than ``deepgram-sdk``: the
surface is one POST, and the SDK's breaking rewrites would cost more than these lines.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import httpx

from callspeak.audio.format import TWILIO_FORMAT, AudioFormat
from callspeak.tts.base import TTSAuthError, TTSError
from callspeak.tts.deepgram_errors import parse_error
from callspeak.tts.sentences import DEFAULT_CHUNK_LIMIT, chunk_text

__all__ = ["DeepgramRestProvider", "DeepgramRestService"]

_NAME = "deepgram"
_ERROR_BODY_LIMIT = 64 * 1024


class DeepgramRestService:
    """Process-wide Deepgram REST engine: owns (or borrows) the pooled HTTP client.

    An injected ``http_client`` is used as is and never closed here. ``healthy`` turns False after
    Deepgram refuses the credentials, and stays False: fix ``DEEPGRAM_API_KEY`` and restart.
    """

    name = _NAME

    def __init__(
        self,
        api_key: str,
        *,
        model: str = "aura-2-thalia-en",
        base_url: str = "https://api.deepgram.com",
        connect_timeout: float = 5.0,
        first_byte_timeout: float = 5.0,
        stall_timeout: float = 3.0,
        http_client: httpx.AsyncClient | None = None,
        max_connections: int = 200,
    ) -> None:
        self._api_key = api_key
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.first_byte_timeout = first_byte_timeout
        self.stall_timeout = stall_timeout
        # Per-request httpx timeouts bound connecting and waiting for a pooled connection; reads
        # are bounded by our own first-byte/stall deadlines instead.
        self.request_timeout = httpx.Timeout(
            connect=connect_timeout, read=None, write=connect_timeout, pool=connect_timeout
        )
        self._max_connections = max_connections
        self._client = http_client
        self._owns_client = http_client is None
        self._healthy = True
        self._closed = False

    @property
    def healthy(self) -> bool:
        return self._healthy

    def mark_unhealthy(self) -> None:
        """Record that Deepgram refused the credentials (called by providers)."""
        self._healthy = False

    @property
    def client(self) -> httpx.AsyncClient:
        """The shared client, created on first use."""
        if self._client is None:
            limits = httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections,
                keepalive_expiry=30.0,
            )
            self._client = httpx.AsyncClient(http1=True, http2=False, limits=limits)
        return self._client

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Token {self._api_key}"}

    async def start(self) -> None:
        """Create the pooled client. Idempotent."""
        _ = self.client

    def open(self) -> DeepgramRestProvider:
        """A provider for one call. Raises :class:`RuntimeError` once the service is closed."""
        if self._closed:
            raise RuntimeError("DeepgramRestService is closed")
        return DeepgramRestProvider(self)

    async def aclose(self) -> None:
        """Close the pooled client if this service created it. Idempotent."""
        self._closed = True
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


class DeepgramRestProvider:
    """One call's Deepgram REST voice. See :mod:`callspeak.tts.base` for the stream contract.

    ``clear()`` is a no-op (each text is its own request: closing the iterator stops it).
    ``aclose()`` makes an in-flight ``stream()`` stop at its next await with a non-retryable
    :class:`TTSError` and closes its response; later ``stream()`` calls fail the same way.
    """

    name = _NAME
    audio_format: AudioFormat = TWILIO_FORMAT

    def __init__(self, service: DeepgramRestService) -> None:
        self._service = service
        self._closed = False
        self._deadline: asyncio.Timeout | None = None  # the read in flight, so aclose can end it

    async def stream(
        self, text: str, *, continuation: bool = False, ahead: float = 0.0
    ) -> AsyncIterator[bytes]:
        """Audio of ``text``: one request per ≤2000-character chunk, in order, streamed."""
        for chunk in chunk_text(text, DEFAULT_CHUNK_LIMIT):
            self._check_open()
            async for audio in self._stream_chunk(chunk):
                yield audio

    async def clear(self) -> None:
        """Nothing to drop: requests are per text and end when their iterator is closed."""

    async def aclose(self) -> None:
        """Stop any in-flight stream and refuse new ones. Idempotent; the service stays open."""
        self._closed = True
        deadline = self._deadline
        if deadline is not None:
            with contextlib.suppress(RuntimeError):  # already expiring or exited
                deadline.reschedule(asyncio.get_running_loop().time())

    def _check_open(self) -> None:
        if self._closed:
            raise TTSError(_NAME, "provider is closed", retryable=False)

    def _error(self, message: str) -> TTSError:
        if self._closed:
            return TTSError(_NAME, "provider closed while streaming", retryable=False)
        return TTSError(_NAME, message, retryable=True)

    async def _read(self, it: AsyncIterator[bytes], when: float) -> bytes | None:
        """Next body chunk before loop time ``when``, else ``TimeoutError``; ``None`` at the end."""
        async with asyncio.timeout_at(when) as self._deadline:
            try:
                return await anext(it)
            except StopAsyncIteration:
                return None
            finally:
                self._deadline = None

    async def _stream_chunk(self, text: str) -> AsyncIterator[bytes]:
        service = self._service
        request = service.client.build_request(
            "POST",
            f"{service.base_url}/v1/speak",
            params={
                "model": service.model,
                "encoding": "mulaw",
                "sample_rate": "8000",
                "container": "none",
            },
            json={"text": text},
            headers=service.auth_header,
            timeout=service.request_timeout,
        )
        received = 0
        response: httpx.Response | None = None
        loop = asyncio.get_running_loop()
        when = loop.time() + service.first_byte_timeout  # one deadline for headers + first byte
        try:
            try:
                async with asyncio.timeout_at(when) as self._deadline:
                    response = await service.client.send(request, stream=True)
                    if response.status_code != 200:
                        body = await response.aread()
                        raise self._status_error(response, body[:_ERROR_BODY_LIMIT])
                chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())  # it is one
                async with contextlib.aclosing(chunks) as it:
                    while (audio := await self._read(it, when)) is not None:
                        if audio:
                            received += len(audio)
                            yield audio
                            self._check_open()
                        when = loop.time() + service.stall_timeout
            finally:
                self._deadline = None
        except TimeoutError:
            if received == 0:
                message = f"no audio within {service.first_byte_timeout:g} s (first byte)"
            else:
                message = (
                    f"stalled after {received} bytes (no data for {service.stall_timeout:g} s)"
                )
            raise self._error(message) from None
        except httpx.TimeoutException as exc:
            raise self._error(f"timed out connecting ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            detail = str(exc) or type(exc).__name__
            if response is None:
                raise self._error(f"cannot reach Deepgram: {detail}") from exc
            raise self._error(f"connection cut after {received} bytes: {detail}") from exc
        finally:
            if response is not None:
                await response.aclose()

    def _status_error(self, response: httpx.Response, body: bytes) -> TTSError:
        error = parse_error(response.status_code, body, response.headers, provider=_NAME)
        if isinstance(error, TTSAuthError):
            self._service.mark_unhealthy()
        return error
