"""Freezing start-up objects out of the garbage collector (callspeak.heap, create_app)."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from callspeak.config import Settings
from callspeak.emulator import DialOptions, dial
from callspeak.events import CallEventRecord
from callspeak.heap import YOUNG_THRESHOLD, collect_young_less_often, freeze_startup_objects
from callspeak.hooks import Call, CallHooks
from callspeak.media_socket import MediaSocket
from callspeak.request_head import BoundedHeadProtocol
from callspeak.server import create_app
from callspeak.session import CallSession
from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.fake_deepgram import FakeDeepgram
from callspeak.tts.base import TTSService
from callspeak.voices import make_engine
from tests.conftest import Serve, serve_app
from tests.fakes import FakeService
from tests.test_server_limits import until


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


class _Watched(CallHooks):
    """An application's hooks: a handler for a key and a listener on the call's events (both
    closures over the call, as an application's are); keeps only weak references itself."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: list[weakref.ref[CallSession]] = []
        self.events: list[str] = []
        self.on_dtmf(self._reply)

    def attach(self, session: CallSession) -> None:
        super().attach(session)
        session.add_listener(lambda event: self._event(session, event))
        self.sessions.append(weakref.ref(session))

    def _event(self, session: CallSession, event: CallEventRecord) -> None:
        self.events.append(event.type)

    async def _reply(self, call: Call, digit: str) -> None:
        await call.say(f"You pressed {digit}.")


@pytest.fixture
def collector_off() -> Iterator[None]:
    """No automatic collection during the test: what it finds freed, reference counting freed."""
    was_on = gc.isenabled()
    gc.disable()
    yield
    if was_on:
        gc.enable()


def _alive(kind: type) -> int:
    """Instances of ``kind`` not yet freed, reachable or not (collection being off)."""
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


@pytest.mark.parametrize("voice", ["fake", "deepgram", "deepgram-ws"])
async def test_an_ended_call_is_freed_at_once_not_left_in_cycles(
    collector_off: None, serve: Serve, voice: str
) -> None:
    """Everything a call made is freed when it ends, by reference counting alone: cycles (the
    session and its socket, the session and its listeners, uvicorn's HTTP protocol and its
    parser after the upgrade) would wait for a collector pass, one that walks every call's
    leftovers at once and holds up every call in progress meanwhile. With each kind of voice
    (Deepgram's on the fake Deepgram, on loopback)."""
    hooks = _Watched()
    async with contextlib.AsyncExitStack() as stack:
        if voice == "fake":
            tts: TTSService = FakeService()
        else:
            fake = FakeDeepgram("test-key", first_byte_delay=0.0)
            dg = await stack.enter_async_context(serve_asgi(fake.app, ws=fake.ws_protocol))
            settings = Settings(
                deepgram_api_key="test-key",
                deepgram_url=dg,
                deepgram_ws_url=dg.replace("http", "ws", 1),
            )
            tts = make_engine(settings, voice)
            stack.push_async_callback(tts.aclose)
        app = create_app(Settings(validate_signatures=False), tts=tts, hooks=hooks)
        await _one_call(serve, app, hooks)


async def _one_call(serve: Serve, app: Any, hooks: _Watched) -> None:
    async with serve(app) as url:
        protocols_before, sockets_before = _alive(BoundedHeadProtocol), _alive(MediaSocket)
        await dial(
            DialOptions(
                url=url.replace("http", "ws") + "/twilio",
                parameters={"say": "Hello."},
                dtmf=[(0.3, "5")],
                quiet_seconds=0.3,
            )
        )
        state = app.state.callspeak
        await until(lambda: state.calls.connections == 0 and len(state.calls) == 0)
        assert hooks.events[-1] == "call.stopped" and "dtmf" in hooks.events
        await until(lambda: all(ref() is None for ref in hooks.sessions), seconds=2.0)
        assert len(hooks.sessions) == 1
        assert _alive(BoundedHeadProtocol) <= protocols_before
        assert _alive(MediaSocket) <= sockets_before
