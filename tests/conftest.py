"""Real servers on loopback, started once per run: the standalone simulator as the upstream
and ``tokenrelay serve`` in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The machine running the suite may be busy: judge examples by what they find, not by speed.
settings.register_profile("tokenrelay", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tokenrelay")

from browser import launch
from playwright.sync_api import Browser
from redis_server import RedisServer
from servers import RelayServer, SimServer

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="session")
def log_dir() -> Path:
    path = ARTIFACTS / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def sim_server(log_dir: Path) -> Iterator[SimServer]:
    server = SimServer(log_dir=log_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def relay_server(sim_server: SimServer, log_dir: Path) -> Iterator[RelayServer]:
    server = RelayServer(log_dir=log_dir, upstream=sim_server.url + "/v1")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def start_relay(log_dir: Path) -> Iterator[Callable[..., RelayServer]]:
    """Start more relays with their own settings; all are stopped at the end of the run."""
    started: list[RelayServer] = []

    def start(*, upstream: str | None, **env: str) -> RelayServer:
        server = RelayServer(log_dir=log_dir, upstream=upstream, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(log_dir: Path) -> Iterator[str]:
    """A real redis-server on a free loopback port for the whole run: ``redis://127.0.0.1:PORT/0``."""
    server = RedisServer(log_dir=log_dir)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module. Not per session: Playwright's sync API keeps
    an event loop running in this thread while it is open, and other tests use asyncio.run."""
    yield from launch()
