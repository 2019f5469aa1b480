"""The emulator's model of Twilio's playback buffer and its report (pure)."""

from __future__ import annotations

from callspeak.emulator.playback import PlaybackBuffer
from callspeak.emulator.report import CallReport, Gap


def test_mark_echoes_only_after_the_audio_before_it_played() -> None:
    buf = PlaybackBuffer()
    buf.add_audio(b"\x01" * 300)
    assert buf.add_mark("m1") == []
    frame, taken, echoed = buf.play(160)
    assert (frame, taken, echoed) == (b"\x01" * 160, 160, [])
    frame, taken, echoed = buf.play(160)
    assert taken == 140 and frame == b"\x01" * 140 + b"\xff" * 20 and echoed == []
    # That frame plays until the next tick: the echo comes then, not while it plays.
    frame, taken, echoed = buf.play(160)
    assert (taken, echoed) == (0, ["m1"])


def test_a_mark_sent_while_the_last_frame_plays_echoes_once_it_has_played() -> None:
    buf = PlaybackBuffer()
    buf.add_audio(b"\x01" * 160)
    assert buf.play(160)[1:] == (160, [])
    assert buf.buffered == 0
    assert buf.add_mark("end") == []  # nothing queued, but the frame is still playing
    assert buf.pending_marks == ("end",)
    assert buf.play(160)[1:] == (0, ["end"])
    assert buf.add_mark("idle") == ["idle"]  # nothing queued or playing: at once


def test_mark_with_nothing_queued_echoes_at_once_and_marks_keep_order() -> None:
    buf = PlaybackBuffer()
    assert buf.add_mark("now") == ["now"]
    buf.add_audio(b"\x02" * 160)
    buf.add_mark("a")
    buf.add_mark("b")  # no audio between a and b: both echo together, in order
    assert buf.play(160)[2] == []
    assert buf.play(160)[2] == ["a", "b"]


def test_clear_drops_audio_and_echoes_pending_marks() -> None:
    buf = PlaybackBuffer()
    buf.add_audio(b"\x03" * 1000)
    buf.add_mark("x")
    buf.add_audio(b"\x03" * 1000)
    buf.add_mark("y")
    buf.play(160)
    assert buf.clear() == ["x", "y"]
    assert buf.buffered == 0
    frame, taken, echoed = buf.play(160)
    assert taken == 0 and frame == b"\xff" * 160 and echoed == []
    buf.add_audio(b"\x04" * 10)
    buf.add_mark("z")
    assert buf.play(160)[2] == []
    assert buf.play(160)[2] == ["z"]
    buf.add_audio(b"\x05" * 160)
    buf.play(160)
    assert buf.clear() == [] and buf.add_mark("after clear") == ["after clear"]


def test_buffer_refuses_audio_past_its_limit() -> None:
    buf = PlaybackBuffer(max_bytes=320)
    assert buf.add_audio(b"\x05" * 320)
    assert not buf.add_audio(b"\x05")
    assert buf.overflowed_bytes == 1 and buf.buffered == 320


def test_long_playback_compacts_without_losing_bytes() -> None:
    buf = PlaybackBuffer()
    data = bytes(i % 251 for i in range(200_000))
    buf.add_audio(data)
    out = b"".join(buf.play(160)[0] for _ in range(1250))
    assert out == data


def test_report_gaps_and_speech_window() -> None:
    report = CallReport("CA1", "MZ1")
    ticks = [0, 0, 160, 160, 0, 80, 160, 0, 0]
    report.played_per_tick = ticks
    report.heard = bytearray(b"".join(bytes([n % 256]) * 160 for n in range(len(ticks))))
    # Silence before the first and after the last audio is not a gap; the hole in between is.
    assert report.gaps() == [Gap(0.08, (160 + 80) / 8000)]
    assert report.seconds_heard == (160 * 3 + 80) / 8000
    assert report.speech == bytes(report.heard[2 * 160 : 7 * 160])
    report.clears = [0.06]  # in the tick of a clear and the next, silence is intended
    assert report.gaps() == [Gap(0.1, 80 / 8000)]
    assert "summary:" in report.timeline()


def test_a_gap_before_the_last_partial_frame_counts_and_that_frame_does_not() -> None:
    report = CallReport("CA1", "MZ1")
    report.played_per_tick = [160, 0, 0, 80]
    report.heard = bytearray(160 * 4)
    assert report.gaps() == [Gap(0.02, 320 / 8000)]
    report.played_per_tick = [160, 80]
    assert report.gaps() == []


def test_an_underrun_that_a_clear_ends_is_still_a_gap() -> None:
    """Only the moments right after a clear are excluded: the silence heard before it counts,
    whether or not the clear's own tick happened to play audio."""
    report = CallReport("CA1", "MZ1")
    report.heard = bytearray(160 * 9)
    report.clears = [0.101]  # received during tick 5
    report.played_per_tick = [160, 0, 0, 0, 0, 160, 0, 160, 160]
    assert report.gaps() == [Gap(0.02, 4 * 160 / 8000)]
    report.played_per_tick = [160, 0, 0, 0, 0, 0, 0, 160, 160]  # the clear's tick was silent
    assert report.gaps() == [Gap(0.02, 4 * 160 / 8000)]
