"""The control API over real sockets: a server on loopback, emulated Twilio calls, a fake voice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from callspeak.api import api_routes, check_access, is_loopback, names_loopback
from callspeak.api_events import PING, EventSubscription, sse_frame
from callspeak.api_openapi import openapi_spec
from callspeak.audio.mulaw import MULAW_SILENCE
from callspeak.config import Settings
from callspeak.emulator import CallReport, DialOptions, dial
from callspeak.events import CallEventRecord
from callspeak.protocol import AccountSid, CallSid, Connected, MediaFormat, Start, Stop, StreamSid
from callspeak.server import AppState, create_app
from callspeak.session import CallSession
from callspeak.speech import SpeechStatus, Utterance
from tests.conftest import serve_app
from tests.fakes import FakeProvider, FakeService, FakeTransport, tone_for
from tests.test_server_limits import until

TOKEN = "s3cret-token"


def heard_as(*sentences: str) -> bytes:
    """What the caller hears for these sentences: each one's audio padded to whole frames."""
    out = b""
    for sentence in sentences:
        audio = tone_for(sentence)
        out += audio + bytes([MULAW_SILENCE]) * (-len(audio) % 160)
    return out


@dataclass
class Api:
    base_url: str
    ws_url: str
    state: AppState
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def api_server(**settings: Any) -> AsyncIterator[Api]:
    settings.setdefault("greeting", "")
    settings.setdefault("api_token", None)  # whatever CALLSPEAK_API_TOKEN the shell has
    settings.setdefault("validate_signatures", False)  # these tests are about the API
    app = create_app(Settings(**settings), tts=FakeService())
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield Api(url, url.replace("http", "ws", 1) + "/twilio", app.state.callspeak, http)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with api_server() as running:
        yield running


@contextlib.asynccontextmanager
async def live_call(
    api: Api, *, duration: float = 8.0, **params: str
) -> AsyncIterator[tuple[CallSession, asyncio.Task[CallReport]]]:
    """An emulated call that lasts until the test hangs it up (or ``duration`` passes)."""
    options = DialOptions(url=api.ws_url, parameters=params, duration=duration)
    call = asyncio.create_task(dial(options))
    try:
        async with asyncio.timeout(5):
            session = await api.state.calls.wait_for(options.call_sid)
        yield session, call
    finally:
        if not call.done():
            await session.hangup()
        async with asyncio.timeout(10):
            await call


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


# -- speaking ---------------------------------------------------------------------------------


async def test_every_unfinished_utterance_stays_reachable_and_finished_ones_are_capped(
    api: Api,
) -> None:
    """The call's detail and each ``Location`` show every utterance not yet finished, however
    many are queued; once finished, only the last ``HISTORY`` (20) said through the API stay."""
    async with live_call(api) as (session, _):
        sid = session.call_sid
        locations = []
        texts = [f"Sentence number {n}." for n in range(25)]
        texts[0] = "A first sentence that goes on " + "and on " * 50 + "for four seconds."
        for text in texts:
            r = await api.http.post(f"/calls/{sid}/say", json={"text": text})
            assert r.status_code == 202, r.text
            locations.append(r.headers["location"])
        first = await api.http.get(locations[0])  # the one speaking, or about to
        assert first.status_code == 200, first.text
        assert first.json()["status"] in ("queued", "speaking")
        detail = (await api.http.get(f"/calls/{sid}")).json()
        assert [u["text"] for u in detail["utterances"]] == texts
        r = await api.http.post(f"/calls/{sid}/clear")
        assert r.status_code == 200, r.text
        detail = (await api.http.get(f"/calls/{sid}")).json()
        assert [u["text"] for u in detail["utterances"]] == texts[5:]
        assert {u["status"] for u in detail["utterances"]} <= {"interrupted", "cancelled"}
        assert_error(await api.http.get(locations[0]), 404, "unknown_utterance")


