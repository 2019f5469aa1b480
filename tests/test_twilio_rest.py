"""TwilioRestClient against FakeTwilioRest over real loopback sockets.

The twilio ``Client`` is synchronous, so every call goes through ``asyncio.to_thread`` while the
fake is served by uvicorn on this test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from twilio.http import HttpClient
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response

from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_twilio_rest import FakeTwilioRest
from callspeak.twilio_rest import (
    MAX_TWIML_LENGTH,
    TwilioApiError,
    TwilioConnectionError,
    TwilioCredentials,
    TwilioRestClient,
)
from callspeak.twiml import TwiMLError, connect_stream_twiml

ACCOUNT = "AC" + "a" * 32
TOKEN = "secret-token"
TWIML = connect_stream_twiml(
    "wss://callspeak.example.com/twilio",
    say="Hello & welcome <caller>",
    parameters={"call_token": "t0k'en\"&<>"},
)


@pytest.fixture
def fake() -> FakeTwilioRest:
    return FakeTwilioRest(ACCOUNT, TOKEN)


@pytest.fixture
async def base_url(fake: FakeTwilioRest) -> AsyncIterator[str]:
    async with serve_asgi(fake.app) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[TwilioRestClient]:
    with TwilioRestClient(TwilioCredentials(ACCOUNT, TOKEN, api_base_url=base_url)) as c:
        yield c


async def place(client: TwilioRestClient, **overrides: Any) -> str:
    kwargs: dict[str, Any] = {"to": "+15559870000", "from_": "+15551230000", "twiml": TWIML}
    kwargs.update(overrides)
    sid: str = await asyncio.to_thread(lambda: client.place_call(**kwargs))
    return sid


async def test_place_call_sends_form_fields_and_twiml_round_trips(
    client: TwilioRestClient, fake: FakeTwilioRest
) -> None:
    sid = await place(client, status_callback="https://callspeak.example.com/call-status")

    assert sid.startswith("CA") and len(sid) == 34
    [call] = fake.calls
    assert call.account_sid == ACCOUNT
    assert call.call_sid == sid
    assert call.fields["To"] == "+15559870000"
    assert call.fields["From"] == "+15551230000"
    assert call.fields["Twiml"] == TWIML  # byte-exact, escapes and all
    assert call.fields["StatusCallback"] == "https://callspeak.example.com/call-status"
    assert call.field_lists["StatusCallbackEvent"] == [
        "initiated",
        "ringing",
        "answered",
        "completed",
    ]
    assert fake.status_of(sid) == "queued"


async def test_place_call_without_status_callback_sends_no_events(
    client: TwilioRestClient, fake: FakeTwilioRest
) -> None:
    await place(client, status_callback_events=("completed",))
    [call] = fake.calls
    assert "StatusCallback" not in call.fields
    assert "StatusCallbackEvent" not in call.fields
    assert set(call.fields) == {"To", "From", "Twiml"}


async def test_wrong_token_is_401(base_url: str, fake: FakeTwilioRest) -> None:
    creds = TwilioCredentials(ACCOUNT, "wrong-token", api_base_url=base_url)
    with TwilioRestClient(creds) as client:
        with pytest.raises(TwilioApiError) as caught:
            await place(client)
    err = caught.value
    assert (err.status, err.code, err.message) == (401, 20003, "Authenticate")
    assert not err.retryable
    assert str(err) == "Twilio API HTTP 401 (Twilio error 20003): Authenticate"
    assert fake.calls == []


async def test_missing_to_is_mapped(client: TwilioRestClient, fake: FakeTwilioRest) -> None:
    with pytest.raises(TwilioApiError) as caught:
        await place(client, to="")
    assert (caught.value.status, caught.value.code) == (400, 21201)
    assert fake.calls == []


async def test_hangup_sends_status_completed(
    client: TwilioRestClient, fake: FakeTwilioRest
) -> None:
    sid = await place(client)
    fake.set_status(sid, "in-progress")
    await asyncio.to_thread(client.hangup, sid)
    [update] = fake.updates
    assert update.call_sid == sid
    assert update.fields == {"Status": "completed"}
    assert fake.status_of(sid) == "completed"


async def test_redirect_sends_twiml(client: TwilioRestClient, fake: FakeTwilioRest) -> None:
    sid = await place(client)
    fake.set_status(sid, "in-progress")
    new = "<Response><Say>Goodbye &amp; thanks</Say><Hangup /></Response>"
    await asyncio.to_thread(client.redirect, sid, new)
    [update] = fake.updates
    assert update.fields == {"Twiml": new}


async def test_unknown_sid_is_404(client: TwilioRestClient) -> None:
    with pytest.raises(TwilioApiError) as caught:
        await asyncio.to_thread(client.hangup, "CA" + "0" * 32)
    assert (caught.value.status, caught.value.code) == (404, 20404)
    assert "was not found" in caught.value.message


async def test_redirect_of_finished_call_is_refused(
    client: TwilioRestClient, fake: FakeTwilioRest
) -> None:
    sid = await place(client)
    await asyncio.to_thread(client.hangup, sid)
    with pytest.raises(TwilioApiError) as caught:
        await asyncio.to_thread(client.redirect, sid, "<Response/>")
    assert (caught.value.status, caught.value.code) == (400, 21220)


async def test_region_and_edge_environment_do_not_move_the_host(
    base_url: str, fake: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO_REGION", "ie1")
    monkeypatch.setenv("TWILIO_EDGE", "dublin")
    with TwilioRestClient(TwilioCredentials(ACCOUNT, TOKEN, api_base_url=base_url)) as client:
        await place(client)
    assert len(fake.calls) == 1


async def test_base_url_with_path_prefix_and_injected_http_client(fake: FakeTwilioRest) -> None:
    class Recording(TwilioHttpClient):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(timeout=5)
            self.urls: list[str] = []

        def request(self, method: str, url: str, **kwargs: Any) -> Any:
            self.urls.append(url)
            return super().request(method, url, **kwargs)

    from starlette.applications import Starlette
    from starlette.routing import Mount

    recording = Recording()
    async with serve_asgi(Starlette(routes=[Mount("/fake", app=fake.app)])) as url:
        creds = TwilioCredentials(ACCOUNT, TOKEN, api_base_url=url + "/fake/")
        client = TwilioRestClient(creds, http_client=recording)
        try:
            sid = await place(client)
        finally:
            client.close()  # an injected transport is the caller's to close
            recording.session.close()
    assert recording.urls == [f"{url}/fake/2010-04-01/Accounts/{ACCOUNT}/Calls.json"]
    assert fake.calls[0].call_sid == sid


async def test_unreachable_twilio_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    creds = TwilioCredentials(ACCOUNT, TOKEN, api_base_url=f"http://127.0.0.1:{port}")
    with TwilioRestClient(creds, timeout=2) as client:
        with pytest.raises(TwilioConnectionError, match="could not reach Twilio"):
            await place(client)


def test_local_refusals() -> None:
    creds = TwilioCredentials(ACCOUNT, TOKEN, api_base_url="http://127.0.0.1:9")
    with TwilioRestClient(creds) as client:
        with pytest.raises(TwiMLError, match="4000"):
            client.place_call(to="+1", from_="+2", twiml="x" * (MAX_TWIML_LENGTH + 1))
        with pytest.raises(TwiMLError, match="4000"):
            client.redirect("CA" + "0" * 32, "x" * (MAX_TWIML_LENGTH + 1))
        with pytest.raises(ValueError, match="status_callback_events"):
            client.place_call(
                to="+1", from_="+2", twiml="<Response/>", status_callback_events=["x"]
            )
        with pytest.raises(ValueError, match="not a call SID"):
            client.hangup("../Accounts")
    with pytest.raises(ValueError, match="non-empty"):
        TwilioCredentials(ACCOUNT, "")
    with pytest.raises(ValueError, match="api_base_url"):
        TwilioCredentials(ACCOUNT, TOKEN, api_base_url="api.twilio.com")
    with pytest.raises(ValueError, match="query string or fragment"):
        TwilioCredentials(ACCOUNT, TOKEN, api_base_url="https://api.twilio.com#x")


def test_credentials_repr_hides_the_token() -> None:
    assert TOKEN not in repr(TwilioCredentials(ACCOUNT, TOKEN))


# The fake's wire shapes, checked directly with httpx.


def _auth(sid: str = ACCOUNT, token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{sid}:{token}".encode()).decode()}


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"From": "+1", "Twiml": "<Response/>"}, 21201),
        ({"To": "+1", "Twiml": "<Response/>"}, 21213),
        ({"To": "+1", "From": "+2"}, 21205),
        ({"To": "+1", "From": "+2", "Twiml": "x" * 4001}, 32018),
    ],
)
async def test_fake_create_validation(base_url: str, form: dict[str, str], code: int) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        r = await http.post(
            f"/2010-04-01/Accounts/{ACCOUNT}/Calls.json", data=form, headers=_auth()
        )
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == code and body["status"] == 400
    assert body["more_info"] == f"https://www.twilio.com/docs/errors/{code}"


async def test_fake_auth_error_shape_and_resource(base_url: str) -> None:
    path = f"/2010-04-01/Accounts/{ACCOUNT}/Calls.json"
    form = {"To": "+1", "From": "+2", "Url": "https://h.example/voice"}
    async with httpx.AsyncClient(base_url=base_url) as http:
        no_auth = await http.post(path, data=form)
        other_account = await http.post(
            f"/2010-04-01/Accounts/AC{'b' * 32}/Calls.json", data=form, headers=_auth()
        )
        created = await http.post(path, data=form, headers=_auth())
        sid = created.json()["sid"]
        fetched = await http.get(
            f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{sid}.json", headers=_auth()
        )
        wrong_method = await http.delete(path, headers=_auth())
        unrouted = await http.get("/nope", headers=_auth())
    assert no_auth.status_code == 401
    assert no_auth.json() == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    assert other_account.status_code == 401
    assert created.status_code == 201
    resource = created.json()
    assert resource["status"] == "queued" and resource["direction"] == "outbound-api"
    assert resource["uri"] == f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{sid}.json"
    assert (resource["to"], resource["from"], resource["account_sid"]) == ("+1", "+2", ACCOUNT)
    assert fetched.json() == resource
    assert (wrong_method.status_code, wrong_method.json()["code"]) == (405, 20004)
    assert (unrouted.status_code, unrouted.json()["code"]) == (404, 20404)


async def test_fake_update_rules(base_url: str, fake: FakeTwilioRest) -> None:
    calls = f"/2010-04-01/Accounts/{ACCOUNT}/Calls"
    form = {"To": "+1", "From": "+2", "Twiml": "<Response/>"}
    async with httpx.AsyncClient(base_url=base_url, headers=_auth()) as http:
        sid = (await http.post(f"{calls}.json", data=form)).json()["sid"]
        bad_status = await http.post(f"{calls}/{sid}.json", data={"Status": "paused"})
        as_json = await http.post(f"{calls}/{sid}.json", json={"Status": "completed"})
        not_utf8 = await http.post(
            f"{calls}/{sid}.json",
            content=b"Twiml=\xff",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        fetch_unknown = await http.get(f"{calls}/CA{'0' * 32}.json")
        garbled_auth = await http.get(f"{calls}/{sid}.json", headers={"Authorization": "Basic %%%"})
        canceled = await http.post(f"{calls}/{sid}.json", data={"Status": "canceled"})
        completed_after = await http.post(f"{calls}/{sid}.json", data={"Status": "completed"})
    assert (bad_status.status_code, bad_status.json()["code"]) == (400, 20001)
    assert (as_json.status_code, as_json.json()["code"]) == (400, 20001)
    assert (not_utf8.status_code, not_utf8.json()["code"]) == (400, 20001)
    assert (fetch_unknown.status_code, fetch_unknown.json()["code"]) == (404, 20404)
    assert (garbled_auth.status_code, garbled_auth.json()["code"]) == (401, 20003)
    assert canceled.json()["status"] == "canceled"
    # Hanging up a call that already ended changes nothing (modelled; not verified on Twilio).
    assert completed_after.json()["status"] == "canceled"
    assert [u.fields for u in fake.updates] == [{"Status": "canceled"}, {"Status": "completed"}]


class _CannedHttpClient(HttpClient):  # type: ignore[misc]
    """A transport that answers every request with one canned response (the injection seam)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(logging.getLogger("test"), False, None)
        self.status, self.body = status, body
        self.requests: list[tuple[str, str]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Response:
        self.requests.append((method, url))
        return Response(self.status, self.body)


def test_problem_details_error_is_mapped() -> None:
    body = json.dumps(
        {
            "type": "https://www.twilio.com/docs/errors/20429",
            "title": "Too Many Requests",
            "status": 429,
            "code": 20429,
            "detail": "slow down",
        }
    )
    transport = _CannedHttpClient(429, body)
    client = TwilioRestClient(TwilioCredentials(ACCOUNT, TOKEN), http_client=transport)
    with pytest.raises(TwilioApiError) as caught:
        client.hangup("CA" + "0" * 32)
    err = caught.value
    assert (err.status, err.code, err.message) == (429, 20429, "Too Many Requests: slow down")
    assert err.retryable
    assert transport.requests == [
        ("POST", f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Calls/CA{'0' * 32}.json")
    ]


def test_an_error_status_without_json_body_names_the_url_and_the_start_of_the_body() -> None:
    client = TwilioRestClient(
        TwilioCredentials(ACCOUNT, TOKEN), http_client=_CannedHttpClient(502, "Bad Gateway")
    )
    with pytest.raises(TwilioApiError) as caught:
        client.place_call(to="+1", from_="+2", twiml="<Response/>")
    assert (caught.value.status, caught.value.code) == (502, None)
    url = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Calls.json"
    assert caught.value.message.startswith(
        f"POST {url} answered with something other than Twilio's JSON "
        "(the body starts 'Bad Gateway'): check the API base URL"
    )
    assert (caught.value.method, caught.value.uri) == ("POST", url)
    assert caught.value.retryable


@pytest.mark.parametrize(
    ("body", "quoted"),
    [
        ("", "the body is empty"),
        ("[]", "the body starts '[]'"),
        ('"queued"', "the body starts '\"queued\"'"),
        ("x" * 500, f"the body starts '{'x' * 120}'"),
    ],
)
def test_a_2xx_reply_that_is_not_a_json_object_is_an_api_error(body: str, quoted: str) -> None:
    client = TwilioRestClient(
        TwilioCredentials(ACCOUNT, TOKEN), http_client=_CannedHttpClient(201, body)
    )
    with pytest.raises(TwilioApiError) as caught:
        client.place_call(to="+1", from_="+2", twiml="<Response/>")
    assert (caught.value.status, caught.value.code) == (201, None)
    assert f"({quoted})" in caught.value.message
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("status", "headers"),
    [(200, {}), (302, {"Location": "http://portal.example/login"}), (503, {})],
)
async def test_an_html_page_instead_of_twilio_is_an_api_error_for_every_request(
    status: int, headers: dict[str, str]
) -> None:
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    async def portal(request: Any) -> HTMLResponse:
        page = "<html>\n  <title>Sign in to Hotel Wi-Fi</title>\n</html>"
        return HTMLResponse(page, status_code=status, headers=headers)

    app = Starlette(routes=[Route("/{path:path}", portal, methods=["GET", "POST"])])
    async with serve_asgi(app) as url:
        with TwilioRestClient(TwilioCredentials(ACCOUNT, TOKEN, api_base_url=url)) as client:
            calls = f"{url}/2010-04-01/Accounts/{ACCOUNT}/Calls"
            sid = "CA" + "0" * 32
            for request, uri in [
                (lambda: client.place_call(to="+1", from_="+2", twiml=TWIML), f"{calls}.json"),
                (lambda: client.hangup(sid), f"{calls}/{sid}.json"),
                (lambda: client.redirect(sid, TWIML), f"{calls}/{sid}.json"),
            ]:
                with pytest.raises(TwilioApiError) as caught:
                    await asyncio.to_thread(request)
                err = caught.value
                assert (err.status, err.code, err.method, err.uri) == (status, None, "POST", uri)
                assert str(err) == (
                    f"Twilio API HTTP {status}: POST {uri} answered with something other than "
                    "Twilio's JSON (the body starts '<html> <title>Sign in to Hotel Wi-Fi</title> "
                    "</html>'): check the API base URL; a proxy or captive portal may be "
                    "answering instead"
                )
                assert err.retryable is (status == 503)
