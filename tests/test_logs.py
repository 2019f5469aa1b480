"""Log lines name the call: text and JSON formats."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from callspeak.logs import LOG_QUEUE_LIMIT, configure_logging, flush_logs


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_call_ids_and_omit_missing_ones(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = logging.getLogger("callspeak.test")
    log.info("stream started", extra={"call_sid": "CA1", "stream_sid": "MZ1"})
    log.warning("no call here")
    assert flush_logs()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["call_sid"] == "CA1" and first["stream_sid"] == "MZ1"
    assert first["level"] == "info" and first["message"] == "stream started"
    assert "call_sid" not in second and second["level"] == "warning"


def test_text_lines_show_call_ids(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("debug", "text", stream=out)
    logging.getLogger("callspeak.test").info(
        "hello", extra={"call_sid": "CA9", "stream_sid": "MZ9"}
    )
    logging.getLogger("callspeak.test").info("bare")
    assert flush_logs()
    lines = out.getvalue().splitlines()
    assert "[CA9 MZ9] hello" in lines[0] and "[- -] bare" in lines[1]


def test_a_voice_failing_mid_call_is_logged_with_the_call_ids(restore_root: None) -> None:
    """The voices know nothing of calls; their lines name the call whose speech they make."""
    import asyncio

    from tests.test_session import Harness, every_voice_fails

    out = io.StringIO()
    configure_logging("info", "text", stream=out)

    async def call() -> None:
        chain = every_voice_fails(b"\x01" * 160)
        async with Harness(chain.open(), greeting=None) as h:  # type: ignore[arg-type]
            await h.start_idle()
            await asyncio.wait_for(h.session.say("Seven eleven.").wait(), 5)
        logging.getLogger("callspeak.test").info("after the call")

    asyncio.run(call())
    assert flush_logs()
    lines = out.getvalue().splitlines()
    failures = [line for line in lines if "callspeak.tts" in line]
    assert failures and all("[CAtest MZtest]" in line for line in failures), lines
    assert any("every voice failed" in line for line in failures)
    assert "[- -] after the call" in lines[-1]  # (not a task of the call)


def test_a_voice_warming_up_before_the_start_logs_with_the_call_ids(restore_root: None) -> None:
    """The voice starts connecting as the stream opens, before start names the call; what that
    connect logs once start has come names the call, and what it logged before says so."""
    import asyncio

    from tests.fakes import FakeProvider
    from tests.test_session import Harness

    started = asyncio.Event()

    class SlowToConnect(FakeProvider):
        def warm_up(self) -> None:
            self.connecting = asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            logging.getLogger("callspeak.tts").warning("connecting")
            await started.wait()
            logging.getLogger("callspeak.tts").warning("connect attempt failed")

    out = io.StringIO()
    configure_logging("info", "text", stream=out)

    async def call() -> None:
        provider = SlowToConnect()
        async with Harness(provider, greeting=None) as h:
            await asyncio.sleep(0.01)  # the stream is open, its start not come yet
            await h.start_idle()
            started.set()
            await provider.connecting

    asyncio.run(call())
    assert flush_logs()
    lines = out.getvalue().splitlines()
    [before] = [line for line in lines if line.endswith("connecting")]
    [after] = [line for line in lines if line.endswith("connect attempt failed")]
    assert "[- -]" in before and "[CAtest MZtest]" in after


class StalledReader(io.StringIO):
    """stderr whose reader has stopped reading: every write waits until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


def test_a_log_reader_that_stops_reading_never_blocks_the_logging_thread(
    restore_root: None,
) -> None:
    """The event loop only hands lines over; past the queue's bound they are dropped, counted,
    and said to be once the reader catches up."""
    out = StalledReader()
    configure_logging("info", "text", stream=out)
    log = logging.getLogger("callspeak.test")
    started = time.monotonic()
    for n in range(LOG_QUEUE_LIMIT + 500):
        log.warning("line %d", n)
    assert time.monotonic() - started < 5  # (a blocked write would have waited 10 s per line)
    out.release.set()  # the reader catches up...
    assert flush_logs(10)
    log.warning("after")  # ...and the next line says what was lost
    assert flush_logs(10)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("line 0")
    dropped = [line for line in lines if "dropped" in line]
    assert len(dropped) == 1 and "whatever reads this log is not keeping up" in dropped[0]
    assert lines[-1].endswith("after")
    assert LOG_QUEUE_LIMIT - 2 <= len(lines) - 2 <= LOG_QUEUE_LIMIT + 1


