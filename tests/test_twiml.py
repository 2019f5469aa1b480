from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from callspeak.twiml import (
    MAX_PARAMETER_LENGTH,
    TwiMLError,
    connect_stream_twiml,
    stream_url_from_public,
    webhook_url_from_public,
)


def test_typical_twiml_is_exact() -> None:
    xml = connect_stream_twiml(
        "wss://callspeak.example.com/twilio",
        say="Connecting you now.",
        parameters={"call_token": "abc123", "voice": "joe"},
        stream_name="callspeak",
        status_callback="https://callspeak.example.com/stream-status",
    )
    assert xml == (
        "<Response>"
        "<Say>Connecting you now.</Say>"
        "<Connect>"
        '<Stream name="callspeak" statusCallback="https://callspeak.example.com/stream-status" '
        'statusCallbackMethod="POST" url="wss://callspeak.example.com/twilio">'
        '<Parameter name="call_token" value="abc123" />'
        '<Parameter name="voice" value="joe" />'
        "</Stream>"
        "</Connect>"
        "</Response>"
    )


def test_minimal_twiml_has_only_connect_and_stream() -> None:
    xml = connect_stream_twiml("wss://h.example/twilio")
    assert xml == '<Response><Connect><Stream url="wss://h.example/twilio" /></Connect></Response>'


def test_status_callback_method_is_written_only_with_a_callback() -> None:
    assert "statusCallbackMethod" not in connect_stream_twiml(
        "wss://h.example/twilio", status_callback_method="GET"
    )
    xml = connect_stream_twiml(
        "wss://h.example/twilio",
        status_callback="https://h.example/cb",
        status_callback_method="get",
    )
    assert 'statusCallbackMethod="GET"' in xml


def test_parameters_and_say_are_escaped_and_round_trip() -> None:
    nasty = "a & b < c > d \" e ' f\nline"
    xml = connect_stream_twiml(
        "wss://h.example/twilio", say="Tom & <Jerry>", parameters={'p&<"': nasty}
    )
    assert "&amp;" in xml and "&lt;" in xml and "&quot;" in xml
    root = ET.fromstring(xml)
    assert root.findtext("Say") == "Tom & <Jerry>"
    param = root.find("Connect/Stream/Parameter")
    assert param is not None
    assert param.attrib == {"name": 'p&<"', "value": nasty}


@pytest.mark.parametrize(
    "url",
    [
        "ws://h.example/twilio",
        "https://h.example/twilio",
        "http://h.example/twilio",
        "wss:///twilio",
        "h.example/twilio",
    ],
)
def test_refuses_non_wss_stream_urls(url: str) -> None:
    with pytest.raises(TwiMLError, match="wss://"):
        connect_stream_twiml(url)


@pytest.mark.parametrize(
    "url", ["wss://h.example/twilio?call=1", "wss://h.example/twilio?", "wss://h.example/t#x"]
)
def test_refuses_query_string_or_fragment_and_points_to_parameters(url: str) -> None:
    with pytest.raises(TwiMLError, match="parameters"):
        connect_stream_twiml(url)


def test_parameter_length_limit_is_name_plus_value_under_500() -> None:
    name = "n"
    ok = "v" * (MAX_PARAMETER_LENGTH - len(name) - 1)
    connect_stream_twiml("wss://h.example/twilio", parameters={name: ok})
    with pytest.raises(TwiMLError, match="fewer than 500"):
        connect_stream_twiml("wss://h.example/twilio", parameters={name: ok + "v"})


def test_refuses_empty_parameter_name() -> None:
    with pytest.raises(TwiMLError, match="must not be empty"):
        connect_stream_twiml("wss://h.example/twilio", parameters={"": "x"})


def test_refuses_bad_status_callback() -> None:
    with pytest.raises(TwiMLError, match="status_callback"):
        connect_stream_twiml("wss://h.example/twilio", status_callback="/relative")
    with pytest.raises(TwiMLError, match="GET or POST"):
        connect_stream_twiml(
            "wss://h.example/twilio",
            status_callback="https://h.example/cb",
            status_callback_method="PUT",
        )