async def test_say_into_a_live_call_is_heard_exactly_after_the_greeting() -> None:
    async with api_server(greeting="Hi.") as api, live_call(api) as (session, call):
        sid = session.call_sid
        queued = await api.http.post(f"/calls/{sid}/say", json={"text": "  Hello there.  "})
        assert queued.status_code == 202
        first = queued.json()
        assert first["text"] == "Hello there." and first["status"] in ("queued", "speaking")
        assert queued.headers["location"] == f"/calls/{sid}/utterances/{first['id']}"
        waited = await api.http.post(
            f"/calls/{sid}/say?wait=true", json={"text": "How are you? Fine, thanks."}
        )
        assert waited.status_code == 200
        second = waited.json()
        assert second["status"] == "played"
        assert second["sentences"] == ["How are you?", "Fine, thanks."]
        assert second["record"] == {
            "heard": ["How are you?", "Fine, thanks."],
            "cut": None,
            "cutSeconds": None,
            "unheard": [],
        }
        # The finished utterances stay visible, with their records.
        resource = await api.http.get(queued.headers["location"])
        assert resource.status_code == 200 and resource.json()["status"] == "played"
        detail = (await api.http.get(f"/calls/{sid}")).json()
        assert [u["id"] for u in detail["utterances"]] == [first["id"], second["id"]]
        hung = await api.http.post(f"/calls/{sid}/hangup", json={"afterSpeech": True})
        assert hung.status_code == 200 and hung.json() == {"callSid": sid, "afterSpeech": True}
        report = await call
    assert report.ended_by == "server"
    assert bytes(report.played) == heard_as("Hi.", "Hello there.", "How are you?", "Fine, thanks.")
    assert report.warnings == []


async def test_calls_list_and_detail_describe_the_live_call(api: Api) -> None:
    assert (await api.http.get("/calls")).json() == {"calls": []}
    async with live_call(api, customer="42") as (session, _):
        listed = (await api.http.get("/calls")).json()["calls"]
        assert [c["callSid"] for c in listed] == [session.call_sid]
        assert listed[0]["parameters"] == {"customer": "42"}
        assert listed[0]["phase"] == "streaming" and listed[0]["speaking"] is None
        detail = (await api.http.get(f"/calls/{session.call_sid}")).json()
        assert detail["streamSid"] == session.stream_sid and detail["accountSid"].startswith("AC")
        assert detail["tracks"] == ["inbound"]
        assert detail["mediaFormat"] == {
            "encoding": "audio/x-mulaw",
            "sampleRate": 8000,
            "channels": 1,
        }
        assert detail["startedAt"] == session.started_at and detail["startedAt"] > 1.7e9
        assert detail["eventsUrl"] == f"/calls/{session.call_sid}/events"


async def test_speaking_is_what_the_caller_hears_until_its_last_mark_comes_back(
    api: Api,
) -> None:
    """All of a short utterance's audio is sent at once (up to a second ahead of the caller):
    it is still what the caller hears, and what ``speaking`` says, until its mark echoes."""
    async with live_call(api) as (session, _):
        said = await api.http.post(
            f"/calls/{session.call_sid}/say", json={"text": "Half a second of speech here."}
        )
        [utterance] = session.utterances
        # Every frame sent: the session's speaker is done with it.
        await until(lambda: utterance.status is SpeechStatus.SPEAKING and session.speaking is None)
        listed = (await api.http.get("/calls")).json()["calls"]
        detail = (await api.http.get(f"/calls/{session.call_sid}")).json()
        assert utterance.status is SpeechStatus.SPEAKING  # (the mark has not come back yet)
        assert listed[0]["speaking"]["id"] == detail["speaking"]["id"] == said.json()["id"]
        await until(lambda: utterance.status is SpeechStatus.PLAYED)
        assert (await api.http.get("/calls")).json()["calls"][0]["speaking"] is None


async def test_a_full_speech_queue_is_429_with_retry_after(api: Api) -> None:
    async with live_call(api) as (session, _):
        long = "This goes on for a good while. " * 6
        statuses = []
        for _ in range(40):
            response = await api.http.post(f"/calls/{session.call_sid}/say", json={"text": long})
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert_error(response, 429, "speech_queue_full")
                assert response.headers["retry-after"] == "1"
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {202}


# -- clear ------------------------------------------------------------------------------------


