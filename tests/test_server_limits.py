"""Limits over real sockets: max calls, idle timeout, message size, text length."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from callspeak.config import Settings
from callspeak.emulator import DialOptions, dial
from callspeak.protocol import AccountSid, CallSid, Connected, MediaFormat, Start, StreamSid
from callspeak.server import CallRegistry, create_app
from callspeak.session import CallSession
from callspeak.testing.asgi_server import serve_asgi
from tests.conftest import RunningServer, Serve, serve_app
from tests.fakes import FakeService, spoken


def local(**fields: object) -> Settings:
    return Settings(validate_signatures=False, **fields)  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``predicate``: connection counts have no change event to wait on."""
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def read_until_closed(ws: ClientConnection, seconds: float = 5.0) -> None:
    """Read (and drop) what the server sends until it closes the socket, for ``seconds`` at most."""
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(seconds):
            while True:
                await ws.recv()


def start_message(sid: str = "MZlimit", **params: str) -> str:
    return Start(
        1,
        StreamSid(sid),
        AccountSid("AClimit"),
        CallSid("CA" + sid[2:]),
        ("inbound",),
        params,
        MediaFormat("audio/x-mulaw", 8000, 1),
    ).to_json()


async def test_the_call_over_max_calls_is_refused_while_the_others_keep_talking(
    serve: Serve,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "callspeak.server")
    app = create_app(local(max_calls=3), tts=FakeService())
    async with serve(app) as url:
        server = RunningServer(url, app)
        texts = [
            f"Caller {n} keeps listening. The server keeps talking to caller {n}. "
            f"Nothing may interrupt caller {n} now."
            for n in range(3)
        ]
        talking = [
            asyncio.create_task(
                dial(DialOptions(url=server.ws_url, parameters={"say": t}, quiet_seconds=0.2))
            )
            for t in texts
        ]
        await until(lambda: len(server.state.calls) == 3)
        with pytest.raises(InvalidStatus) as refused:
            await dial(DialOptions(url=server.ws_url, parameters={"say": "Let me in."}))
        assert refused.value.response.status_code == 403
        assert refused.value.response.body == b"server full: too many calls"
        assert not any(t.done() for t in talking)  # refused while the three were still speaking
        assert "server full (3 of max_calls=3 streams open)" in caplog.text
        metrics = server.state.metrics.registry
        assert metrics.get_sample_value("callspeak_calls_refused_total", {"reason": "full"}) == 1

        reports = await asyncio.gather(*talking)
        for text, report in zip(texts, reports, strict=True):
            assert report.gaps() == [], report.timeline()
            assert report.played.rstrip(b"\xff") == spoken(text).rstrip(b"\xff")
            assert report.ended_by == "caller"

        await until(lambda: server.state.calls.connections == 0)
        again = await dial(
            DialOptions(
                url=server.ws_url, parameters={"say": "Now there is room."}, quiet_seconds=0.2
            )
        )
        assert again.played.rstrip(b"\xff") == spoken("Now there is room.").rstrip(b"\xff")


async def test_a_stream_with_no_inbound_message_for_idle_timeout_is_closed(serve: Serve) -> None:
    app = create_app(local(idle_timeout=0.5), tts=FakeService())
    async with serve(app) as url:
        server = RunningServer(url, app)
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(Connected("Call", "1.0.0").to_json())
            await ws.send(start_message())
            sent_last = time.monotonic()
            await read_until_closed(ws, 3)  # the greeting; then nothing from us
            closed_after = time.monotonic() - sent_last
        assert ws.close_code == 1000 and ws.close_reason == "idle timeout"
        assert 0.45 <= closed_after < 1.5
        await until(lambda: server.state.calls.connections == 0)


async def test_message_size_soft_limit_ignores_and_hard_limit_closes(serve: Serve) -> None:
    settings = local(max_message_bytes=1024)
    app = create_app(settings, tts=FakeService())
    async with serve(app) as url:
        server = RunningServer(url, app)
        async with websockets.connect(server.ws_url, max_size=None) as ws:
            await ws.send(Connected("Call", "1.0.0").to_json())
            await ws.send(start_message())
            session = await asyncio.wait_for(server.state.calls.wait_for(), 5)
            await ws.send("x" * 4096)  # over the soft limit: logged and ignored
            await until(lambda: session.rejected == 1)
            await ws.send("x" * (2 * 1024 * 1024))  # over uvicorn's 1 MiB cap: closed
            await read_until_closed(ws)
        assert ws.close_code == 1009