@pytest.mark.parametrize(
    ("public", "expected"),
    [
        ("https://h.example", "wss://h.example/twilio"),
        ("https://h.example/", "wss://h.example/twilio"),
        ("https://h.example:8443", "wss://h.example:8443/twilio"),
        ("https://h.example/prefix/", "wss://h.example/prefix/twilio"),
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/twilio"),
    ],
)
def test_stream_url_from_public(public: str, expected: str) -> None:
    assert stream_url_from_public(public) == expected


def test_stream_url_custom_path_and_result_is_accepted_by_twiml() -> None:
    url = stream_url_from_public("https://h.example", "media")
    assert url == "wss://h.example/media"
    connect_stream_twiml(url)


@pytest.mark.parametrize(
    "public",
    [
        "https://h.example?x=1",
        "https://h.example/#f",
        "ftp://h.example",
        "h.example",
        "https://h.example:abc",
        "https://h.example:99999",
        "https://h.example:0",
        "https://[::1",
    ],
)
def test_public_url_refusals(public: str) -> None:
    with pytest.raises(TwiMLError):
        stream_url_from_public(public)
    with pytest.raises(TwiMLError):
        webhook_url_from_public(public, "/voice")


def test_stream_path_with_query_is_refused() -> None:
    with pytest.raises(TwiMLError, match="Parameter"):
        stream_url_from_public("https://h.example", "/twilio?x=1")


def test_webhook_url_from_public() -> None:
    assert webhook_url_from_public("https://h.example", "/voice") == "https://h.example/voice"
    assert webhook_url_from_public("https://h.example:8443/p/", "voice") == (
        "https://h.example:8443/p/voice"
    )
    # Twilio signs the query string of a callback URL, so a path may carry one.
    assert webhook_url_from_public("https://h.example", "/status?c=1") == (
        "https://h.example/status?c=1"
    )


def test_an_empty_or_blank_say_writes_no_say_element() -> None:
    for say in ("", "   "):  # e.g. CALLSPEAK_NOTICE= left empty in a .env file
        xml = connect_stream_twiml("wss://h.example/twilio", say=say)
        assert "<Say" not in xml and "<Connect>" in xml


@pytest.mark.parametrize("char", ["\x00", "\x0b", "\x0c", "\x1b", "\ufffe"])
def test_text_xml_cannot_carry_is_refused_not_written(char: str) -> None:
    """The twilio library wrote these as they are: TwiML that is not XML, which Twilio cannot
    read. Tabs and line breaks are XML, and stay."""
    url = "wss://h.example/twilio"
    with pytest.raises(TwiMLError, match="XML"):
        connect_stream_twiml(url, say=f"Hello{char}there.")
    with pytest.raises(TwiMLError, match="XML"):
        connect_stream_twiml(url, parameters={"say": f"a{char}b"})
    with pytest.raises(TwiMLError, match="XML"):
        connect_stream_twiml(url, parameters={f"n{char}": "v"})
    with pytest.raises(TwiMLError, match="XML"):
        connect_stream_twiml(f"wss://h.example/{char}")
    fine = connect_stream_twiml(url, say="Line one.\n\tLine two. 😀", parameters={"k": "é\n"})
    ET.fromstring(fine)  # well-formed


@pytest.mark.parametrize("url", ["wss://h.example /twilio", "wss://h.example/my path/twilio"])
def test_a_stream_url_with_a_space_is_refused(url: str) -> None:
    with pytest.raises(TwiMLError, match="space"):
        connect_stream_twiml(url)