async def test_clear_while_a_long_utterance_plays(api: Api) -> None:
    sentences = [
        "This first sentence is short.",
        # Long enough (2.9 s) that its audio is still being sent, max_lead ahead, at the clear.
        "The second one takes a good deal longer to say out loud to the caller, " * 4
        + "and ends here.",
        "And a third, which nobody hears.",
    ]
    async with live_call(api) as (session, call):
        first_heard = asyncio.Event()
        session.add_listener(lambda e: first_heard.set() if e.type == "speech.heard" else None)
        said = await api.http.post(
            f"/calls/{session.call_sid}/say", json={"text": " ".join(sentences)}
        )
        async with asyncio.timeout(5):
            await first_heard.wait()
        await asyncio.sleep(0.1)  # into the second sentence
        cleared = await api.http.post(f"/calls/{session.call_sid}/clear")
        assert cleared.status_code == 200
        body = cleared.json()
        assert body["callSid"] == session.call_sid
        [utterance] = body["cleared"]
        assert utterance["id"] == said.json()["id"] and utterance["status"] == "interrupted"
        record = utterance["record"]
        assert record["heard"] == sentences[:1]
        assert record["cut"] == sentences[1] and 0 < record["cutSeconds"] < 1.5
        assert record["unheard"] == sentences[2:]
        await session.hangup()
        report = await call
    assert len(report.clears) == 1
    played = bytes(report.played)
    assert played.startswith(heard_as(sentences[0]))
    assert len(played) < len(heard_as(*sentences[:2]))


# -- events -----------------------------------------------------------------------------------


async def read_events(response: httpx.Response) -> list[tuple[int, str, dict[str, Any]]]:
    """Parse an SSE body into (id, event, data) until the server ends the stream."""
    events = []
    async for block in _sse_blocks(response):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        if fields:
            events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return events


async def _sse_blocks(response: httpx.Response) -> AsyncIterator[str]:
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            yield block