async def test_text_over_max_text_chars_is_not_spoken_and_the_call_stays_open(
    serve: Serve,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(local(max_text_chars=60), tts=FakeService())
    async with serve(app) as url:
        server = RunningServer(url, app)
        report = await dial(
            DialOptions(url=server.ws_url, parameters={"say": "Far too long. " * 5}, duration=0.4)
        )
        assert report.first_audio_at is None and report.ended_by == "caller"
        assert "not speaking the opening text" in caplog.text
        assert "70 characters is over the 60-character limit" in caplog.text
        short = await dial(
            DialOptions(url=server.ws_url, parameters={"say": "Short enough."}, quiet_seconds=0.2)
        )
        assert short.seconds_heard > 0


# -- request bodies that stop arriving -------------------------------------------------------------


async def half_sent(base_url: str, path: str, content_type: str) -> bytes:
    """POST to ``path`` announcing 100 bytes of body, send 10, then nothing: what the server
    answers before it closes the connection (5 s at most)."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        "Content-Length: 100\r\n\r\n"
    )
    writer.write(head.encode() + b"CallSid=CA")
    try:
        async with asyncio.timeout(5):
            return await reader.read()  # until the server closes
    finally:
        writer.close()


@pytest.mark.parametrize("path", ["/voice", "/status"])
async def test_a_webhook_whose_body_stops_arriving_gets_408(
    path: str, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else the request stays open for good, and with it the server's shutdown."""
    monkeypatch.setattr("callspeak.api.BODY_SECONDS", 0.2)
    app = create_app(local(), tts=FakeService())
    async with serve(app) as url:
        answer = await half_sent(url, path, "application/x-www-form-urlencoded")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b"request body not received within 0.2 s")


async def test_a_webhook_body_over_64_kib_gets_413(serve: Serve) -> None:
    import httpx

    app = create_app(local(), tts=FakeService())
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        huge = await client.post("/voice", data={"CallSid": "CA" + "0" * 32, "x": "y" * 70_000})
        fine = await client.post("/voice", data={"CallSid": "CA" + "0" * 32})
    assert huge.status_code == 413 and huge.text == "request body too large"
    assert fine.status_code == 200


async def test_a_webhook_body_that_is_not_a_form_gets_415(serve: Serve) -> None:
    import httpx

    app = create_app(local(), tts=FakeService())
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        sent_json = await client.post("/voice", json={"CallSid": "CA" + "0" * 32})
    assert sent_json.status_code == 415
    assert sent_json.text == "expected application/x-www-form-urlencoded"


async def test_the_active_calls_gauge_counts_a_call_while_it_lasts(serve: Serve) -> None:
    app = create_app(local(), tts=FakeService())
    registry = app.state.callspeak.metrics.registry

    def active() -> float | None:
        return registry.get_sample_value("callspeak_calls_active")

    async with serve(app) as url:
        server = RunningServer(url, app)
        call = asyncio.create_task(
            dial(DialOptions(url=server.ws_url, parameters={"say": "Hi."}, duration=1.0))
        )
        await until(lambda: active() == 1)
        await asyncio.wait_for(call, 10)
        await until(lambda: server.state.calls.connections == 0)
    assert active() == 0


async def test_an_api_request_whose_body_stops_arriving_gets_408(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("callspeak.api.BODY_SECONDS", 0.2)
    app = create_app(local(), tts=FakeService())
    async with serve(app) as url:
        server = RunningServer(url, app)
        call = asyncio.create_task(dial(DialOptions(url=server.ws_url, duration=2.0)))
        sid = (await asyncio.wait_for(server.state.calls.wait_for(), 5)).call_sid
        answer = await half_sent(url, f"/calls/{sid}/say", "application/json")
        await call
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"body_timeout"' in answer


async def test_a_request_stalled_mid_body_does_not_hold_the_server_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``callspeak serve``'s options bound the wait for requests still open at SIGTERM."""
    import uvicorn

    from callspeak.cli import uvicorn_options
    from tests.test_cli import free_port

    monkeypatch.setattr("callspeak.cli.GRACEFUL_SHUTDOWN_SECONDS", 0.3)
    monkeypatch.setattr("callspeak.api.BODY_SECONDS", 60.0)  # the other bound, out of the way
    settings = local(port=free_port())
    app = create_app(settings, tts=FakeService())
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings, app)))
    serving = asyncio.create_task(server.serve())
    await until(lambda: server.started)
    stalled = asyncio.create_task(
        half_sent(
            f"http://127.0.0.1:{settings.port}", "/voice", "application/x-www-form-urlencoded"
        )
    )
    await asyncio.sleep(0.2)  # the request is in, its body stalled
    server.should_exit = True  # what SIGTERM does
    await asyncio.wait_for(serving, 5)  # (waited for that body for good)
    await asyncio.wait_for(stalled, 5)


# -- request heads that never complete -------------------------------------------------------------


