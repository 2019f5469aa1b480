"""Shared fixtures: one Piper voice per test run (loading it takes ~0.5 s), servers on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from callspeak.cli import uvicorn_options
from callspeak.config import Settings
from callspeak.logs import stop_log_writer
from callspeak.server import create_app
from callspeak.testing.asgi_server import serve_asgi
from callspeak.testing.certificates import self_signed_certificate
from callspeak.testing.fake_deepgram import FakeDeepgram
from callspeak.tts.piper import PiperService


@pytest.fixture(autouse=True)
def _no_configuration_from_the_developer_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: a developer's TWILIO_AUTH_TOKEN or CALLSPEAK_* must not
    change what a test sees. Tests set what they need with ``monkeypatch.setenv``."""
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith(("CALLSPEAK_", "TWILIO_", "DEEPGRAM_")):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A command a test runs (``main([...])``) sets logging up for the whole process: undone
    after the test, lest later tests' lines go through its writer thread to a capture that has
    been closed."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    if root.handlers != handlers:
        stop_log_writer()
        root.handlers[:] = handlers
        root.setLevel(level)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """asyncio's loop, or uvloop — the loop ``callspeak serve`` runs on — when
    ``TEST_EVENT_LOOP=uvloop`` (``make test`` runs the socket-level tests both ways).

    The loops run in debug mode (``asyncio_debug``), whose warning for a step over 100 ms would
    time the test machine's load (coverage, two passes on two cores) rather than our code, and
    land in the tests that read what a command printed: the bar is a second here.
    """
    if os.environ.get("TEST_EVENT_LOOP") == "uvloop":
        import uvloop

        return {"uvloop": partial(_tolerant, uvloop.new_event_loop)}
    return {"asyncio": partial(_tolerant, asyncio.new_event_loop)}


def _tolerant(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> asyncio.AbstractEventLoop:
    loop = new_loop()
    loop.slow_callback_duration = SLOW_STEP_SECONDS
    return loop


#: A loop step that takes longer is logged (by asyncio's debug mode) as blocking the loop.
SLOW_STEP_SECONDS = 1.0


@pytest.fixture(scope="session")
def piper() -> Iterator[PiperService]:
    """The real offline voice, started once and shared (apps do not close injected services)."""
    service = PiperService()
    asyncio.run(service.start())
    yield service
    asyncio.run(service.aclose())


@pytest.fixture
def fake() -> FakeDeepgram:
    """A fake Deepgram with no first-byte delay (tests of the Deepgram clients and of the fake);
    modules testing another fake define their own ``fake``."""
    return FakeDeepgram(first_byte_delay=0.0)


@pytest.fixture
async def base(fake: FakeDeepgram) -> AsyncIterator[str]:
    """``fake`` served on loopback: its ``http://`` base URL."""
    async with serve_asgi(fake.app, ws=fake.ws_protocol) as url:
        yield url


def serving_options(app: Any, **config: Any) -> dict[str, Any]:
    """What ``callspeak serve`` gives uvicorn for ``app`` (so ``/twilio`` takes the native path),
    minus the address — serve_asgi picks a free port — and with ``config`` on top."""
    options = uvicorn_options(app.state.callspeak.settings, app)
    # (and serve_asgi's own shutdown bound: a test's stalled peer is cut off after 2 s)
    for key in ("host", "port", "log_level", "timeout_graceful_shutdown"):
        options.pop(key)
    return {**options, **config}


def serve_app(app: Any, **config: Any) -> AbstractAsyncContextManager[str]:
    """Serve a callspeak app on loopback as ``callspeak serve`` would; yields the base URL."""
    return serve_asgi(app, **serving_options(app, **config))


Serve = Callable[..., AbstractAsyncContextManager[str]]


def serve_app_over_asgi(app: Any, **config: Any) -> AbstractAsyncContextManager[str]:
    """As :func:`serve_app`, but ``/twilio`` through the app's ASGI route (any ASGI server)."""
    return serve_asgi(app, **serving_options(app, ws="websockets-sansio", **config))


@pytest.fixture(params=["native", "asgi"])
def serve(request: pytest.FixtureRequest) -> Serve:
    """Both ways a callspeak app serves ``/twilio``: as ``callspeak serve`` does (no ASGI) and
    through its ASGI route. Tests of admission and limits run on both."""
    return serve_app if request.param == "native" else serve_app_over_asgi


class RunningServer:
    def __init__(self, base_url: str, app: object) -> None:
        self.base_url = base_url
        self.ws_url = base_url.replace("http", "ws", 1) + "/twilio"
        self.app = app

    @property
    def state(self):  # type: ignore[no-untyped-def]
        return self.app.state.callspeak  # type: ignore[attr-defined]


@pytest.fixture
async def piper_server(piper: PiperService) -> AsyncIterator[RunningServer]:
    app = create_app(Settings(validate_signatures=False), tts=piper)
    async with serve_app(app) as url:
        yield RunningServer(url, app)


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 and localhost."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))