async def test_events_arrive_in_order_and_end_with_call_stopped(api: Api) -> None:
    async with live_call(api) as (session, call):
        sid = session.call_sid
        direct: list[CallEventRecord] = []
        async with api.http.stream("GET", f"/calls/{sid}/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            session.add_listener(direct.append)
            one = (await api.http.post(f"/calls/{sid}/say?wait", json={"text": "One. Two."})).json()
            two = await api.http.post(f"/calls/{sid}/say?wait=1", json={"text": "Three."})
            assert two.json()["status"] == "played"
            await api.http.post(f"/calls/{sid}/hangup")
            async with asyncio.timeout(5):
                events = await read_events(stream)
        await call
    # call.started first (emitted before the call could be found), then exactly what the call
    # emitted, in its order, with ids counting from 1.
    assert session.started_event is not None
    expected = [session.started_event.to_dict()] + [r.to_dict() for r in direct]
    assert [data for _, _, data in events] == expected
    assert events[0][1] == "call.started"
    assert [i for i, _, _ in events] == list(range(1, len(events) + 1))
    assert [kind for _, kind, data in events] == [data["type"] for _, _, data in events]
    times = [data["timestamp"] for _, _, data in events]
    assert times == sorted(times)
    assert events[-1][1] == "call.stopped"
    for utterance, texts in ((one["id"], ["One.", "Two."]), (two.json()["id"], ["Three."])):
        mine = [(kind, d) for _, kind, d in events if d.get("utterance") == utterance]
        assert [kind for kind, _ in mine] == (
            ["speech.started"] + ["speech.heard"] * len(texts) + ["speech.done"]
        )
        assert [d["text"] for kind, d in mine if kind == "speech.heard"] == texts
    # The second utterance was said once the first was done, so its events all follow.
    kinds = [(kind, d.get("utterance")) for _, kind, d in events]
    assert kinds.index(("speech.done", one["id"])) < kinds.index(
        ("speech.started", two.json()["id"])
    )


async def test_event_listener_is_removed_when_the_client_disconnects(api: Api) -> None:
    async with live_call(api) as (session, _):
        # The private list is the thing that must not leak, so the test looks at it.
        before = len(session._listeners)
        async with api.http.stream("GET", f"/calls/{session.call_sid}/events") as stream:
            assert stream.status_code == 200
            assert len(session._listeners) == before + 1
        async with asyncio.timeout(5):
            # Nothing signals a removal; polling is the only outside view of it.
            while len(session._listeners) != before:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


class RecordingSource:
    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def add_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def emit(self, kind: str, **data: Any) -> None:
        for listener in list(self.listeners):
            listener(CallEventRecord(kind, "CA1", "MZ1", 1.0, data))  # type: ignore[arg-type]


async def test_a_slow_subscriber_is_dropped_with_overflow_without_blocking_the_call() -> None:
    source = RecordingSource()
    subscription = EventSubscription(source, limit=3)
    for n in range(10):
        source.emit("dtmf", digit=str(n))  # returns at once even though nobody reads
    assert subscription.overflowed and source.listeners == []
    frames = [f async for f in subscription.frames(heartbeat=5)]
    assert frames[:3] == [
        sse_frame(
            "dtmf", CallEventRecord("dtmf", "CA1", "MZ1", 1.0, {"digit": str(n)}).to_dict(), n + 1
        )
        for n in range(3)
    ]
    assert frames[3].startswith(b"id: 4\nevent: overflow\ndata: {") and len(frames) == 4


async def test_event_stream_pings_when_quiet_and_ends_when_the_call_is_gone() -> None:
    source = RecordingSource()
    alive = [True, True, False]
    subscription = EventSubscription(source)
    frames = [f async for f in subscription.frames(heartbeat=0.01, alive=lambda: alive.pop(0))]
    assert frames == [PING, PING] and source.listeners == [] and subscription.closed


async def test_sse_frame_is_one_line_of_json_per_event() -> None:
    frame = sse_frame("speech.heard", {"text": "two\nlines"}, 7)
    assert frame == b'id: 7\nevent: speech.heard\ndata: {"text":"two\\nlines"}\n\n'


# -- access ---------------------------------------------------------------------------------


async def test_a_configured_token_is_required_even_on_loopback() -> None:
    async with api_server(api_token=TOKEN) as api:
        missing = await api.http.get("/calls")
        assert_error(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == 'Bearer realm="callspeak"'
        wrong = await api.http.get("/calls", headers={"Authorization": "Bearer nope"})
        assert "invalid" in assert_error(wrong, 401, "unauthorized")["message"]
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        basic = await api.http.post("/calls/CAx/say", headers={"Authorization": f"Basic {TOKEN}"})
        assert_error(basic, 401, "unauthorized")
        right = await api.http.get("/calls", headers={"Authorization": f"bearer {TOKEN}"})
        assert right.status_code == 200
        # Checked before anything else: an unknown call is not revealed without the token.
        assert_error(await api.http.get("/calls/CAnope"), 401, "unauthorized")
        assert (await api.http.get("/openapi.json")).status_code == 200  # public, no call data


async def test_without_a_token_loopback_clients_are_served(api: Api) -> None:
    assert (await api.http.get("/calls")).status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)
    assert check_access(None, None, host, "127.0.0.1:5000") is None


@pytest.mark.parametrize("host", ["10.0.0.7", "192.168.1.2", "::ffff:10.0.0.1", "testclient", None])
def test_without_a_token_other_clients_are_refused_with_403(host: str | None) -> None:
    error = check_access(None, f"Bearer {TOKEN}", host, "127.0.0.1:5000")
    assert error is not None and error.status == 403 and error.code == "forbidden"
    assert "CALLSPEAK_API_TOKEN" in error.message


@pytest.mark.parametrize(
    "header",
    [
        "127.0.0.1:5000",
        "127.0.0.1",
        "localhost:5000",
        "LOCALHOST",
        "localhost.",
        "app.localhost",
        "[::1]:5000",
        "[::1]",
        "127.1.2.3:80",
    ],
)
def test_host_headers_naming_this_machine(header: str) -> None:
    assert names_loopback(header)
    assert check_access(None, None, "127.0.0.1", header) is None


@pytest.mark.parametrize(
    "header",
    [
        "calls.example.com",
        "abc.ngrok.app:443",
        "10.0.0.7:5000",
        "[2001:db8::1]:5000",
        "localhost.example.com",
        "evillocalhost",
        "notlocalhost:5000",
        "evil.com:5000",
        "",
        None,
        "[::1",
    ],
)
def test_a_loopback_client_naming_another_host_is_refused_without_a_token(
    header: str | None,
) -> None:
    """A proxy or tunnel on this machine connects from loopback but asks for the public host;
    a page whose name resolves to 127.0.0.1 (DNS rebinding) asks for its own."""
    assert not names_loopback(header)
    error = check_access(None, None, "127.0.0.1", header)
    assert error is not None and error.status == 403 and error.code == "forbidden"
    assert "CALLSPEAK_API_TOKEN" in error.message and "proxy" in error.message


async def test_through_a_same_machine_proxy_the_api_needs_the_token(api: Api) -> None:
    """A proxy on this machine that passes on the public Host (nginx with `proxy_set_header
    Host $host`, ngrok): the request comes from loopback naming the public host; without a
    token it is refused, with X-Forwarded-For it is refused too. (nginx's default Host, its
    upstream's 127.0.0.1:port, cannot be told from a local client: see check_access.)"""
    proxied = await api.http.get("/calls", headers={"Host": "calls.example.com"})
    assert_error(proxied, 403, "forbidden")
    forwarded = await api.http.get("/calls", headers={"X-Forwarded-For": "203.0.113.9"})
    assert "203.0.113.9" in assert_error(forwarded, 403, "forbidden")["message"]
    assert (await api.http.get("/calls")).status_code == 200  # curl on the machine itself
    async with api_server(api_token=TOKEN) as with_token:
        headers = {"Host": "calls.example.com", "Authorization": f"Bearer {TOKEN}"}
        assert (await with_token.http.get("/calls", headers=headers)).status_code == 200


def test_with_a_token_any_client_with_it_is_served() -> None:
    token = SecretStr(TOKEN)
    assert check_access(token, f"Bearer {TOKEN}", "203.0.113.9", "calls.example.com") is None
    assert check_access(token, f"Bearer {TOKEN}", "127.0.0.1", "127.0.0.1:5000") is None
    for header in (
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Token {TOKEN}",
        "Bearer wrong",
        "Bearer sécret",
    ):
        error = check_access(token, header, "127.0.0.1", "127.0.0.1:5000")
        assert error is not None and error.status == 401, header


async def test_a_token_set_with_surrounding_spaces_is_the_token_without_them() -> None:
    async with api_server(api_token=f"  {TOKEN}\n") as api:
        right = await api.http.get("/calls", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200, right.text


def test_an_empty_token_setting_means_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSPEAK_API_TOKEN", "  ")
    assert Settings(validate_signatures=False).api_token is None
    monkeypatch.setenv("CALLSPEAK_API_TOKEN", TOKEN)
    token = Settings(validate_signatures=False).api_token
    assert token is not None and token.get_secret_value() == TOKEN


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/calls/CAnope"),
        ("GET", "/calls/CAnope/utterances/1"),
        ("POST", "/calls/CAnope/say"),
        ("POST", "/calls/CAnope/clear"),
        ("POST", "/calls/CAnope/hangup"),
        ("GET", "/calls/CAnope/events"),
    ],
)
async def test_unknown_call_is_404(api: Api, method: str, path: str) -> None:
    response = await api.http.request(method, path, json={"text": "hello"})
    assert "CAnope" in assert_error(response, 404, "unknown_call")["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/calls/CA1/utterances/abc", 404, "not_found"),
        ("GET", "/calls/CA1/nothing-here", 404, "not_found"),
        ("DELETE", "/calls/CA1", 405, "method_not_allowed"),
        ("PUT", "/calls", 405, "method_not_allowed"),
        ("GET", "/calls/CA1/say", 405, "method_not_allowed"),
        ("POST", "/openapi.json", 405, "method_not_allowed"),
    ],
)
async def test_paths_and_methods_the_api_lacks_answer_in_its_json_error_shape(
    api: Api, method: str, path: str, status: int, code: str
) -> None:
    response = await api.http.request(method, path)
    assert path in assert_error(response, status, code)["message"]
    if status == 405:
        assert "DELETE" not in response.headers["allow"] and response.headers["allow"]