async def answer_to(
    base_url: str, sent: list[bytes], gap: float = 0.0
) -> tuple[bytes | None, float]:
    """Open a connection to the server, send the pieces of ``sent`` ``gap`` s apart, and read:
    what the server answered before it closed the connection (None if it reset it: closed with
    bytes of ours unread), and after how long."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    opened = time.monotonic()

    async def trickle() -> None:
        for piece in sent:
            writer.write(piece)
            await asyncio.sleep(gap)

    sender = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(5):
            try:
                answer: bytes | None = await reader.read()  # until the server closes
            except ConnectionResetError:
                answer = None
            return answer, time.monotonic() - opened
    finally:
        sender.cancel()
        writer.close()


async def head_answer(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, sent: list[bytes], gap: float = 0.0
) -> tuple[bytes | None, float]:
    """:func:`answer_to` a server whose connections have 0.3 s to send a request head."""
    monkeypatch.setattr("callspeak.request_head.HEAD_SECONDS", 0.3)
    app = create_app(local(), tts=FakeService())
    async with serve(app) as url:
        return await answer_to(url, sent, gap)


async def test_a_connection_that_sends_nothing_is_closed_silently(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else each holds a descriptor for good (uvicorn bounds only idle kept-alive connections)."""
    answer, seconds = await head_answer(serve, monkeypatch, [])
    assert answer == b""
    assert 0.25 < seconds < 2


async def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slowloris: bytes keep coming, but the head is never done in time."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    answer, seconds = await head_answer(serve, monkeypatch, [bytes([b]) for b in head], 0.02)
    # Closed while our bytes kept arriving, the connection may be reset before the 408 is read.
    assert answer is None or answer.startswith(b"HTTP/1.1 408 ")
    assert 0.25 < seconds < 2


async def test_a_request_head_left_unfinished_gets_408(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer, seconds = await head_answer(serve, monkeypatch, [b"GET /healthz HTTP/1.1\r\nHo"])
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b"request head not received within 0.3 s")
    assert 0.25 < seconds < 2


async def test_the_next_request_on_a_kept_connection_has_the_same_deadline(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    sent = [first, b"GET /healthz HTTP/1.1\r\nHo"]
    answer, _ = await head_answer(serve, monkeypatch, sent, 0.1)
    assert answer is not None
    first_answer, _, rest = answer.partition(b"HTTP/1.1 408 ")
    assert first_answer.startswith(b"HTTP/1.1 200 ")  # the first request was answered
    assert rest.endswith(b"request head not received within 0.3 s")


async def kept_connection_answers(
    url: str, first: bytes, idle: float, second: bytes
) -> tuple[bytes, bytes, float]:
    """Send ``first`` on a new connection and read its answer, stay idle ``idle`` s, send
    ``second`` on the same connection, and read until the server closes it: the two answers,
    and how long the close took after ``second`` was sent."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(first)
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 5)  # (the JSON body's end)
        await asyncio.sleep(idle)
        writer.write(second)
        sent = time.monotonic()
        try:
            rest = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        except ConnectionResetError:
            rest = b"(reset)"
        return answer, rest, time.monotonic() - sent
    finally:
        writer.close()


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_a_kept_connection_idle_past_the_head_deadline_serves_its_next_request(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle between requests is the keep-alive's to bound, not the head deadline's: a client's
    pooled connection reused after a pause must not be closed as the request goes out (a
    ``POST /say`` lost so is not sent again). The next head still has its own deadline."""
    monkeypatch.setattr("callspeak.request_head.HEAD_SECONDS", 0.3)
    app = create_app(local(), tts=FakeService())
    async with serve(app) as url:
        first, rest, _ = await kept_connection_answers(
            url, HEALTH, 0.8, HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        )
        assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 200 ")
        _, rest, seconds = await kept_connection_answers(url, HEALTH, 0.8, b"GET /healthz HT")
    assert rest.startswith(b"HTTP/1.1 408 ") and 0.25 < seconds < 2


async def test_blank_lines_between_requests_do_not_hold_a_kept_connection_open(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any byte stops uvicorn's keep-alive timer; a CRLF begins no request head (the parser
    skips it), so neither deadline would run and the descriptor would be held for good."""
    monkeypatch.setattr("callspeak.request_head.HEAD_SECONDS", 0.3)
    app = create_app(local(), tts=FakeService())
    async with serve(app) as url:
        first, rest, seconds = await kept_connection_answers(url, HEALTH, 0.1, b"\r\n")
    assert first.startswith(b"HTTP/1.1 200 ") and rest == b"" and 0.25 < seconds < 2


async def test_a_head_pipelined_behind_a_slow_answer_does_not_cut_that_answer_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that pipelines: the next head's time starts when the answer before it ends,
    not while that answer is still being made (a POST /say's answer would be lost)."""
    from callspeak.request_head import BoundedHeadProtocol

    async def slow(scope: dict[str, object], receive: object, send: Any) -> None:
        if scope["type"] != "http":
            return
        await asyncio.sleep(0.6)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    monkeypatch.setattr("callspeak.request_head.HEAD_SECONDS", 0.3)
    async with serve_asgi(slow, http=BoundedHeadProtocol) as url:
        answer, seconds = await answer_to(url, [HEALTH + b"GET /x HTT"])
    assert answer is not None and answer.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 408 " in answer and 0.85 < seconds < 3  # 0.6 s answer, then 0.3 s


async def test_an_idle_kept_connection_is_closed_after_the_keep_alive(serve: Serve) -> None:
    app = create_app(local(), tts=FakeService())
    async with serve(app, timeout_keep_alive=0.3) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(HEALTH)
        began = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 5)  # the answer, then the close
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and 0.25 < time.monotonic() - began < 2


