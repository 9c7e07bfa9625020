"""``create_app(settings)``: assembly only — the routes, the middleware stack
(``middleware``), the error handlers (``error_handlers``), the shared state
(``state.AppState``), and the lifespan that opens and closes what needs the event loop."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Mount, Route

from .auth import load_keys
from .config import Settings
from .error_handlers import EXCEPTION_HANDLERS
from .jobs.backend import JobsUnavailable, open_backend
from .logs import setup_logging
from .metrics import Metrics
from .middleware import add_middleware
from .openapi import openapi_json
from .ratelimit import Limiter
from .routes.health import Readiness, readyz
from .routes.info import healthz, info
from .routes.jobs import create_job, delete_job, get_job, stream_job
from .routes.openai import chat_completions, list_models
from .routes.page import PageFiles, favicon, index
from .routes.probe import probe
from .routes.responses import cancel_response, create_response, retrieve_response
from .routes.stream import get_response
from .routes.streams import delete_stream, get_stream
from .resume.redis_streams import RedisStreams
from .resume.registry import Streams
from .routing import ModelRouter, Router
from .state import AppState
from .upstreams import upstream_views

log = logging.getLogger("tokenrelay")


def create_app(settings: Settings) -> Starlette:
    state = AppState()
    state.settings = settings
    state.keys = load_keys(settings)
    state.metrics = Metrics()
    state.readiness = Readiness()
    state.jobs = None
    state.jobs_unavailable = None
    limiter = Limiter(per_minute=settings.requests_per_minute_per_key,
                      concurrent=settings.max_concurrent_streams_per_key, redis_url=settings.redis_url,
                      timeout=settings.redis_timeout)
    state.limiter = limiter

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.router = Router(settings)
        if settings.redis_url:  # every instance's streams, so any of them resumes and stops any
            state.streams = RedisStreams(settings.redis_url, timeout=settings.redis_timeout,
                                         grace=settings.resume_grace, ttl=settings.stream_ttl,
                                         max_bytes=settings.stream_max_bytes)
        else:
            state.streams = Streams(grace=settings.resume_grace, ttl=settings.stream_ttl,
                                    max_bytes=settings.stream_max_bytes, memory_bytes=settings.stream_memory,
                                    other_processes=int(os.environ.get(SERVE_PROCESSES_ENV) or 1) > 1)
        await state.streams.start()
        state.provider = ModelRouter(state.router)
        state.metrics.watch(state.provider)
        if settings.routes:
            for view in upstream_views(settings):
                log.info("route %s", view.route_line())
        elif settings.simulated:
            log.warning(
                "no upstream configured (TOKENRELAY_UPSTREAM_URL): answers come from the built-in simulator"
            )
        else:
            log.info("upstream: %s (default model: %s)", settings.upstream_label, settings.default_model or "none")
        try:
            state.jobs = await open_backend(settings, state.provider,
                                            processes=int(os.environ.get(SERVE_PROCESSES_ENV) or 1))
        except JobsUnavailable as exc:
            # Everything else still serves; /api/jobs answers 503 saying why.
            state.jobs_unavailable = str(exc)
            log.warning("%s", exc)
        if state.keys or limiter.enabled:
            log.info("client keys: %s; limits: %s", len(state.keys) or "off (limits per client address)",
                     limiter.describe() if limiter.enabled else "none")
        # Everything made so far (modules, settings, the app) lives as long as the process;
        # frozen, the collector stops walking it: a full collection took 33-40 ms, a stall
        # of every open stream each time it ran (docs/performance.md).
        gc.freeze()
        try:
            yield
        finally:
            await state.streams.aclose()
            await limiter.aclose()
            if state.jobs is not None:
                await state.jobs.aclose()
            await state.provider.aclose()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/api/get-response", get_response, methods=["POST"]),
        Route("/api/info", info, methods=["GET"]),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/api/jobs/{job_id}/stream", stream_job, methods=["GET"]),
        Route("/api/probe", probe, methods=["GET"]),
        Route("/api/streams/{stream_id}", get_stream, methods=["GET"]),
        Route("/api/streams/{stream_id}", delete_stream, methods=["DELETE"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", retrieve_response, methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", state.metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Mount("/static", PageFiles(), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state = state
    add_middleware(app, settings=settings, keys=state.keys, limiter=limiter, metrics=state.metrics)
    return app


CONFIG_FILE_ENV = "TOKENRELAY_CONFIG_FILE"
SERVE_PROCESSES_ENV = "TOKENRELAY_SERVE_PROCESSES"


def app_from_env() -> Starlette:
    """The app built from the environment alone, for process managers that import it:
    ``serve --workers N`` and ``uvicorn --factory tokenrelay.app:app_from_env``. A TOML file
    named in ``TOKENRELAY_CONFIG_FILE`` is read as ``--config`` would be."""
    from .config import load_settings

    settings = load_settings(os.environ.get(CONFIG_FILE_ENV) or None)
    setup_logging(settings.log_level, json=settings.log_json)
    return create_app(settings)
