"""``callspeak calls|say|clear|hangup`` against a real server, and the client's error handling."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from callspeak import cli
from callspeak.api_client import ApiClient, ApiClientError, default_server
from tests.test_api import TOKEN, api_server, heard_as, live_call


async def run_cli(*argv: str) -> int:
    # main() is synchronous (it makes one blocking request); keep the event loop free for the
    # server and the emulated call it talks to.
    return await asyncio.to_thread(cli.main, list(argv))


async def test_calls_say_and_hangup_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    async with api_server() as api, live_call(api) as (session, call):
        sid, url = session.call_sid, api.base_url
        assert await run_cli("calls", "--server", url) == 0
        listed = capsys.readouterr().out
        assert sid in listed and "streaming" in listed
        assert await run_cli("say", sid, "Hello from the shell.", "--server", url, "--wait") == 0
        assert capsys.readouterr().out.strip() == "utterance 1: played (heard 1 of 1 sentences)"
        assert await run_cli("hangup", sid, "--server", url) == 0
        assert capsys.readouterr().out.strip() == f"hung up {sid}"
        report = await call
    assert report.ended_by == "server"
    assert bytes(report.played) == heard_as("Hello from the shell.")


async def test_clear_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    async with api_server() as api, live_call(api) as (session, _):
        url = api.base_url
        args = ("say", session.call_sid, "Words. " * 60, "--server", url)
        assert await run_cli(*args) == 0
        assert capsys.readouterr().out.startswith("utterance 1: ")
        assert await run_cli("clear", session.call_sid, "--server", url) == 0
        assert capsys.readouterr().out.strip() == f"cleared 1 utterance in {session.call_sid}"


async def test_cli_reports_api_errors_with_exit_code_1(capsys: pytest.CaptureFixture[str]) -> None:
    async with api_server() as api:
        assert await run_cli("say", "CAnope", "hi", "--server", api.base_url) == 1
        err = capsys.readouterr().err.strip()
        assert err == "callspeak say: 404 unknown_call: no live call CAnope"


async def test_cli_token_from_flag_or_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CALLSPEAK_API_TOKEN", raising=False)
    async with api_server(api_token=TOKEN) as api:
        url = api.base_url
        assert await run_cli("calls", "--server", url) == 1
        assert "401 unauthorized: missing bearer token" in capsys.readouterr().err
        assert await run_cli("calls", "--server", url, "--token", "wrong") == 1
        assert "401 unauthorized: invalid bearer token" in capsys.readouterr().err
        assert await run_cli("calls", "--server", url, "--token", TOKEN) == 0
        assert capsys.readouterr().out.strip() == "no live calls"
        monkeypatch.setenv("CALLSPEAK_API_TOKEN", TOKEN)
        assert await run_cli("calls", "--server", url, "--json") == 0
        assert json.loads(capsys.readouterr().out) == {"calls": []}  # the server's JSON


async def test_cli_drops_spaces_around_the_token_as_the_server_does(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with api_server(api_token=f" {TOKEN} ") as api:
        url = api.base_url
        monkeypatch.setenv("CALLSPEAK_API_TOKEN", f" {TOKEN}\n")
        assert await run_cli("calls", "--server", url) == 0
        assert capsys.readouterr().out.strip() == "no live calls"
        assert await run_cli("calls", "--server", url, "--token", f"  {TOKEN} ") == 0
        assert capsys.readouterr().out.strip() == "no live calls"
        assert await run_cli("calls", "--server", url, "--token", " \t ") == 1  # blank: none
        assert "401 unauthorized: missing bearer token" in capsys.readouterr().err


async def test_cli_sends_a_token_that_is_not_ascii(capsys: pytest.CaptureFixture[str]) -> None:
    async with api_server(api_token="pässwörd") as api:
        url = api.base_url
        assert await run_cli("calls", "--server", url, "--token", "pässwörd") == 0
        assert await run_cli("calls", "--server", url, "--token", "passwort") == 1
        assert "401 unauthorized: invalid bearer token" in capsys.readouterr().err


def test_client_sends_a_stripped_token_and_no_header_for_a_blank_one() -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"calls": []})

    for token in (" t0k\n", "  "):
        with ApiClient("http://x.test", token=token, transport=httpx.MockTransport(server)) as c:
            assert c.calls() == []
    stripped, blank = seen
    assert stripped.headers["authorization"] == "Bearer t0k"
    assert "authorization" not in blank.headers


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["say", "CA123"])  # no text
    assert exited.value.code == 2
    assert "text" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with ApiClient("http://127.0.0.1:9", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(ApiClientError, match="cannot reach the callspeak server at http://"):
            client.calls()


@pytest.mark.parametrize("server", ["http://[::1", "http://127.0.0.1:port"])
def test_a_malformed_server_url_is_a_clear_error(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["calls", "--server", server]) == 1  # like a server that cannot be reached
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"callspeak calls: invalid server URL {server!r}")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("port", ["abc", "99999", "0", "-1", "5000x"])
def test_a_port_no_server_listens_on_is_blamed_on_callspeak_port(
    port: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CALLSPEAK_PORT=abc was reported as an invalid URL from --server / CALLSPEAK_SERVER;
    99999 was dialled."""
    monkeypatch.setenv("CALLSPEAK_PORT", port)
    assert cli.main(["calls"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"callspeak calls: CALLSPEAK_PORT {port!r} is not a port from 1 to 65535: set it to the "
        "server's port, or give the server's URL with --server / CALLSPEAK_SERVER\n"
    )
    monkeypatch.setenv("CALLSPEAK_SERVER", "http://[::1")  # the URL given wins: no port read
    assert cli.main(["calls"]) == 1
    assert (
        "invalid server URL 'http://[::1' (--server / CALLSPEAK_SERVER)" in capsys.readouterr().err
    )


def test_a_reply_that_is_not_an_api_error_body_is_reported_as_is() -> None:
    def proxy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    with ApiClient("http://example.test", transport=httpx.MockTransport(proxy)) as client:
        with pytest.raises(ApiClientError) as raised:
            client.say("CA1", "hi")
    assert raised.value.status == 502 and raised.value.code is None
    assert "502 from http://example.test/calls/CA1/say" in str(raised.value)


def test_client_sends_the_token_and_escapes_the_call_sid() -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"callSid": "CA/1", "afterSpeech": True})

    with ApiClient("http://x.test/", token="t0k", transport=httpx.MockTransport(server)) as c:
        assert c.hangup("CA/1", after_speech=True)["afterSpeech"] is True
    [request] = seen
    assert request.url.raw_path == b"/calls/CA%2F1/hangup"
    assert request.headers["authorization"] == "Bearer t0k"
    assert request.content == b'{"afterSpeech":true}'


