"""Twilio signatures on /voice, /status and the /twilio upgrade; per-call tokens. Real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from callspeak.call_tokens import TOKEN_PARAMETER
from callspeak.config import ConfigError, Settings
from callspeak.emulator import DialOptions, dial
from callspeak.protocol import AccountSid, CallSid, Connected, MediaFormat, Start, StreamSid
from callspeak.server import create_app
from callspeak.signatures import sign
from tests.conftest import RunningServer, Serve
from tests.fakes import FakeService, spoken

TOKEN = "auth-token-for-tests"
PUBLIC = "https://calls.example.com"
STREAM_URL = "wss://calls.example.com/twilio"
VOICE_FORM = {"CallSid": "CA" + "1" * 32, "From": "+15551230000", "To": "+15559870000"}


@pytest.fixture
async def secure_server(serve: Serve) -> AsyncIterator[RunningServer]:
    settings = Settings(twilio_auth_token=TOKEN, public_url=PUBLIC, call_token=False)
    app = create_app(settings, tts=FakeService())
    async with serve(app) as url:
        yield RunningServer(url, app)


def sample(server: RunningServer, name: str, **labels: str) -> float:
    value = server.state.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


async def post_form(
    server: RunningServer, path: str, form: Mapping[str, str], signature: str | None
) -> httpx.Response:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        return await client.post(path, content=urlencode(form), headers=headers)


# -- start-up -------------------------------------------------------------------------------


def test_an_app_that_cannot_check_signatures_is_not_built() -> None:
    with pytest.raises(ConfigError, match="set TWILIO_AUTH_TOKEN, or pass --no-validate"):
        create_app(Settings(public_url=PUBLIC), tts=FakeService())
    with pytest.raises(ConfigError, match="CALLSPEAK_PUBLIC_URL"):
        create_app(Settings(twilio_auth_token=TOKEN), tts=FakeService())


# -- /voice -----------------------------------------------------------------------------------


async def test_voice_with_a_valid_signature_gets_twiml_built_from_the_public_url(
    secure_server: RunningServer,
) -> None:
    signature = sign(TOKEN, PUBLIC + "/voice", VOICE_FORM)
    response = await post_form(secure_server, "/voice", VOICE_FORM, signature)
    assert response.status_code == 200, response.text
    stream = ET.fromstring(response.text).find("Connect/Stream")
    assert stream is not None
    assert stream.get("url") == STREAM_URL  # not the loopback Host the request came to
    assert stream.get("statusCallback") == PUBLIC + "/status"
    assert stream.findall("Parameter") == []  # call_token is off


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(None, id="missing"),
        pytest.param(sign("another-token", PUBLIC + "/voice", VOICE_FORM), id="wrong-token"),
        pytest.param(sign(TOKEN, "wss://calls.example.com/voice", VOICE_FORM), id="wss-scheme"),
        pytest.param(sign(TOKEN, "http://127.0.0.1/voice", VOICE_FORM), id="request-url"),
        pytest.param(sign(TOKEN, PUBLIC + "/voice", {}), id="without-params"),
    ],
)
async def test_voice_without_a_valid_signature_is_refused_logged_and_counted(
    secure_server: RunningServer, signature: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "callspeak.server")
    response = await post_form(secure_server, "/voice", VOICE_FORM, signature)
    assert response.status_code == 403
    assert "Stream" not in response.text
    assert sample(secure_server, "callspeak_signature_refusals_total", path="/voice") == 1
    reason = "missing X-Twilio-Signature" if signature is None else "does not match"
    assert "refused POST /voice from 127.0.0.1" in caplog.text and reason in caplog.text


async def test_voice_signed_over_a_query_string_is_checked_with_it(
    secure_server: RunningServer,
) -> None:
    signature = sign(TOKEN, PUBLIC + "/voice?tenant=a", VOICE_FORM)
    assert (await post_form(secure_server, "/voice?tenant=a", VOICE_FORM, signature)).is_success
    assert (
        await post_form(secure_server, "/voice?tenant=b", VOICE_FORM, signature)
    ).status_code == 403


@pytest.mark.parametrize("path", ["/voice/", "/status/"])
async def test_a_webhook_path_with_a_trailing_slash_is_not_redirected(
    secure_server: RunningServer, path: str
) -> None:
    """Starlette redirected it to a URL built from the Host header (http://, the internal
    port), which no signature matches: now it is plainly not found."""
    signature = sign(TOKEN, PUBLIC + path, VOICE_FORM)
    response = await post_form(secure_server, path, VOICE_FORM, signature)
    assert response.status_code == 404
    assert "location" not in response.headers


async def test_call_tokens_without_signature_validation_are_warned_about(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """/voice then hands a token to any request: they protect nothing."""
    caplog.set_level(logging.WARNING, "callspeak.server")
    app = create_app(Settings(validate_signatures=False, call_token=True), tts=FakeService())
    async with serve(app):
        pass
    assert "call tokens protect nothing with signature validation off" in caplog.text


async def test_a_public_server_without_an_api_token_is_warned_about(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A reverse proxy on the same machine that names its upstream (nginx's default Host,
    127.0.0.1:port) looks like a local client, which the API serves without a token."""
    caplog.set_level(logging.WARNING, "callspeak.server")
    warning = "the control API has no token (CALLSPEAK_API_TOKEN)"
    async with serve(
        create_app(Settings(twilio_auth_token=TOKEN, public_url=PUBLIC), tts=FakeService())
    ):
        pass
    assert warning in caplog.text and PUBLIC in caplog.text
    caplog.clear()
    with_token = Settings(twilio_auth_token=TOKEN, public_url=PUBLIC, api_token="t0ken")
    async with serve(create_app(with_token, tts=FakeService())):
        pass
    async with serve(create_app(Settings(validate_signatures=False), tts=FakeService())):
        pass  # (no public URL: reached on this machine, or through a tunnel naming its host)
    assert warning not in caplog.text


