"""Freezing start-up objects out of the garbage collector (callspeak.heap, create_app)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import httpx
import pytest

from callspeak.config import Settings
from callspeak.heap import YOUNG_THRESHOLD, collect_young_less_often, freeze_startup_objects
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


@pytest.fixture
def thresholds() -> Iterator[None]:
    """Each test ends with the collector's thresholds as it found them."""
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_the_young_generation_is_collected_less_often_and_the_older_ones_as_before(
    thresholds: None,
) -> None:
    gc.set_threshold(700, 10, 10)
    collect_young_less_often()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
    gc.set_threshold(YOUNG_THRESHOLD * 2, 5, 7)
    collect_young_less_often()  # a higher threshold someone chose is kept
    assert gc.get_threshold() == (YOUNG_THRESHOLD * 2, 5, 7)


@pytest.mark.parametrize("own_heap", [True, False])
async def test_the_app_raises_the_young_threshold_only_when_it_owns_the_heap(
    unfrozen: None, thresholds: None, own_heap: bool
) -> None:
    gc.set_threshold(700, 10, 10)
    app = create_app(Settings(validate_signatures=False), tts=FakeService(), freeze_heap=own_heap)
    async with serve_app(app) as url, httpx.AsyncClient() as http:
        assert (await http.get(f"{url}/healthz")).status_code == 200
        assert gc.get_threshold()[0] == (YOUNG_THRESHOLD if own_heap else 700)