def test_the_server_keeps_idle_connections_longer_than_http_clients_pool_them() -> None:
    """httpx reuses an idle connection for 5 s, aiohttp for 15 s: uvicorn's own 5 s met
    httpx's in the soak, and a request sent as the server closed the connection failed."""
    import httpx

    from callspeak.cli import uvicorn_options

    app = create_app(local(), tts=FakeService())
    keep_alive = uvicorn_options(local(), app)["timeout_keep_alive"]
    assert keep_alive > max(httpx.Limits().keepalive_expiry or 0, 15.0)


async def test_requests_and_calls_outlasting_the_head_deadline_are_untouched(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline ends with the head: a kept connection's requests, and a call's stream."""
    import httpx

    monkeypatch.setattr("callspeak.request_head.HEAD_SECONDS", 0.3)
    app = create_app(local(), tts=FakeService())
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        server = RunningServer(url, app)
        call = await dial(
            DialOptions(url=server.ws_url, parameters={"say": "Hello there."}, duration=1.0)
        )
        answers = []
        for _ in range(3):  # one kept connection, asked again after more than the deadline
            answers.append((await client.get("/healthz")).status_code)
            await asyncio.sleep(0.2)
    assert call.ended_by == "caller" and call.seconds_heard > 0
    assert answers == [200, 200, 200]


async def test_time_to_first_audio_is_counted_from_each_utterances_turn() -> None:
    """Speech queued behind other speech waited by design, and that wait was counted as the
    voice's latency: a p99 alert fired whenever calls queued speech."""
    from callspeak.hooks import Call, CallHooks

    hooks = CallHooks()

    @hooks.on_start
    async def two_at_once(call: Call) -> None:
        await call.say(" ".join(["This greeting takes a while to say."] * 3))  # about 1 s
        await call.say("And then this.")

    app = create_app(local(greeting="", max_lead_ms=100), tts=FakeService(), hooks=hooks)
    async with serve_app(app) as url:
        server = RunningServer(url, app)
        report = await dial(DialOptions(url=server.ws_url, quiet_seconds=0.3))
    assert report.seconds_heard > 1.0
    registry = app.state.callspeak.metrics.registry
    assert registry.get_sample_value("callspeak_first_audio_seconds_count") == 2
    # Before: the second utterance's sample held its ~1 s in the queue.
    assert registry.get_sample_value("callspeak_first_audio_seconds_sum") < 0.3


async def test_a_stream_ending_does_not_unregister_a_newer_one_of_the_same_call() -> None:
    """Twilio may open a new stream for a call (a reconnect, a second ``<Connect>``) while the
    old one's session is still ending: the old one leaving must not make the live one
    unreachable by its callSid (the control API's /calls/{callSid})."""
    registry = CallRegistry()
    old = cast(CallSession, SimpleNamespace(call_sid="CA1"))
    new = cast(CallSession, SimpleNamespace(call_sid="CA1"))
    await registry.add(old)
    await registry.add(new)
    registry.discard(old)
    assert registry.get("CA1") is new and len(registry) == 1
    registry.discard(new)
    assert registry.get("CA1") is None and len(registry) == 0


async def test_a_request_head_over_64_kib_is_refused_with_431(serve: Serve) -> None:
    """httptools bounds neither a head's size nor its reads (h11's default is 16 KiB), and a
    header value grown across reads was copied whole at each: one client sending an endless
    header held the loop that paces every call's audio, and memory, for as long as it liked."""
    head = [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", *[b"a" * 16384] * 16]
    async with serve(create_app(local(), tts=FakeService())) as url:
        answer, seconds = await answer_to(url, head, 0.02)
    # Closed while our bytes kept arriving, the connection may be reset before the 431 is read.
    assert answer is None or answer.startswith(b"HTTP/1.1 431 ")
    assert seconds < 2  # (without a bound: no answer until the test's 5 s timeout)