def test_requests_the_server_holds_get_a_longer_timeout_than_the_default() -> None:
    """say --wait is held up to 60 s and hangup after speech up to 30 s: the default 10 s
    would give up on a request that is going well."""
    timeouts: dict[str, float | None] = {}

    def server(request: httpx.Request) -> httpx.Response:
        timeouts[request.url.path] = request.extensions["timeout"]["read"]
        return httpx.Response(200, json={"callSid": "CA1", "id": 1, "status": "played"})

    with ApiClient("http://x.test", transport=httpx.MockTransport(server)) as client:
        client.say("CA1", "hi", wait=True)
        client.hangup("CA1", after_speech=True)
        client.clear("CA1")
    assert timeouts["/calls/CA1/say"] is not None and timeouts["/calls/CA1/say"] > 60
    assert timeouts["/calls/CA1/hangup"] is not None and timeouts["/calls/CA1/hangup"] > 30
    assert timeouts["/calls/CA1/clear"] == 10.0


def test_default_server() -> None:
    assert default_server({}) == "http://127.0.0.1:5000"
    assert default_server({"CALLSPEAK_PORT": "8080"}) == "http://127.0.0.1:8080"
    assert default_server({"CALLSPEAK_SERVER": "https://a.test", "CALLSPEAK_PORT": "1"}) == (
        "https://a.test"
    )


@pytest.mark.parametrize(
    ("command", "args"), [("calls", []), ("clear", ["CA1"]), ("say", ["CA1", "hi"])]
)
def test_an_answer_of_another_shape_is_a_clear_error(
    command: str, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--server pointed at another service that answers 200 JSON: a message, not a KeyError."""
    from callspeak.api_client import add_api_arguments, run_api_command

    def elsewhere(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"ok": True})

    parser = argparse.ArgumentParser()
    add_api_arguments(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args([command, *args, "--server", "http://other.test"])
    assert run_api_command(parsed, transport=httpx.MockTransport(elsewhere)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"callspeak {command}: ") and "is this a callspeak server?" in err


def test_no_answer_after_connecting_says_the_request_may_have_been_carried_out() -> None:
    """A server that read the request and did not answer may have queued the speech: "cannot
    reach" would invite saying it twice."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def hold() -> None:
        conn, _ = listener.accept()
        received.append(conn.recv(65536))
        time.sleep(1.0)  # never answers within the client's timeout
        conn.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with ApiClient(url, timeout=0.3) as client, pytest.raises(ApiClientError) as raised:
            client.say("CA1", "Hello.")
    finally:
        holder.join()
        listener.close()
    assert received[0].startswith(b"POST /calls/CA1/say ")
    assert str(raised.value) == (
        f"no answer from the callspeak server at {url} within 0.3 s; "
        "POST /calls/CA1/say may have been carried out"
    )


def test_text_that_is_not_unicode_is_a_clear_error() -> None:
    """Text from argv in another encoding arrives with surrogate escapes."""

    def server(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    with ApiClient("http://x.test", transport=httpx.MockTransport(server)) as client:
        with pytest.raises(ApiClientError, match="not valid Unicode"):
            client.say("CA1", "caf\udce9")


def test_an_error_without_a_message_names_its_kind() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("", request=request)

    with ApiClient("http://127.0.0.1:9", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(ApiClientError, match=r"at http://127\.0\.0\.1:9: ConnectError$"):
            client.calls()
