"""The emulator's own client text frames, read back by websockets' frame parser."""

from __future__ import annotations

import os

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from callspeak.emulator import frames as frames_module
from callspeak.emulator.frames import ClientTextFrames


def parse_client_frame(data: bytes) -> tuple[Frame, bytes]:
    """(the frame as a server reads it, the bytes left after it)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=True, max_size=None)
    with pytest.raises(StopIteration) as stop:
        next(parser)
    return stop.value.value, data[len(data) - len(reader.buffer) :]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 371, 65535, 65536, 70_000])
def test_a_frame_is_one_whole_masked_text_message(size: int) -> None:
    payload = bytes(i % 94 + 33 for i in range(size))  # printable ASCII
    frame, rest = parse_client_frame(ClientTextFrames().frame(payload))
    assert (frame.opcode, frame.fin, frame.data, rest) == (Opcode.TEXT, True, payload, b"")
    assert not (frame.rsv1 or frame.rsv2 or frame.rsv3)


def test_every_frame_has_a_fresh_key_from_urandom_drawn_in_bulk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws: list[int] = []
    real_urandom = os.urandom

    def urandom(n: int) -> bytes:
        draws.append(n)
        return real_urandom(n)

    monkeypatch.setattr(frames_module.os, "urandom", urandom)
    builder = ClientTextFrames(keys_per_draw=3)
    payload = b'{"event": "media"}'
    written = [builder.frame(payload) for _ in range(7)]
    assert draws == [12, 12, 12]  # 3 keys a draw: frames 1-3, 4-6, 7
    keys = [frame[2:6] for frame in written]
    assert len(set(keys)) == 7
    assert all(parse_client_frame(frame)[0].data == payload for frame in written)