async def test_refused_requests_are_all_counted_but_their_lines_are_rationed(
    secure_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can send unsigned requests: each wrote a warning, so one peer could flood the
    log and push real calls' lines out of the writer's queue."""
    caplog.set_level(logging.WARNING, "callspeak.server")
    for _ in range(30):
        assert (await post_form(secure_server, "/status", VOICE_FORM, None)).status_code == 403
    assert sample(secure_server, "callspeak_signature_refusals_total", path="/status") == 30
    lines = [r for r in caplog.records if "refused POST /status" in r.getMessage()]
    assert len(lines) == 10


# -- /status ----------------------------------------------------------------------------------


async def test_status_callbacks_are_signature_checked_and_logged(
    secure_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "callspeak.server")
    call = {"CallSid": "CA" + "2" * 32, "CallStatus": "ringing"}
    busy = {"CallSid": "CA" + "4" * 32, "CallStatus": "busy"}
    error = {
        "CallSid": "CA" + "2" * 32,
        "StreamSid": "MZ" + "3" * 32,
        "StreamEvent": "stream-error",
        "StreamError": "Stream - WebSocket - Handshake Error",
    }
    for form in (call, busy, error):
        signed = sign(TOKEN, PUBLIC + "/status", form)
        assert (await post_form(secure_server, "/status", form, signed)).status_code == 204
    assert (await post_form(secure_server, "/status", call, None)).status_code == 403
    assert sample(secure_server, "callspeak_signature_refusals_total", path="/status") == 1
    records = [r for r in caplog.records if r.name == "callspeak.server"]
    ringing = next(r for r in records if "call status: ringing" in r.getMessage())
    assert ringing.levelno == logging.INFO and ringing.call_sid == call["CallSid"]  # type: ignore[attr-defined]
    not_reached = next(r for r in records if "call status: busy" in r.getMessage())
    assert not_reached.levelno == logging.WARNING  # a call that never connected stands out
    failed = next(r for r in records if "stream error" in r.getMessage())
    assert failed.levelno == logging.WARNING and "Handshake Error" in failed.getMessage()
    assert failed.stream_sid == error["StreamSid"]  # type: ignore[attr-defined]


# -- the /twilio upgrade ------------------------------------------------------------------------


async def test_the_emulator_signs_its_upgrade_and_a_valid_signature_is_accepted(
    secure_server: RunningServer,
) -> None:
    options = DialOptions(
        url=secure_server.ws_url,
        parameters={"say": "Signed and heard."},
        sign_with=TOKEN,
        signed_url=STREAM_URL,
        quiet_seconds=0.2,
    )
    report = await dial(options)
    assert report.played.rstrip(b"\xff") == spoken("Signed and heard.").rstrip(b"\xff")
    assert sample(secure_server, "callspeak_calls_refused_total", reason="signature") == 0


def test_the_emulator_signs_the_wss_form_of_the_dial_url_by_default() -> None:
    options = DialOptions(url="ws://calls.example.com/twilio", sign_with=TOKEN)
    assert options.upgrade_headers()["X-Twilio-Signature"] == sign(TOKEN, STREAM_URL, {})
    assert "X-Twilio-Signature" not in DialOptions(url="ws://x/twilio").upgrade_headers()


@pytest.mark.parametrize(
    "how",
    [
        pytest.param({}, id="missing"),
        pytest.param({"sign_with": "another-token", "signed_url": STREAM_URL}, id="wrong-token"),
        pytest.param(
            {"sign_with": TOKEN, "signed_url": "https://calls.example.com/twilio"}, id="https"
        ),
        pytest.param({"sign_with": TOKEN}, id="loopback-url"),
    ],
)
async def test_an_upgrade_without_a_valid_signature_gets_403_before_accept(
    secure_server: RunningServer, how: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "callspeak.server")
    with pytest.raises(InvalidStatus) as refused:
        await dial(DialOptions(url=secure_server.ws_url, **how))
    assert refused.value.response.status_code == 403
    assert refused.value.response.body == b"invalid Twilio signature"
    assert sample(secure_server, "callspeak_calls_refused_total", reason="signature") == 1
    assert sample(secure_server, "callspeak_signature_refusals_total", path="/twilio") == 1
    assert "refused media stream from 127.0.0.1" in caplog.text
    assert secure_server.state.calls.connections == 0


# -- per-call tokens ----------------------------------------------------------------------------


def start_with(params: dict[str, str]) -> str:
    return Start(
        1,
        StreamSid("MZtok"),
        AccountSid("ACtok"),
        CallSid("CAtok"),
        ("inbound",),
        params,
        MediaFormat("audio/x-mulaw", 8000, 1),
    ).to_json()


async def test_call_tokens_from_voice_admit_one_stream_each(serve: Serve) -> None:
    app = create_app(
        Settings(twilio_auth_token=TOKEN, public_url=PUBLIC, call_token=True), tts=FakeService()
    )
    async with serve(app) as url:
        server = RunningServer(url, app)
        twiml = (
            await post_form(
                server, "/voice", VOICE_FORM, sign(TOKEN, PUBLIC + "/voice", VOICE_FORM)
            )
        ).text
        parameters = ET.fromstring(twiml).findall("Connect/Stream/Parameter")
        assert [p.get("name") for p in parameters] == [TOKEN_PARAMETER]
        token = parameters[0].get("value") or ""
        assert len(token) >= 40
        signed = {"sign_with": TOKEN, "signed_url": STREAM_URL, "quiet_seconds": 0.2}
        first = await dial(
            DialOptions(url=server.ws_url, parameters={TOKEN_PARAMETER: token}, **signed)
        )
        assert first.seconds_heard > 0
        # The same token again, and no token at all: closed with 1008 at start, nothing spoken.
        for params in ({TOKEN_PARAMETER: token}, {}):
            headers = DialOptions(url=server.ws_url, **signed).upgrade_headers()
            async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
                await ws.send(Connected("Call", "1.0.0").to_json())
                await ws.send(start_with(params))
                with pytest.raises(ConnectionClosed):
                    async with asyncio.timeout(5):
                        while True:
                            assert json.loads(await ws.recv())["event"] != "media"
                assert ws.close_code == 1008
                assert ws.close_reason == f"missing, unknown, expired or reused {TOKEN_PARAMETER}"
        assert sample(server, "callspeak_calls_refused_total", reason="token") == 2
        assert sample(server, "callspeak_calls_started_total") == 1
        # The emulator says why the server ended the call, as `callspeak dial` prints it.
        refused = await dial(DialOptions(url=server.ws_url, **signed))
        assert refused.ended_by == "server" and refused.close_code == 1008
        assert refused.timeline().endswith(
            f"ended by server (close 1008 'missing, unknown, expired or reused {TOKEN_PARAMETER}')"
        )
        assert first.close_code == 1000 and "(close" not in first.timeline()


async def bad_handshake(base_url: str) -> bytes:
    """An upgrade to /twilio without Sec-WebSocket-Key: what the server answers."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /twilio HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_each_server_rations_its_own_lines_about_bad_handshakes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ration was one for the whole process: a flood at one server silenced another's."""
    from tests.conftest import serve_app

    caplog.set_level(logging.WARNING, "callspeak.server")
    first = create_app(Settings(validate_signatures=False), tts=FakeService())
    second = create_app(Settings(validate_signatures=False), tts=FakeService())
    async with serve_app(first) as one, serve_app(second) as two:
        for _ in range(12):
            assert (await bad_handshake(one)).startswith(b"HTTP/1.1 400")
        caplog.clear()
        assert (await bad_handshake(two)).startswith(b"HTTP/1.1 400")
    assert "bad WebSocket handshake" in caplog.text


async def test_voice_answers_400_not_500_to_a_host_it_cannot_build_a_stream_url_from(
    serve: Serve,
) -> None:
    """With no public URL (signature checks off) /voice guesses the stream URL from Host; a
    Host that makes no URL is the client's error: it was a 500 and an error-level line."""
    async with serve(create_app(Settings(validate_signatures=False), tts=FakeService())) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post("/voice", headers={"host": "h.example?x"})
            assert response.status_code == 400, response.text
            assert "CALLSPEAK_PUBLIC_URL" in response.text
            assert (await client.post("/voice", headers={"host": "h.example"})).status_code == 200