async def test_paths_outside_the_api_keep_plain_text_404_and_405(api: Api) -> None:
    missing = await api.http.get("/nothing-here")
    assert (missing.status_code, missing.text) == (404, "Not Found")
    wrong = await api.http.delete("/healthz")
    assert (wrong.status_code, wrong.text) == (405, "Method Not Allowed")
    assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert (await api.http.put("/voice")).text == "Method Not Allowed"


async def test_invalid_bodies_are_422_with_pydantic_errors(api: Api) -> None:
    async with live_call(api) as (session, _):
        say = f"/calls/{session.call_sid}/say"
        cases: list[tuple[bytes | dict[str, Any] | list[Any], str, str]] = [
            ({"text": ""}, "invalid_request", "string_too_short"),
            ({"text": " \n\t "}, "invalid_request", "string_too_short"),
            ({"text": "x" * 5001}, "invalid_request", "string_too_long"),
            ({"text": 5}, "invalid_request", "string_type"),
            ({"text": "hi", "interruptible": "yes"}, "invalid_request", "bool_type"),
            ({"text": "hi", "interruptable": False}, "invalid_request", "extra_forbidden"),
            ({}, "invalid_request", "missing"),
            (["hi"], "invalid_request", "model_type"),
            (b"{not json", "invalid_json", "json_invalid"),
            (b"", "invalid_json", "json_invalid"),
            (b'{"text": "a\xff"}', "invalid_json", "json_invalid"),  # not UTF-8 (was a 500)
        ]
        for body, code, kind in cases:
            if isinstance(body, bytes):
                response = await api.http.post(say, content=body)
            else:
                response = await api.http.post(say, json=body)
            error = assert_error(response, 422, code)
            assert [e["type"] for e in error["errors"]] == [kind], body
        bad_wait = await api.http.post(f"{say}?wait=maybe", json={"text": "hi"})
        assert_error(bad_wait, 422, "invalid_request")
        bad_hangup = await api.http.post(
            f"/calls/{session.call_sid}/hangup", json={"afterSpeech": "yes"}
        )
        assert_error(bad_hangup, 422, "invalid_request")
        huge = await api.http.post(say, json={"text": "x" * 100_000})
        assert_error(huge, 413, "body_too_large")
        # The bounds themselves are accepted (after stripping).
        edge = await api.http.post(say, json={"text": "  " + "x" * 5000 + "  "})
        assert edge.status_code == 202 and len(edge.json()["text"]) == 5000
        assert session.phase.value == "streaming"  # none of it hurt the call


