"""The whole bridge over real sockets: server on loopback, emulated Twilio calls, real voice."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import websockets

from callspeak.audio.mulaw import decode
from callspeak.emulator import DialOptions, dial
from callspeak.protocol import (
    AccountSid,
    CallSid,
    Connected,
    Media,
    MediaFormat,
    Start,
    Stop,
    StreamSid,
    parse_outbound,
)
from callspeak.tts.piper import PiperService, split_first_clause
from callspeak.tts.sentences import split_sentences
from tests.conftest import RunningServer


def rendered(piper: PiperService, text: str) -> bytes:
    """What the voice produces for ``text``, sentence by sentence, padded to whole frames."""
    out = b""
    for index, sentence in enumerate(split_sentences(text)):
        pieces = split_first_clause(sentence) if index == 0 else [sentence]  # as the voice does
        audio = b"".join(piper.render_sentence(piece) for piece in pieces)
        out += audio + b"\xff" * (-len(audio) % 160)
    return out


def rms(mulaw: bytes) -> float:
    return float(np.sqrt(np.mean(decode(np.frombuffer(mulaw, np.uint8)).astype(np.float64) ** 2)))


async def test_dialed_call_hears_exactly_its_sentence(
    piper_server: RunningServer, piper: PiperService, tmp_path: object
) -> None:
    text = "Your code is 4 7 1 1"
    report = await dial(DialOptions(url=piper_server.ws_url, parameters={"say": text}))
    assert report.first_audio_at is not None and report.first_audio_at < 2.0
    expected = rendered(piper, text)
    # Byte for byte what the voice rendered: no header, no lost or reordered frames.
    assert report.speech.rstrip(b"\xff") == expected.rstrip(b"\xff")
    assert b"RIFF" not in bytes(report.heard)
    assert 1.0 < report.seconds_heard < 4.0
    assert rms(report.speech) > 1000  # speech, not silence
    assert report.gaps() == []
    assert [m.flushed for m in report.marks] == [False]
    assert report.marks[0].echoed_at is not None
    assert report.warnings == []


async def test_twenty_simultaneous_calls_each_hear_their_own_text_without_gaps(
    piper_server: RunningServer, piper: PiperService
) -> None:
    long_text = (
        "This caller has been listening for a while. The server keeps talking to them. "
        "Meanwhile many other calls arrive at once. Every sentence must still flow without a gap. "
        "That is the point of this test."
    )
    speaking = asyncio.create_task(
        dial(DialOptions(url=piper_server.ws_url, parameters={"say": long_text}))
    )
    async with asyncio.timeout(10):
        session = await piper_server.state.calls.wait_for()
        started = asyncio.Event()
        session.add_listener(lambda e: started.set() if e.type == "speech.started" else None)
        await started.wait()
    texts = [f"Caller {n}, your number is {n * 7 % 10} {n % 10} {n * 3 % 10}." for n in range(20)]
    others = await asyncio.gather(
        *(dial(DialOptions(url=piper_server.ws_url, parameters={"say": t})) for t in texts)
    )
    first = await speaking
    for text, report in zip(texts, others, strict=True):
        assert report.first_audio_at is not None, text
        assert report.played.rstrip(b"\xff") == rendered(piper, text).rstrip(b"\xff"), text
    # The call that was already speaking never ran dry while twenty others were synthesised.
    # (When each run of audio began arriving tells a late send from a late read.)
    assert first.gaps() == [], (first.timeline(), first.audio_starts[:5], first.media_messages)
    # A silence the caller hung up in (a second of it, once every mark had echoed) is no gap to
    # gaps(), which sees only silence between audio: it shows as sentences never heard.
    assert len(first.marks) == len(split_sentences(long_text)), first.timeline()
    assert first.speech.rstrip(b"\xff") == rendered(piper, long_text).rstrip(b"\xff")


async def test_bad_input_is_survived_by_the_call_and_its_neighbour(
    piper_server: RunningServer,
) -> None:
    neighbour = asyncio.create_task(
        dial(DialOptions(url=piper_server.ws_url, parameters={"say": "I am the neighbour."}))
    )
    sid = StreamSid("MZbad")
    async with websockets.connect(piper_server.ws_url, max_size=None) as ws:
        await ws.send(Connected("Call", "1.0.0").to_json())
        await ws.send(Media(1, sid, "inbound", 1, 0, b"\xff" * 160).to_json())  # before start
        await ws.send(
            Start(
                2,
                sid,
                AccountSid("ACbad"),
                CallSid("CAbad"),
                ("inbound",),
                {"say": "Still here."},
                MediaFormat("audio/x-mulaw", 8000, 1),
            ).to_json()
        )
        for junk in [
            b"\x00binary",
            "{this is not json",
            json.dumps({"event": "teleport", "streamSid": sid}),
            Media(3, StreamSid("MZsomeoneelse"), "inbound", 2, 20, b"\xff").to_json(),
            json.dumps({"event": "media", "streamSid": sid, "media": {"payload": "!!"}}),
            json.dumps({"event": "media", "streamSid": sid, "media": {"payload": "A" * 200_000}}),
        ]:
            await ws.send(junk)
        kinds: list[str] = []
        audio = b""
        async with asyncio.timeout(10):
            while "mark" not in kinds:
                message = parse_outbound(await ws.recv())
                kind = type(message).__name__
                kinds.append("mark" if kind == "OutboundMark" else kind)
                if kind == "OutboundMedia":
                    audio += message.payload  # type: ignore[union-attr]
        assert len(audio) > 4000 and rms(audio) > 1000
        session = piper_server.state.calls.get("CAbad")
        assert session is not None and session.rejected == 7
        await ws.send(Stop(9, sid, AccountSid("ACbad"), CallSid("CAbad")).to_json())
    report = await neighbour
    assert report.first_audio_at is not None and report.gaps() == [] and report.warnings == []
    async with httpx.AsyncClient(base_url=piper_server.base_url) as client:
        metrics = (await client.get("/metrics")).text
    assert "callspeak_protocol_errors_total" in metrics


async def test_health_metrics_and_twiml(piper_server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=piper_server.base_url) as client:
        health = (await client.get("/healthz")).json()
        assert health == {"status": "ok", "voice": "piper", "missing": [], "calls": 0}
        twiml = await client.post("/voice", headers={"host": "calls.example.com"})
        assert twiml.status_code == 200
        assert twiml.headers["content-type"].startswith("application/xml")
        assert '<Connect><Stream url="wss://calls.example.com/twilio"' in twiml.text
        assert "<Start>" not in twiml.text


async def test_server_close_ends_the_emulated_call(piper_server: RunningServer) -> None:
    call = asyncio.create_task(
        dial(DialOptions(url=piper_server.ws_url, parameters={"say": "Goodbye now."}))
    )
    async with asyncio.timeout(10):
        session = await piper_server.state.calls.wait_for()
    await session.hangup(after_speech=True, grace=10)
    report = await call
    assert report.ended_by == "server"
    assert report.marks and report.marks[-1].echoed_at is not None
    assert base64  # imported for payload checks in other tests
