"""Frame boundaries and unmasking of client frames (frame_reader.py), bytes in, values out."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from callspeak.emulator.frames import ClientTextFrames
from callspeak.frame_reader import WHOLE_TEXT, frame_at, unmask


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_every_length_form_is_found_whole_and_unmasked(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = ClientTextFrames().frame(payload)
    found = frame_at(frame, 0)
    assert found is not None
    first, key, start, end = found
    assert (first, end) == (WHOLE_TEXT, len(frame))
    assert start - key == 4 and end - start == size
    assert unmask(frame, found) == payload


def test_a_header_cut_anywhere_is_incomplete_and_the_payload_may_still_be_arriving() -> None:
    frame = ClientTextFrames().frame(b"x" * 300)  # 2 + 2 + 4 bytes of header
    for cut in range(8):
        assert frame_at(frame[:cut], 0) is None
    found = frame_at(frame[:9], 0)
    assert found is not None and found[3] == len(frame)  # beyond the 9 bytes there are


def test_frames_are_found_one_after_another_and_unmasked_ones_say_so() -> None:
    frames = ClientTextFrames()
    stream = frames.frame(b"one") + frames.frame(b"two")
    first = frame_at(stream, 0)
    assert first is not None
    second = frame_at(stream, first[3])
    assert second is not None and unmask(stream, second) == b"two"
    unmasked = Frame(Opcode.BINARY, b"abc").serialize(mask=False)
    found = frame_at(unmasked, 0)
    assert found == (0x82, -1, 2, 5)


@pytest.mark.parametrize("size", [300, 70000])
def test_an_unmasked_header_cut_anywhere_is_incomplete(size: int) -> None:
    """No masking key to wait for: the extended length alone must be waited for whole."""
    frame = Frame(Opcode.BINARY, b"x" * size).serialize(mask=False)
    header = 4 if size < 65536 else 10
    for cut in range(header):
        assert frame_at(frame[:cut], 0) is None
    assert frame_at(frame[:header], 0) == (0x82, -1, header, header + size)