async def _ended_session(kind: type[CallSession] = CallSession) -> CallSession:
    """A call that has ended but is still registered: the moment before its server drops it."""
    transport = FakeTransport()
    session = kind(transport, FakeProvider(), greeting=None)
    sid = StreamSid("MZended")
    for message in (
        Connected("Call", "1.0.0").to_json(),
        Start(
            1,
            sid,
            AccountSid("AC1"),
            CallSid("CAended"),
            ("inbound",),
            {},
            MediaFormat("audio/x-mulaw", 8000, 1),
        ).to_json(),
        Stop(2, sid, AccountSid("AC1"), CallSid("CAended")).to_json(),
    ):
        transport.push(message)
    async with asyncio.timeout(5):
        await session.run()
    return session


async def test_saying_into_an_ended_call_is_409_and_then_404(api: Api) -> None:
    await api.state.calls.add(await _ended_session())
    response = await api.http.post("/calls/CAended/say", json={"text": "Too late."})
    assert "ended" in assert_error(response, 409, "call_ended")["message"]
    # A real call that ended leaves the registry: from then on it is unknown.
    async with live_call(api) as (session, call):
        await api.http.post(f"/calls/{session.call_sid}/hangup")
        await call
    async with asyncio.timeout(5):
        while api.state.calls.get(session.call_sid) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    gone = await api.http.post(f"/calls/{session.call_sid}/say", json={"text": "Hello?"})
    assert_error(gone, 404, "unknown_call")


# -- documentation ----------------------------------------------------------------------------


def _spec_path(route_path: str) -> str:
    # Starlette's {call_sid} and {utterance_id:int} are the spec's {callSid} and {utteranceId}.
    return re.sub(
        r"\{(\w+?)(?::\w+)?\}",
        lambda m: "{" + re.sub(r"_(\w)", lambda c: c.group(1).upper(), m.group(1)) + "}",
        route_path,
    )