@pytest.mark.parametrize("command", ["twiml", "call"])
def test_a_status_callback_that_is_no_url_is_explained_to_a_command_line_user(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The message told a command-line user to "use webhook_url_from_public", a Python name."""
    from callspeak.cli import main

    extra = ["--to", "+15551234567", "--from", "+15557654321"] if command == "call" else []
    args = [command, *extra, "--url", "wss://h.example/twilio", "--status-callback", "notaurl"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "callspeak: status_callback 'notaurl' must be an absolute http(s) URL Twilio can reach, "
        "e.g. https://example.ngrok.app/status (`status_callback`; --status-callback on the "
        "command line)\n"
    )


@pytest.mark.parametrize(
    ("url", "callback"),
    [
        ("wss://h.example/twi\nlio", None),
        ("wss://h.example/\ttwilio", None),
        ("wss://h.example/twilio\r", None),
        ("wss://h.example/twilio", "https://h.example/cb\n"),
        ("wss://h.example/twilio", "https://h.example/\tcb"),
    ],
)
def test_a_url_with_a_tab_or_line_break_is_refused(url: str, callback: str | None) -> None:
    """urlsplit silently drops tabs and line breaks, so a pasted URL with one would pass the
    other checks; TwiML would then carry a URL Twilio cannot use. It is refused up front."""
    with pytest.raises(TwiMLError, match="line break"):
        connect_stream_twiml(url, status_callback=callback)


# -- from a second reading ----------------------------------------------------------------------


def test_a_say_over_twilios_say_limit_is_refused_not_written() -> None:
    """Twilio's <Say> takes at most 3000 bytes with a Polly voice (4096 with the basic ones; a
    <Say> without voice= speaks with the account's default, which may be Polly): a longer one
    is refused at call time (warning 13521). It was written into the TwiML."""
    from callspeak.twiml import MAX_SAY_BYTES

    assert MAX_SAY_BYTES == 3000
    connect_stream_twiml("wss://h.example/twilio", say="a" * MAX_SAY_BYTES)
    with pytest.raises(TwiMLError, match="3000"):
        connect_stream_twiml("wss://h.example/twilio", say="a" * (MAX_SAY_BYTES + 1))
    with pytest.raises(TwiMLError, match="bytes"):  # counted in UTF-8 bytes, as Twilio does
        connect_stream_twiml("wss://h.example/twilio", say="é" * (MAX_SAY_BYTES // 2 + 1))
    # and URL-encoded, at most 4500 characters: "é" is "%C3%A9"
    connect_stream_twiml("wss://h.example/twilio", say="é" * 750)
    with pytest.raises(TwiMLError, match="URL-encoded"):
        connect_stream_twiml("wss://h.example/twilio", say="é" * 751)


@pytest.mark.parametrize(
    ("url", "callback"),
    [
        ("wss://h.example:99999/twilio", None),
        ("wss://h.example:abc/twilio", None),
        ("wss://h.example:/twilio", None),
        ("wss://h.example:0/twilio", None),
        ("wss://user:pw@h.example/twilio", None),
        ("wss://[::1/twilio", None),
        ("wss://h.example/twilio", "https://h.example:99999/status"),
        ("wss://h.example/twilio", "https://user:pw@h.example/status"),
        ("wss://h.example/twilio", "https://[::1/status"),
    ],
)
def test_a_url_with_a_bad_port_host_or_credentials_is_refused(
    url: str, callback: str | None
) -> None:
    """The public URL is checked for all of these (base_urls.checked_base_url), but a stream
    URL or callback given as such (`twiml --url`, `--status-callback`) was written into the
    TwiML with an impossible port or a password, and a broken IPv6 host was urlsplit's bare
    ValueError: a traceback from `callspeak twiml`."""
    with pytest.raises(TwiMLError):
        connect_stream_twiml(url, status_callback=callback)


def test_a_status_callback_keeps_its_query_string() -> None:
    xml = connect_stream_twiml(
        "wss://h.example:8443/twilio", status_callback="https://h.example:8443/status?c=1&d=2"
    )
    stream = ET.fromstring(xml).find("Connect/Stream")
    assert stream is not None
    assert stream.get("statusCallback") == "https://h.example:8443/status?c=1&d=2"
    assert stream.get("url") == "wss://h.example:8443/twilio"


@pytest.mark.parametrize("url", ["wss://[::1/twilio", "wss://h.example:99999/twilio"])
def test_twiml_refuses_a_broken_stream_url_in_one_line(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from callspeak.cli import main

    assert main(["twiml", "--url", url]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("callspeak: stream URL") and err.count("\n") == 1, err
