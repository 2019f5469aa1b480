"""The command line: twiml, call and end-call against a fake Twilio REST server, serve's start-up
checks, dial's signing, and serving wss:// with a self-signed certificate."""

from __future__ import annotations

import asyncio
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from callspeak.cli import _build_parser, _rest_client, _settings_from, main, uvicorn_options
from callspeak.config import ConfigError, Settings
from callspeak.emulator import DialOptions, dial
from callspeak.server import create_app
from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_twilio_rest import FakeTwilioRest
from tests.conftest import serve_app
from tests.fakes import FakeService, spoken

ACCOUNT = "AC" + "a" * 32
TOKEN = "rest-auth-token"
PUBLIC = "https://calls.example.com"


def stream_of(twiml: str) -> ET.Element:
    stream = ET.fromstring(twiml).find("Connect/Stream")
    assert stream is not None, twiml
    return stream


def parameters_of(stream: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


# -- twiml --------------------------------------------------------------------------------------


def test_twiml_prints_a_connect_stream_for_a_twiml_bin(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["twiml", "--url", "wss://calls.example.com/twilio", "--say", "Hi & bye", "--param", "k=v"]
    )
    out = capsys.readouterr().out
    assert code == 0
    stream = stream_of(out)
    assert stream.get("url") == "wss://calls.example.com/twilio"
    assert parameters_of(stream) == {"k": "v", "say": "Hi & bye"}
    assert stream.get("statusCallback") is None  # no public URL to point it at


def test_twiml_takes_the_stream_url_from_the_public_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CALLSPEAK_PUBLIC_URL", PUBLIC)
    assert main(["twiml", "--notice", "Connecting you."]) == 0
    out = capsys.readouterr().out
    assert "<Say>Connecting you.</Say>" in out
    stream = stream_of(out)
    assert stream.get("url") == "wss://calls.example.com/twilio"
    assert stream.get("statusCallback") == PUBLIC + "/status"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["twiml"], "give --url wss://HOST/twilio, or set CALLSPEAK_PUBLIC_URL"),
        (["twiml", "--url", "ws://127.0.0.1:5000/twilio"], "must start with wss://"),
        (["twiml", "--url", "wss://h/twilio", "--say", "x" * 600], "Twilio allows fewer than 500"),
    ],
)
def test_twiml_refuses_what_twilio_would_refuse(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# -- call / end-call ------------------------------------------------------------------------------


@pytest.fixture
async def fake_twilio(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeTwilioRest]:
    fake = FakeTwilioRest(ACCOUNT, TOKEN)
    async with serve_asgi(fake.app) as url:
        monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT)
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
        monkeypatch.setenv("CALLSPEAK_TWILIO_API_URL", url)
        monkeypatch.setenv("CALLSPEAK_PUBLIC_URL", PUBLIC)
        yield fake


async def test_call_places_a_call_with_the_stream_twiml_and_end_call_ends_it(
    fake_twilio: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    text = 'Your table for 2 is ready. Say "yes" to confirm.'
    argv = ["call", "--to", "+15559870000", "--from", "+15551230000", "--say", text]
    assert await asyncio.to_thread(main, argv) == 0
    [call] = fake_twilio.calls
    call_sid = capsys.readouterr().out.strip()
    assert call_sid == call.call_sid and call_sid.startswith("CA")
    assert call.fields["To"] == "+15559870000" and call.fields["From"] == "+15551230000"
    assert call.fields["StatusCallback"] == PUBLIC + "/status"
    assert call.field_lists["StatusCallbackEvent"] == [
        "initiated",
        "ringing",
        "answered",
        "completed",
    ]
    assert "Url" not in call.fields
    stream = stream_of(call.fields["Twiml"])
    assert stream.get("url") == "wss://calls.example.com/twilio"
    assert stream.get("statusCallback") == PUBLIC + "/status"
    assert parameters_of(stream) == {"say": text}

    assert await asyncio.to_thread(main, ["end-call", call_sid]) == 0
    [update] = fake_twilio.updates
    assert update.call_sid == call_sid and update.fields == {"Status": "completed"}
    assert fake_twilio.status_of(call_sid) == "completed"


async def test_call_refuses_text_over_max_text_chars_before_calling_twilio(
    fake_twilio: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CALLSPEAK_MAX_TEXT_CHARS", "20")
    argv = ["call", "--to", "+15559870000", "--from", "+15551230000", "--say", "x" * 21]
    assert await asyncio.to_thread(main, argv) == 2
    assert "over max_text_chars=20" in capsys.readouterr().err
    assert fake_twilio.calls == []


async def test_call_reports_twilio_refusals_and_missing_credentials(
    fake_twilio: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "not-the-token")
    argv = ["call", "--to", "+15559870000", "--from", "+15551230000", "--say", "Hi."]
    assert await asyncio.to_thread(main, argv) == 1
    assert "Twilio error 20003" in capsys.readouterr().err
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    assert await asyncio.to_thread(main, argv) == 2
    assert "set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "--to", "+15559870000", "--from", "+15551230000", "--url", "wss://h/twilio"],
        ["end-call", "CA" + "0" * 32],
    ],
)
def test_call_and_end_call_refuse_a_twilio_api_url_without_a_scheme_in_one_line(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("CALLSPEAK_TWILIO_API_URL", "api.twilio.com")
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(
        "callspeak: invalid setting: twilio_api_url (CALLSPEAK_TWILIO_API_URL) 'api.twilio.com'"
        " is not an absolute http(s) URL with a host, e.g. https://api.twilio.com"
    )


def test_the_rest_client_turns_a_refused_base_url_into_a_config_error() -> None:
    # Settings refuses such URLs first; should the two checks ever differ, still no traceback.
    settings = Settings.model_construct(
        twilio_account_sid=ACCOUNT, twilio_auth_token=SecretStr(TOKEN), twilio_api_url="h:1"
    )
    with pytest.raises(ConfigError, match=r"api_base_url 'h:1' .* \(CALLSPEAK_TWILIO_API_URL\)"):
        _rest_client(settings)


async def test_call_and_end_call_report_a_page_that_is_not_twilio_json_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    async def portal(request: object) -> HTMLResponse:
        return HTMLResponse("<html><title>Sign in to Hotel Wi-Fi</title></html>")

    app = Starlette(routes=[Route("/{path:path}", portal, methods=["POST"])])
    async with serve_asgi(app) as url:
        monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT)
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
        monkeypatch.setenv("CALLSPEAK_TWILIO_API_URL", url)
        call = ["call", "--to", "+15559870000", "--from", "+15551230000", "--url", "wss://h/twilio"]
        calls = f"{url}/2010-04-01/Accounts/{ACCOUNT}/Calls"
        sid = "CA" + "0" * 32
        for argv, uri in [(call, f"{calls}.json"), (["end-call", sid], f"{calls}/{sid}.json")]:
            assert await asyncio.to_thread(main, argv) == 1
            out, err = capsys.readouterr()
            assert out == "" and err.count("\n") == 1
            assert err.startswith(
                f"callspeak: Twilio API HTTP 200: POST {uri} answered with something other than "
                "Twilio's JSON (the body starts '<html><title>Sign in to Hotel Wi-Fi</title>"
            )