async def test_openapi_describes_exactly_the_mounted_routes(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    mounted = {
        _spec_path(route.path): {m.lower() for m in route.methods or ()} - {"head"}  # type: ignore[attr-defined]
        for route in api_routes()
        if route.path.startswith("/calls")  # type: ignore[attr-defined]
    }
    described = {path: set(ops) for path, ops in spec["paths"].items()}
    assert described == mounted
    schemas = spec["components"]["schemas"]
    for ops in spec["paths"].values():
        for op in ops.values():
            for body in [op.get("requestBody", {})] + list(op["responses"].values()):
                for content in body.get("content", {}).values():
                    ref = content["schema"].get("$ref")
                    assert ref is None or ref.rsplit("/", 1)[1] in schemas, ref
    assert schemas["SayRequest"]["properties"]["text"]["maxLength"] == 5000
    assert schemas["SayRequest"]["required"] == ["text"]
    utterance = spec["paths"]["/calls/{callSid}/utterances/{utteranceId}"]["get"]
    assert "unknown_utterance" in utterance["responses"]["404"]["description"]
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


async def test_docs_page_is_self_contained(api: Api) -> None:
    page = await api.http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    for path in ("/calls/{callSid}/say", "/calls/{callSid}/events", "SayRequest"):
        assert path in page.text
    assert "<script" not in page.text and "http://" not in page.text and "https://" not in page.text


async def test_an_event_stream_whose_client_reads_nothing_is_dropped_and_its_slot_freed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A send that waits longer than the stream's send timeout (a client that stopped reading,
    its network buffers full) ends the response, and the subscriber's slot is given back."""
    from callspeak.api import _EventStreamResponse

    async def frames() -> AsyncIterator[bytes]:
        while True:
            yield b"data: {}\n\n"
            await asyncio.sleep(0)

    closed: list[bool] = []
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and len(sent) > 3:
            await asyncio.Event().wait()  # the client's buffers are full: never drains

    async def receive() -> Any:
        await asyncio.Event().wait()  # no disconnect: the client is there, just not reading

    response = _EventStreamResponse(
        frames(), on_close=lambda: closed.append(True), send_timeout=0.2
    )
    scope = {"type": "http", "client": ("127.0.0.1", 5555), "asgi": {"spec_version": "2.4"}}
    async with asyncio.timeout(5):
        await response(scope, receive, send)
    assert closed == [True]
    assert "read nothing for 0.2 s; dropped" in caplog.text


# -- from a second reading: slots, tokens, body bounds, clients that go away ---------------------


async def test_head_on_an_event_stream_takes_no_subscriber_slot(api: Api) -> None:
    """Starlette runs a GET route for HEAD: each HEAD from a kept-alive client (a monitor, a
    load balancer) held a slot for the rest of the call, and 16 locked every subscriber out."""
    from callspeak.api import MAX_SUBSCRIBERS

    async with live_call(api) as (session, _):
        events = f"/calls/{session.call_sid}/events"
        for _ in range(MAX_SUBSCRIBERS + 2):
            head = await api.http.head(events)
            assert head.status_code == 200
            assert head.headers["content-type"].startswith("text/event-stream")
        async with api.http.stream("GET", events) as stream:
            assert stream.status_code == 200
        assert (await api.http.head("/calls/CAnone/events")).status_code == 404


@pytest.mark.parametrize("token", ["voilà", "ÅngströmÅ", "passé"])
async def test_a_token_ending_in_any_letter_is_accepted(token: str) -> None:
    """The header arrives latin-1 decoded: str.strip() took U+00A0 and U+0085 off the end,
    the last byte of a UTF-8 "à" or "Å"."""
    async with api_server(api_token=token) as api:
        right = await api.http.get("/calls", headers={"Authorization": f"Bearer {token}".encode()})
        wrong = await api.http.get("/calls", headers={"Authorization": b"Bearer x"})
    assert right.status_code == 200
    assert_error(wrong, 401, "unauthorized")


