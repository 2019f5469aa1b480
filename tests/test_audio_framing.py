"""Framer and SampleAligner under random chunkings: nothing lost, nothing reordered."""

from __future__ import annotations

import random

import pytest

from callspeak.audio.framing import Framer, SampleAligner
from callspeak.audio.mulaw import MULAW_SILENCE

SEEDS = range(40)


def chunk(data: bytes, rng: random.Random, largest: int = 500) -> list[bytes]:
    pieces, start = [], 0
    while start < len(data):
        end = start + rng.randint(0, largest)  # zero-length chunks included on purpose
        pieces.append(data[start:end])
        start = end
    return pieces


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(0, 3000))


# --- Framer ---


@pytest.mark.parametrize("seed", SEEDS)
def test_framer_unpadded_output_concatenates_to_input(seed: int) -> None:
    rng = random.Random(seed)
    data = random_bytes(rng)
    framer = Framer()
    frames = [f for piece in chunk(data, rng) for f in framer.push(piece)]
    frames += framer.flush(pad=False)
    assert b"".join(frames) == data
    assert all(len(f) == 160 for f in frames[:-1])
    assert not frames or 0 < len(frames[-1]) <= 160


@pytest.mark.parametrize("seed", SEEDS)
def test_framer_padded_output_is_whole_frames_with_silence(seed: int) -> None:
    rng = random.Random(seed)
    data = random_bytes(rng)
    frame_bytes = rng.choice([1, 7, 160, 320])
    framer = Framer(frame_bytes)
    frames = [f for piece in chunk(data, rng) for f in framer.push(piece)]
    assert framer.pending == len(data) % frame_bytes
    frames += framer.flush()
    joined = b"".join(frames)
    assert all(len(f) == frame_bytes for f in frames)
    assert joined[: len(data)] == data
    assert joined[len(data) :] == bytes([MULAW_SILENCE]) * (len(joined) - len(data))
    assert len(joined) - len(data) < frame_bytes
    assert framer.pending == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_framer_push_returns_every_frame_as_soon_as_complete(seed: int) -> None:
    rng = random.Random(seed)
    framer, seen = Framer(), 0
    for piece in chunk(random_bytes(rng), rng):
        seen += len(piece)
        emitted_before = seen - len(piece) - (seen - len(piece)) % 160
        frames = framer.push(piece)
        assert len(frames) == (seen - emitted_before) // 160
        assert framer.pending == seen % 160


def test_framer_flush_with_nothing_held_is_empty() -> None:
    framer = Framer()
    assert framer.flush() == []
    assert framer.flush(pad=False) == []
    assert framer.push(b"x" * 320) == [b"x" * 160, b"x" * 160]
    assert framer.flush() == []


def test_framer_flush_pads_a_short_tail() -> None:
    framer = Framer()
    assert framer.push(b"\x01\x02\x03") == []
    assert framer.pending == 3
    assert framer.flush() == [b"\x01\x02\x03" + b"\xff" * 157]
    assert framer.pending == 0
    assert framer.push(b"\x09") == []
    assert framer.flush(pad=False) == [b"\x09"]


@pytest.mark.parametrize("bad", [0, -160])
def test_framer_refuses_non_positive_size(bad: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        Framer(bad)


# --- SampleAligner ---


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_aligner_emits_whole_samples_in_order(seed: int, width: int) -> None:
    rng = random.Random(seed)
    data = random_bytes(rng)
    aligner = SampleAligner(width)
    out = []
    for piece in chunk(data, rng, largest=9):
        emitted = aligner.push(piece)
        assert len(emitted) % width == 0
        assert aligner.pending < width
        out.append(emitted)
    tail = aligner.flush()
    whole = len(data) - len(data) % width
    assert b"".join(out) == data[:whole]
    assert tail == data[whole:]
    assert aligner.pending == 0


def test_aligner_carries_an_odd_byte() -> None:
    aligner = SampleAligner()
    assert aligner.push(b"\x01\x02\x03") == b"\x01\x02"
    assert aligner.pending == 1
    assert aligner.push(b"\x04") == b"\x03\x04"
    assert aligner.push(b"\x05") == b""
    assert aligner.flush() == b"\x05"
    assert aligner.flush() == b""
    assert aligner.push(b"\x06\x07") == b"\x06\x07"


def test_aligner_refuses_non_positive_width() -> None:
    with pytest.raises(ValueError, match="positive"):
        SampleAligner(0)