# -- serve's start-up checks and flags -----------------------------------------------------------


def test_serve_refuses_to_start_without_what_signature_checks_need(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--log-level", "error"]) == 2
    err = capsys.readouterr().err
    assert "set TWILIO_AUTH_TOKEN, or pass --no-validate-signatures" in err
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "t")
    assert main(["serve", "--log-level", "error"]) == 2
    assert "set CALLSPEAK_PUBLIC_URL" in capsys.readouterr().err


def test_serve_flags_set_the_new_settings() -> None:
    args = _build_parser().parse_args(
        [
            "serve",
            "--no-validate-signatures",
            "--call-token",
            "--max-calls",
            "3",
            "--idle-timeout",
            "2.5",
            "--max-text-chars",
            "99",
            "--certfile",
            "c.pem",
            "--keyfile",
            "k.pem",
        ]
    )
    s = _settings_from(args)
    assert (s.validate_signatures, s.call_token, s.max_calls) == (False, True, 3)
    assert (s.idle_timeout, s.max_text_chars, s.certfile, s.keyfile) == (2.5, 99, "c.pem", "k.pem")
    assert _settings_from(_build_parser().parse_args(["serve"])).validate_signatures is True
    options = uvicorn_options(s, create_app(s, tts=FakeService()))
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == ("c.pem", "k.pem")


# -- dial --sign-with ---------------------------------------------------------------------------


async def test_dial_signs_its_upgrade_and_reports_a_refusal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = create_app(
        Settings(twilio_auth_token=TOKEN, public_url=PUBLIC, max_text_chars=200),
        tts=FakeService(),
    )
    async with serve_app(app) as url:
        ws_url = url.replace("http://", "ws://") + "/twilio"
        signed = ["--sign-with", TOKEN, "--signed-url", "wss://calls.example.com/twilio"]
        argv = ["dial", ws_url, *signed, "--param", "say=Hello.", "--quiet", "0.2"]
        assert await asyncio.to_thread(main, argv) == 0
        assert "summary: time to first audio" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["dial", ws_url, "--sign-with", TOKEN]) == 1
        err = capsys.readouterr().err
        assert "the server refused the call: HTTP 403 invalid Twilio signature" in err
        # A path with no media stream: refused with no body, and said so.
        assert await asyncio.to_thread(main, ["dial", ws_url.replace("/twilio", "/other")]) == 1
        err = capsys.readouterr().err
        assert "the server refused the call: HTTP 403 (no reason given)" in err


# -- TLS ------------------------------------------------------------------------------------------


async def test_a_wss_round_trip_with_a_self_signed_certificate(
    self_signed: tuple[Path, Path],
) -> None:
    cert, key = self_signed
    settings = Settings(validate_signatures=False, certfile=str(cert), keyfile=str(key))
    app = create_app(settings, tts=FakeService())
    options = uvicorn_options(settings, app)  # what `callspeak serve --certfile --keyfile` runs
    for name in ("host", "port"):
        options.pop(name)
    async with serve_asgi(app, **options) as url:
        assert url.startswith("https://")
        trusting = ssl.create_default_context(cafile=str(cert))
        text = "Heard over TLS."
        report = await dial(
            DialOptions(
                url=url.replace("https://", "wss://") + "/twilio",
                parameters={"say": text},
                ssl=trusting,
                quiet_seconds=0.2,
            )
        )
        assert report.played.rstrip(b"\xff") == spoken(text).rstrip(b"\xff")
        with pytest.raises(ssl.SSLCertVerificationError):  # a caller that does not trust it
            await dial(DialOptions(url=url.replace("https://", "wss://") + "/twilio"))
