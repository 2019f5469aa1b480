"""Freezing start-up objects out of the garbage collector (callspeak.heap, create_app)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import httpx
import pytest

from callspeak.config import Settings
from callspeak.heap import freeze_startup_objects
from callspeak.server import create_app
from tests.conftest import serve_app
from tests.fakes import FakeService


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Each test starts and ends with nothing frozen (the test process owns its heap)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_garbage_is_collected_first_and_live_objects_are_frozen(unfrozen: None) -> None:
    garbage, kept = _Node(), _Node()
    garbage.other, kept.other = _Node(), _Node()
    garbage.other.other = garbage  # a cycle only the collector can free
    gone = weakref.ref(garbage)
    del garbage
    frozen = freeze_startup_objects()
    assert gone() is None  # collected, not frozen
    assert frozen == gc.get_freeze_count() > 0
    # a full collection now walks only what was made after the freeze
    assert all(obj is not kept for obj in gc.get_objects(generation=2))
    gc.unfreeze()
    assert any(obj is kept for obj in gc.get_objects(generation=2))


@pytest.mark.parametrize("freeze", [True, False])
async def test_the_app_freezes_its_start_up_only_when_asked(unfrozen: None, freeze: bool) -> None:
    app = create_app(Settings(validate_signatures=False), tts=FakeService(), freeze_heap=freeze)
    async with serve_app(app) as url, httpx.AsyncClient() as http:
        assert (await http.get(f"{url}/healthz")).status_code == 200
        assert (gc.get_freeze_count() > 0) is freeze
