"""What the app shares between requests, typed: ``app_state(request).router`` rather than an
untyped ``request.app.state.router``.

``create_app`` makes one ``AppState`` (it is Starlette's own ``State``, so
``request.app.state`` reads the same values); the lifespan fills in what needs the event loop
(the router and its upstream clients, the jobs backend) and closes it again at shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from starlette.datastructures import State
from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from .auth import KeyRing
    from .config import Settings
    from .jobs.backend import JobBackend
    from .metrics import Metrics
    from .resume.registry import Streams
    from .ratelimit import Limiter
    from .routes.health import Readiness
    from .routing import ModelRouter, Router


class AppState(State):
    settings: Settings
    keys: KeyRing
    metrics: Metrics
    readiness: Readiness
    limiter: Limiter
    """The per-key limits; ``/readyz`` reports whether they are enforced."""
    router: Router
    """The routes from model names to upstreams (built in the lifespan)."""
    provider: ModelRouter
    """Every answer's provider: routes each request by its model, retried where safe."""
    streams: Streams
    """This instance's streamed answers, for resuming and stopping them."""
    jobs: JobBackend | None
    """The jobs backend, or None when jobs are unavailable (``jobs_unavailable`` says why)."""
    jobs_unavailable: str | None


def app_state(conn: HTTPConnection) -> AppState:
    return cast(AppState, conn.app.state)