async def test_text_within_the_limit_is_accepted_however_json_escapes_it() -> None:
    """An emoji escaped as Python's json and requests send it is 12 bytes: 9000 of them, under
    a 10 000-character limit, were refused as a body too large."""
    async with api_server(max_text_chars=10_000) as api, live_call(api) as (session, _):
        text = "😀" * 9_000
        body = json.dumps({"text": text}).encode()  # ensure_ascii: "\ud83d\ude00" each
        assert len(body) > 100_000
        said = await api.http.post(
            f"/calls/{session.call_sid}/say",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert said.status_code == 202, said.text
        await session.clear()


async def test_a_client_that_goes_away_mid_body_is_not_logged_as_a_server_error(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    async with live_call(api) as (session, _):
        host, port = api.base_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /calls/{session.call_sid}/say HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"text": '.encode()
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.sleep(0.2)  # the server reads the disconnect
        assert (await api.http.get(f"/calls/{session.call_sid}")).status_code == 200
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


async def test_say_with_interruptible_false_is_spared_by_barge_in(api: Api) -> None:
    """``"interruptible": false`` in the say body reaches the call: the utterance says so, a
    barge-in's clear leaves it alone, and the caller hears it to the end."""
    async with live_call(api) as (session, _):
        r = await api.http.post(
            f"/calls/{session.call_sid}/say", json={"text": "Hi.", "interruptible": False}
        )
        assert r.status_code == 202, r.text
        assert r.json()["interruptible"] is False
        (utterance,) = [u for u in session.utterances if u.id == r.json()["id"]]
        assert not utterance.interruptible
        assert await session.clear(only_interruptible=True, reason="barge-in") == []
        async with asyncio.timeout(5):
            assert await utterance.wait() is SpeechStatus.PLAYED


async def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413(api: Api) -> None:
    """The body limit is inclusive: a body of exactly the limit is read (here padded with JSON
    whitespace), one byte more is refused with 413 before it is parsed."""
    async with live_call(api) as (session, _):
        say = f"/calls/{session.call_sid}/say"
        huge = assert_error(await api.http.post(say, content=b" " * 200_000), 413, "body_too_large")
        limit = int(re.search(r"over (\d+) bytes", huge["message"])[1])  # type: ignore[index]
        body = b'{"text": "Hi."}'
        headers = {"Content-Type": "application/json"}
        exact = await api.http.post(say, content=body.ljust(limit), headers=headers)
        assert exact.status_code == 202, exact.text
        over = await api.http.post(say, content=body.ljust(limit + 1), headers=headers)
        assert_error(over, 413, "body_too_large")
        await session.clear()


async def test_an_utterance_that_just_played_stays_reachable_behind_a_long_queue(api: Api) -> None:
    """Kept: every unfinished utterance, and the last HISTORY (20) *finished* ones. With 25
    queued, the first finishes first: the one finished utterance, yet its Location answered
    404 as soon as it had played (the cap counted the unfinished ones too)."""
    async with live_call(api, duration=20) as (session, _):
        sid = session.call_sid
        locations = []
        for n in range(25):
            r = await api.http.post(f"/calls/{sid}/say", json={"text": f"Number {n}."})
            assert r.status_code == 202, r.text
            locations.append(r.headers["location"])
        first = session.utterances[0]
        await until(lambda: first.status is SpeechStatus.PLAYED)
        response = await api.http.get(locations[0])
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "played"
        await session.hangup()


async def test_the_public_spec_and_its_page_are_built_once_not_on_every_request(api: Api) -> None:
    """/openapi.json and /docs need no token, from any address; each request rebuilt the spec
    from pydantic's JSON schemas (~6 ms of the loop that paces every call's audio)."""
    from callspeak import api as api_module

    api_module._spec_json.cache_clear()
    api_module._docs_page.cache_clear()
    first = await api.http.get("/openapi.json")
    for _ in range(5):
        again = await api.http.get("/openapi.json")
        assert again.status_code == 200 and again.headers["content-type"] == "application/json"
        assert again.content == first.content
        assert (await api.http.get("/docs")).status_code == 200
    assert first.json() == openapi_spec(5000)
    assert api_module._spec_json.cache_info().misses == 1
    assert api_module._docs_page.cache_info().misses == 1


async def test_a_handler_that_fails_answers_in_the_api_error_shape(api: Api) -> None:
    """docs/api.md: every error is ``{"error": {"code", "message"}}``. A handler that raised
    (as POST /clear did with the speaker's TransportClosed) got Starlette's text/plain 500."""

    class FailingSession(CallSession):
        async def clear(self, **_: Any) -> list[Utterance]:
            raise RuntimeError("a bug")

    await api.state.calls.add(await _ended_session(FailingSession))
    error = assert_error(await api.http.post("/calls/CAended/clear"), 500, "internal_error")
    assert "a bug" not in error["message"]  # the log has it; the client gets no internals
