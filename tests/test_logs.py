"""Log lines name the call: text and JSON formats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from callspeak.logs import configure_logging


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
    lines = out.getvalue().splitlines()
    assert "[CA9 MZ9] hello" in lines[0] and "[- -] bare" in lines[1]