def test_an_exception_logged_in_json_keeps_its_own_field(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("callspeak.test").exception("it failed")
    assert flush_logs()
    [entry] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert entry["message"] == "it failed"
    assert "ValueError: boom" in entry["exception"]


def test_a_process_whose_log_reader_is_stuck_still_exits() -> None:
    """`callspeak serve` on SIGTERM, its log shipper stuck: the lines still queued get 2 s, and
    the process ends (logging's own shutdown would wait for a blocked handler for good)."""
    import subprocess
    import sys

    child = """
import logging
from callspeak.logs import configure_logging
configure_logging("info", "text")
for n in range(3000):
    logging.getLogger("callspeak.test").warning("line %d of a log nobody reads", n)
"""
    # stderr is a pipe this test never reads: its buffer fills after some hundreds of lines.
    proc = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE)
    try:
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_ids_from_the_peer_cannot_forge_lines(restore_root: None) -> None:
    """The ids come from the peer's start: a line break in one started a forged line, on every
    line of that call. Anything not printable is escaped, and a long id is cut."""
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    forged = "CA1\n2026-01-01 00:00:00,000 ERROR   callspeak.server [CAx MZx] rotate the keys"
    logging.getLogger("callspeak.test").info(
        "stream started", extra={"call_sid": forged, "stream_sid": "MZ" + "9" * 500}
    )
    assert flush_logs()
    [line] = out.getvalue().splitlines()
    assert "[CA1\\n2026-01-01\\x2000:00:00,000\\x20ERROR" in line
    assert "MZ" + "9" * 62 + "…] stream started" in line


def test_ids_with_spaces_are_escaped_and_a_64_character_id_is_kept_whole(
    restore_root: None,
) -> None:
    """A space alone (printable) would let an id pass for two: "[CA1 MZ2] x MZ…]"."""
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    whole = "MZ" + "7" * 62
    logging.getLogger("callspeak.test").info(
        "hi", extra={"call_sid": "CA1 MZ2] forged", "stream_sid": whole}
    )
    assert flush_logs()
    [line] = out.getvalue().splitlines()
    assert f"[CA1\\x20MZ2]\\x20forged {whole}] hi" in line


def test_a_hooks_own_lines_carry_the_call_ids(restore_root: None) -> None:
    """An application's handler runs in a task of the call: its lines were "[- -]"."""
    import asyncio

    from callspeak.config import Settings
    from callspeak.emulator import DialOptions, dial
    from callspeak.hooks import Call, CallHooks
    from callspeak.server import create_app
    from tests.conftest import serve_app
    from tests.fakes import FakeService

    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    hooks = CallHooks()

    @hooks.on_start
    async def greet(call: Call) -> None:
        logging.getLogger("myapp").info("greeting the caller")
        raise RuntimeError("the application's bug")

    async def call() -> tuple[str, str]:
        app = create_app(Settings(validate_signatures=False), tts=FakeService(), hooks=hooks)
        async with serve_app(app) as url:
            report = await dial(
                DialOptions(url=url.replace("http", "ws") + "/twilio", duration=0.3)
            )
        return report.call_sid, report.stream_sid

    call_sid, stream_sid = asyncio.run(call())
    assert flush_logs()
    lines = out.getvalue().splitlines()
    mine = [line for line in lines if "greeting the caller" in line or "handler failed" in line]
    assert len(mine) == 2 and all(f"[{call_sid} {stream_sid}]" in line for line in mine), lines


def test_a_log_budget_writes_some_lines_a_window_then_says_how_many_it_held_back() -> None:
    from callspeak.logs import LogBudget, held_back

    now = [0.0]
    budget = LogBudget(per_window=3, window=60.0, clock=lambda: now[0])
    assert [budget.take("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take("b") == 0  # each kind its own ration
    now[0] = 60.0  # a window is 60 s: the next one begins here
    assert budget.take("a") == 2 and budget.take("a") == 0
    assert held_back(2) == " (and 2 more like it not logged)" and held_back(0) == ""


def test_a_calls_task_names_show_its_id_escaped() -> None:
    """Task names carry the call's id and reach log lines ("task … of the call did not end")."""
    import asyncio

    from callspeak.config import Settings
    from callspeak.emulator import DialOptions, dial
    from callspeak.hooks import Call, CallHooks
    from callspeak.server import create_app
    from tests.conftest import serve_app
    from tests.fakes import FakeService

    hooks = CallHooks()
    names: list[str] = []

    @hooks.on_start
    async def note(call: Call) -> None:
        names.extend(task.get_name() for task in asyncio.all_tasks())

    async def call() -> None:
        app = create_app(Settings(validate_signatures=False), tts=FakeService(), hooks=hooks)
        async with serve_app(app) as url:
            options = DialOptions(
                url=url.replace("http", "ws") + "/twilio", call_sid="CA1\nforged", duration=0.3
            )
            await dial(options)

    asyncio.run(call())
    ours = [name for name in names if name.startswith(("hooks-", "speaker-"))]
    assert ours and all("CA1\\nforged" in name and "\n" not in name for name in ours), names
