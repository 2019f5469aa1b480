"""Settings added for Twilio security and limits: defaults, environment names, checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from callspeak.config import Settings, unknown_variables


def test_security_and_limit_defaults() -> None:
    s = Settings()
    assert s.validate_signatures is True
    assert s.twilio_auth_token is None and s.twilio_account_sid is None
    assert s.twilio_api_url == "https://api.twilio.com"
    assert (s.call_token, s.max_calls, s.idle_timeout, s.max_text_chars) == (False, 100, 30.0, 5000)
    assert s.max_message_bytes == 64 * 1024
    assert s.certfile is None and s.keyfile is None


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "TWILIO_ACCOUNT_SID": "AC123",
        "TWILIO_AUTH_TOKEN": "secret",
        "CALLSPEAK_TWILIO_API_URL": "http://127.0.0.1:9/",
        "CALLSPEAK_VALIDATE_SIGNATURES": "false",
        "CALLSPEAK_CALL_TOKEN": "true",
        "CALLSPEAK_MAX_CALLS": "7",
        "CALLSPEAK_IDLE_TIMEOUT": "2.5",
        "CALLSPEAK_MAX_TEXT_CHARS": "300",
        "CALLSPEAK_CERTFILE": "c.pem",
        "CALLSPEAK_KEYFILE": "k.pem",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.twilio_account_sid == "AC123"
    assert s.twilio_auth_token is not None and s.twilio_auth_token.get_secret_value() == "secret"
    assert "secret" not in repr(s)
    assert s.twilio_api_url == "http://127.0.0.1:9"
    assert (s.validate_signatures, s.call_token, s.max_calls) == (False, True, 7)
    assert (s.idle_timeout, s.max_text_chars) == (2.5, 300)
    assert (s.certfile, s.keyfile) == ("c.pem", "k.pem")


def test_signature_problem_fails_closed() -> None:
    no_token = Settings(public_url="https://calls.example.com").signature_problem()
    assert no_token is not None
    assert "TWILIO_AUTH_TOKEN" in no_token and "--no-validate-signatures" in no_token
    no_url = Settings(twilio_auth_token="t").signature_problem()
    assert no_url is not None and "CALLSPEAK_PUBLIC_URL" in no_url
    complete = Settings(twilio_auth_token="t", public_url="https://x.example")
    assert complete.signature_problem() is None
    assert Settings(validate_signatures=False).signature_problem() is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"certfile": "c.pem"}, "certfile and keyfile go together"),
        ({"keyfile": "k.pem"}, "certfile and keyfile go together"),
        ({"greeting": "x" * 11, "max_text_chars": 10}, "greeting is 11 characters"),
        ({"notice": "x" * 31, "max_text_chars": 30}, "notice is 31 characters"),
        ({"max_calls": 0}, "max_calls"),
        ({"idle_timeout": 0}, "idle_timeout"),
    ],
)
def test_inconsistent_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("public_url", "message"),
    [
        ("https://example.com:abc", "not a valid URL"),
        ("https://example.com:99999", "not a valid URL"),
        ("https://[::1", "not a valid URL"),
        ("https://example.com:0", "port 0"),
        ("https://", "names no host"),
        ("https://:8443/prefix", "names no host"),
        ("http://127.0.0.1:5000", "must start with https://"),
        ("example.ngrok.app", "must start with https://"),
        # urlsplit drops tabs and line breaks: the URL signed was not the one in the TwiML.
        ("https://calls.example.com\r", "spaces or control characters"),
        ("https://calls.example.com\t/cs", "spaces or control characters"),
        ("https://calls.example.com /cs", "spaces or control characters"),
        ("https://user:pw@calls.example.com", "user name or password"),
        # urlsplit reads "host:" as no port and "host:0443" as 443, but the URL is written into
        # TwiML as typed, while the signatures were checked against "host::443" / "host:443".
        ("https://calls.example.com:", "port written"),
        ("https://calls.example.com:/cs", "port written"),
        ("https://calls.example.com:0443", "port written"),
        ("https://[::1]:", "port written"),
    ],
)
def test_a_public_url_twilio_cannot_use_is_refused_up_front(public_url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(public_url=public_url)


def test_a_public_url_with_port_and_prefix_is_kept_without_its_trailing_slash() -> None:
    assert (
        Settings(public_url="https://h.example:8443/cs/").public_url == "https://h.example:8443/cs"
    )
    assert Settings(public_url="https://[::1]:8443").public_url == "https://[::1]:8443"


def test_api_token_is_stripped_and_a_blank_one_means_no_token() -> None:
    token = Settings(api_token=" abc \n").api_token
    assert token is not None and token.get_secret_value() == "abc"
    assert Settings(api_token=" \t ").api_token is None


@pytest.mark.parametrize(
    ("twilio_api_url", "message"),
    [
        ("api.twilio.com", "is not an absolute http.s. URL with a host"),
        ("ftp://api.twilio.com", "is not an absolute http.s. URL with a host"),
        ("https://", "names no host"),
        ("https://api.twilio.com:abc", "is not a valid URL"),
        ("https://[::1", "is not a valid URL"),
        ("https://api.twilio.com:0", "port 0"),
        ("https://api.twilio.com?x=1", "must not carry a query string or fragment"),
        ("https://api.twilio.com#top", "must not carry a query string or fragment"),
    ],
)
def test_a_twilio_api_url_the_rest_client_cannot_use_is_refused_up_front(
    twilio_api_url: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(twilio_api_url=twilio_api_url)


def test_a_regional_or_prefixed_twilio_api_url_is_kept_without_its_trailing_slash() -> None:
    regional = "https://api.dublin.ie1.twilio.com"
    assert Settings(twilio_api_url=regional + "/").twilio_api_url == regional
    assert Settings(twilio_api_url="http://127.0.0.1:9/fake/").twilio_api_url == (
        "http://127.0.0.1:9/fake"
    )


def test_secrets_read_from_files_lose_their_trailing_newline() -> None:
    """A Kubernetes or Docker secret made from a file ends in a newline: kept, no Twilio
    signature ever matched and every Deepgram request was refused."""
    settings = Settings(
        twilio_auth_token="0123abcd\n",
        deepgram_api_key=" dg-key\r\n",
        twilio_account_sid="AC123\n",
    )
    assert settings.twilio_auth_token is not None and settings.deepgram_api_key is not None
    assert settings.twilio_auth_token.get_secret_value() == "0123abcd"
    assert settings.deepgram_api_key.get_secret_value() == "dg-key"
    assert settings.twilio_account_sid == "AC123"
    blank = Settings(twilio_auth_token=" \n", deepgram_api_key="", twilio_account_sid=" ")
    assert blank.twilio_auth_token is None and blank.deepgram_api_key is None
    assert blank.twilio_account_sid is None
    assert blank.resolved_tts() == "piper"


def test_a_notice_twiml_cannot_carry_is_refused_at_start_up() -> None:
    """It is spoken by Twilio's <Say>: every /voice answer would have failed with a 500."""
    with pytest.raises(ValidationError, match="XML"):
        Settings(notice="Calls are\x0crecorded.")
    assert Settings(notice="Calls are\nrecorded.").notice == "Calls are\nrecorded."


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        # Accepted before, and every call then failed over to the fallback voice.
        ("deepgram_url", "api.deepgram.com", "deepgram_url 'api.deepgram.com' is not an absolute"),
        ("deepgram_url", "wss://api.deepgram.com", "not an absolute http.s. URL"),
        ("deepgram_url", "https://key:secret@api.deepgram.com", "user name or password"),
        ("deepgram_url", "https://api.deepgram.com ", "spaces or control characters"),
        ("deepgram_url", "https://api.deepgram.com:abc", "not a valid URL"),
        ("deepgram_url", "https://api.deepgram.com?x=1", "query string"),
        # A websockets InvalidURI traceback when the server started.
        ("deepgram_ws_url", "http://127.0.0.1:5711", "not an absolute ws.s. URL"),
        ("deepgram_ws_url", "api.deepgram.com", "not an absolute ws.s. URL"),
        ("deepgram_ws_url", "wss://", "names no host"),
        ("deepgram_ws_url", "wss://u:p@api.deepgram.com", "user name or password"),
        ("deepgram_ws_url", "wss://api.deepgram.com\n", "spaces or control characters"),
    ],
)
def test_a_deepgram_url_the_voice_cannot_use_is_refused_up_front(
    field: str, value: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_deepgram_urls_of_a_fake_or_proxy_are_kept_without_their_trailing_slash() -> None:
    s = Settings(deepgram_url="http://127.0.0.1:5711/", deepgram_ws_url="ws://127.0.0.1:5711/")
    assert (s.deepgram_url, s.deepgram_ws_url) == ("http://127.0.0.1:5711", "ws://127.0.0.1:5711")
    s = Settings(deepgram_url="https://dg.example/proxy", deepgram_ws_url="wss://[::1]:8443")
    assert (s.deepgram_url, s.deepgram_ws_url) == ("https://dg.example/proxy", "wss://[::1]:8443")


FLOAT_SETTINGS = [
    "piper_cache_mb",
    "deepgram_first_byte_timeout",
    "deepgram_stall_timeout",
    "deepgram_connect_timeout",
    "deepgram_auth_recheck",
    "idle_timeout",
]


def test_every_float_setting_is_listed_here() -> None:
    floats = [name for name, field in Settings.model_fields.items() if field.annotation is float]
    assert sorted(floats) == sorted(FLOAT_SETTINGS)


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_no_float_setting_takes_inf_or_nan(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CALLSPEAK_IDLE_TIMEOUT=inf was taken (streams never closed when idle); an infinite
    piper_cache_mb an OverflowError traceback."""
    monkeypatch.setenv(f"CALLSPEAK_{name.upper()}", value)
    with pytest.raises(ValidationError, match=f"{name}\n  Input should be a finite number"):
        Settings()


def test_a_piper_cache_too_large_to_count_in_bytes_is_refused() -> None:
    with pytest.raises(ValidationError, match="piper_cache_mb"):
        Settings(piper_cache_mb=1e308)
    assert Settings(piper_cache_mb=1024.5).piper_cache_mb == 1024.5


@pytest.mark.parametrize(
    ("level", "fmt"), [("INFO", "JSON"), ("Warning", "Text"), ("debug", "text")]
)
def test_log_level_and_format_are_taken_in_any_case(
    level: str, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CALLSPEAK_LOG_LEVEL=INFO, as Python and uvicorn spell levels, was refused."""
    monkeypatch.setenv("CALLSPEAK_LOG_LEVEL", level)
    monkeypatch.setenv("CALLSPEAK_LOG_FORMAT", fmt)
    settings = Settings()
    assert (settings.log_level, settings.log_format) == (level.lower(), fmt.lower())
    with pytest.raises(ValidationError, match="log_level"):
        Settings(log_level="verbose")  # type: ignore[arg-type]


def test_unknown_variables_are_found_with_the_setting_they_may_misspell() -> None:
    environ = {
        "CALLSPEAK_MAXCALLS": "3",
        "CALLSPEAK_IDLE_TIMOUT": "5",
        "callspeak_loglevel": "debug",
        "CALLSPEAK_NOT_A_THING": "x",
        # read: settings (in any case, with a vendor's name too), and the API client's
        "CALLSPEAK_MAX_CALLS": "3",
        "callspeak_port": "5000",
        "CALLSPEAK_DEEPGRAM_API_KEY": "k",
        "CALLSPEAK_SERVER": "http://127.0.0.1:5000",
        "CALLSPEAK_API_TOKEN": "t",
        "TWILIO_AUTH_TOKEN": "t",
        "HOME": "/root",
    }
    assert unknown_variables(environ) == [
        ("CALLSPEAK_IDLE_TIMOUT", "CALLSPEAK_IDLE_TIMEOUT"),
        ("CALLSPEAK_MAXCALLS", "CALLSPEAK_MAX_CALLS"),
        ("CALLSPEAK_NOT_A_THING", None),
        ("callspeak_loglevel", "CALLSPEAK_LOG_LEVEL"),
    ]


def test_a_notice_over_twilios_say_limit_is_refused_at_start_up() -> None:
    """The notice is Twilio's <Say>: at most 3000 bytes (Polly; 4096 basic). Only
    max_text_chars (5000 by default) was checked, so /voice served a <Say> Twilio refuses."""
    Settings(notice="a" * 3000)
    with pytest.raises(ValidationError, match="3000"):
        Settings(notice="a" * 3001)
