"""CPU cost of one inbound Twilio message on the server's pure path (median of several runs).

Run: ``.venv/bin/python bench/inbound_cost.py [--runs N]``

A call sends ~50 ``media`` messages a second, so at 200 calls this path runs 10,000 times a
second. Prints µs per message for: parsing in Twilio's exact form (the inline fast path) and the
same message with JSON-number counters (the general path), the call state's handling, and the
barge-in detector on silence and on speech-like audio; then what one core could carry at 50
messages a second per call.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from _server import per_call_us
from callspeak.audio.mulaw import pcm16_to_mulaw
from callspeak.bargein import SpeechOnsetDetector
from callspeak.call_state import CallState
from callspeak.protocol import (
    AccountSid,
    CallSid,
    Media,
    MediaFormat,
    Start,
    StreamSid,
    parse_message,
)

N = 20_000
SID = StreamSid("MZ" + "0123456789abcdef" * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs

    silence = bytes([0xFF]) * 160
    twilio_form = Media(41, SID, "inbound", 40, 800, silence).to_json()
    numbers = json.loads(twilio_form)
    numbers["sequenceNumber"] = 41
    numbers["media"]["chunk"] = 40
    general_form = json.dumps(numbers)
    state = CallState()
    state.receive_text(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    start = Start(
        1, SID, AccountSid("AC" + "0" * 32), CallSid("CA" + "0" * 32), ("inbound",), {},
        MediaFormat("audio/x-mulaw", 8000, 1),
    )  # fmt: skip
    state.receive_text(start.to_json())
    rng = np.random.default_rng(0)
    t = np.arange(160) / 8000
    voiced = [
        pcm16_to_mulaw(
            (3000 * np.sin(2 * np.pi * 150 * t + k) + 300 * rng.standard_normal(160))
            .astype("<i2")
            .tobytes()
        )
        for k in range(50)
    ]
    detector = SpeechOnsetDetector()
    frames = iter(voiced * (N * runs // len(voiced) + 1))

    rows = [
        ("parse media, Twilio's form (fast path)", lambda: parse_message(twilio_form)),
        ("parse media, number counters (general path)", lambda: parse_message(general_form)),
        ("call state: parse + apply a media message", lambda: state.receive_text(twilio_form)),
        ("barge-in detector, one silent frame", lambda: detector.feed(silence)),
        ("barge-in detector, one voiced frame", lambda: detector.feed(next(frames))),
    ]
    costs = {}
    for name, work in rows:
        costs[name] = per_call_us(work, runs, N)
        print(f"{name:<48} {costs[name]:6.2f} µs")
    inbound = costs["call state: parse + apply a media message"]
    with_vad = inbound + costs["barge-in detector, one silent frame"]
    print(
        f"pure inbound path per call at 50 msg/s: {inbound * 50 / 1000:.2f} ms CPU/s "
        f"({with_vad * 50 / 1000:.2f} with barge-in on a silent line); "
        f"excludes WebSocket framing and the ASGI server (see bench/deepgram_latency.py)"
    )
    print(f"(median of {runs} runs of {N} messages)")


if __name__ == "__main__":
    main()
