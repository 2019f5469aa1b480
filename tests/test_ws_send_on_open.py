"""SendOnOpenConnection against the fake Deepgram on loopback: the handshake and the first frames
go out from callbacks, before the coroutine awaiting connect() resumes."""

from __future__ import annotations

import functools
from typing import Any, cast

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response
from websockets.uri import parse_uri

from callspeak.testing.fake_deepgram import FakeDeepgram
from callspeak.tts.ws_send_on_open import SendOnOpenConnection

QUERY = "/v1/speak?model=aura-2-thalia-en&encoding=mulaw&sample_rate=8000"
SPEAK, FLUSH = '{"type": "Speak", "text": "Hi there."}', '{"type": "Flush"}'


def opening(url: str, **kwargs: Any) -> type[ClientConnection]:
    """The class to give connect() for ``url``, whose origin may have the credentials."""
    factory = functools.partial(SendOnOpenConnection, origin=parse_uri(url), **kwargs)
    return cast(type[ClientConnection], factory)


async def test_the_first_frames_go_out_before_connect_returns(
    base: str, fake: FakeDeepgram
) -> None:
    seen: list[str] = []

    def on_open(ws: ClientConnection) -> list[str]:
        seen.append("open")
        assert ws.request is not None and ws.response is not None
        return [SPEAK, FLUSH]

    url = base.replace("http://", "ws://") + QUERY
    headers = {"Authorization": "Token test-key"}
    ws = await connect(
        url, create_connection=opening(url, on_open=on_open, additional_headers=headers)
    )
    seen.append("returned")
    assert seen == ["open", "returned"]
    audio = b""
    while True:  # Metadata, the audio, then Flushed: the fake read what on_open returned
        message = await ws.recv()
        if isinstance(message, bytes):
            audio += message
        elif '"Flushed"' in message:
            break
    assert audio == fake.audio_for("Hi there.")
    assert [m["type"] for m in fake.ws_messages] == ["Speak", "Flush"]
    sent = fake.requests[-1].headers
    assert sent["authorization"] == "Token test-key" and "websockets" in sent["user-agent"]
    await ws.close()


async def test_nothing_to_send_on_open_leaves_an_ordinary_connection(
    base: str, fake: FakeDeepgram
) -> None:
    url = base.replace("http://", "ws://") + QUERY
    headers = {"Authorization": "Token test-key"}
    ws = await connect(
        url,
        create_connection=opening(
            url, on_open=lambda ws: [], additional_headers=headers, user_agent_header=None
        ),
    )
    await ws.send(SPEAK)
    await ws.send(FLUSH)
    assert '"Metadata"' in str(await ws.recv())
    assert await ws.recv() == fake.audio_for("Hi there.")[: fake.chunk_size]
    assert "user-agent" not in fake.requests[-1].headers
    await ws.close()


async def test_a_refused_handshake_raises_and_never_asks_for_frames(
    base: str, fake: FakeDeepgram
) -> None:
    asked: list[ClientConnection] = []
    fake.refuse_ws(429)
    url = base.replace("http://", "ws://") + QUERY
    factory = opening(url, on_open=lambda ws: asked.append(ws) or [], additional_headers={})
    with pytest.raises(InvalidStatus) as info:
        await connect(url, create_connection=factory)
    assert info.value.response.status_code == 429 and asked == []
    with pytest.raises(InvalidStatus) as info:  # no key: the fake's 401, same path
        await connect(url, create_connection=factory)
    assert info.value.response.status_code == 401 and asked == []


async def test_credentials_do_not_follow_a_redirect_to_another_origin(
    base: str, fake: FakeDeepgram
) -> None:
    """As websockets does for its own redirects: the fake (another port, so another origin)
    gets the request without the key, and refuses it."""
    target = base.replace("http://", "ws://") + QUERY

    def redirect(connection: ServerConnection, request: Request) -> Response:
        return Response(302, "Found", Headers({"Location": target}))

    async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=redirect) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}{QUERY}"
        headers = {"Authorization": "Token test-key"}
        factory = opening(url, on_open=lambda ws: [], additional_headers=headers)
        with pytest.raises(InvalidStatus) as info:
            await connect(url, create_connection=factory)
    assert info.value.response.status_code == 401  # the fake's answer to a request with no key
    assert "authorization" not in fake.requests[-1].headers and len(fake.requests) == 1
