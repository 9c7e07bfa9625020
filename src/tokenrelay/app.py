"""``create_app(settings)``: routes, middleware and the shared upstream client."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .access import AccessMiddleware, CORSMiddleware, cors_options
from .auth import load_keys
from .config import Settings
from .errors import TokenrelayError
from .logs import request_id, setup_logging
from .metrics import Metrics, MetricsMiddleware
from .ratelimit import Limiter
from .routes.health import Readiness, readyz
from .routes.info import healthz, info
from .routes.jobs import create_job, delete_job, get_job, stream_job
from .routes.probe import probe
from .routes.openai import chat_completions, list_models, openai_error
from .routes.stream import get_response
from .routing import ModelRouter, Router

log = logging.getLogger("tokenrelay")
WEB_DIR = resources.files("tokenrelay") / "web"


class RequestIdMiddleware:
    """Takes the client's ``X-Request-Id`` (or makes one) for logs and responses.

    Plain ASGI on purpose: ``BaseHTTPMiddleware`` would hide the client's disconnect from
    the streaming route and re-pipe every chunk through a memory stream."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = _header(scope, b"x-request-id")
            # Not a secret, so no system call for it (see routes.stream.new_stream_id).
            request_id.set(given if given and len(given) <= 128 else f"req_{random.getrandbits(64):016x}")
        await self.app(scope, receive, send)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class StreamRoutes:
    """``POST /api/get-response`` and ``POST /v1/chat/completions`` as plain ASGI, in front
    of Starlette's exception middleware and router.

    Every request and every open stream of these two routes would otherwise carry
    Starlette's router, request/response wrapper and two exception-handling layers around
    each ``send``: about 5 KB per open stream and CPU on every chunk (docs/performance.md).
    Their ``TokenrelayError``s and departed clients are answered here by the same handlers
    the app registers; other methods fall through to the router, which answers 405."""

    def __init__(self, app: Any, endpoints: dict[str, Callable[[Request], Awaitable[Any]]]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            root = scope.get("root_path", "")
            endpoint = self.endpoints.get(path[len(root):] if root and path.startswith(root) else path)
            if endpoint is not None:
                request = Request(scope, receive)
                try:
                    response = await endpoint(request)
                except TokenrelayError as exc:
                    response = await _tokenrelay_error(request, exc)
                except ClientDisconnect as exc:
                    response = await _client_left(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _tokenrelay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TokenrelayError)
    request.app.state.metrics.count_request(request.url.path, exc.status)
    if request.url.path.startswith("/v1/"):
        return await openai_error(request, exc)
    headers = {**exc.headers, "x-request-id": request_id.get()}
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


async def _client_left(request: Request, exc: Exception) -> Response:
    """A client gone before its request arrived whole: nothing went wrong here, and nobody
    reads the answer (the server drops it). Counted as nginx counts it: 499."""
    assert isinstance(exc, ClientDisconnect)
    log.info("%s client left before its request arrived whole", request.url.path)
    request.app.state.metrics.count_request(request.url.path, 499)
    return Response(status_code=499)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    request.app.state.metrics.count_request(request.url.path, exc.status_code)
    if request.url.path.startswith("/v1/"):
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": kind}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
    return JSONResponse(
        {"error": {"type": kind, "message": str(exc.detail)}}, status_code=exc.status_code, headers=exc.headers
    )


async def _index(request: Request) -> Response:
    return FileResponse(str(WEB_DIR / "index.html"), headers={"cache-control": "no-cache"})


async def _start_jobs(app: Starlette, settings: Settings) -> Any:
    """The jobs backend: Redis with TOKENRELAY_REDIS_URL, else SQLite in the data directory.
    If the data directory is taken, everything else still serves; /api/jobs answers 503."""
    from .jobs.store import StoreBusy

    processes = int(os.environ.get(SERVE_PROCESSES_ENV) or 1)
    if processes > 1 and not settings.redis_url:
        app.state.jobs_unavailable = (
            f"jobs are not available: with {processes} serve processes they need TOKENRELAY_REDIS_URL "
            "(and 'tokenrelay worker'); SQLite-kept jobs need a single process"
        )
        log.warning("%s", app.state.jobs_unavailable)
        return None
    try:
        # TOKENRELAY_REDIS_URL also holds the per-key limits; a serve set up for those alone
        # still runs its jobs, since it runs a queue worker itself (jobs_in_serve).
        if settings.redis_url:
            from .jobs.distributed import RemoteJobs

            jobs: Any = RemoteJobs(settings)
            log.info("jobs: on the Redis queue at %s", jobs.label)
        else:
            from .jobs.local import LocalJobs

            jobs = LocalJobs(settings, app.state.provider)
            log.info("jobs: kept in %s", jobs.store.path)
        await jobs.start()
    except StoreBusy as exc:
        app.state.jobs_unavailable = f"jobs are not available: {exc}"
        log.warning("%s", app.state.jobs_unavailable)
        return None
    return jobs


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.router = Router(settings)
        # One provider that routes by model, for code written for a single provider.
        app.state.provider = ModelRouter(app.state.router)
        if settings.routes:
            from .upstreams import upstream_views

            for view in upstream_views(settings):
                log.info("route %s", view.route_line())
        elif settings.simulated:
            log.warning(
                "no upstream configured (TOKENRELAY_UPSTREAM_URL): answers come from the built-in simulator"
            )
        else:
            log.info("upstream: %s (default model: %s)", settings.upstream_label, settings.default_model or "none")
        app.state.jobs = await _start_jobs(app, settings)
        if keys or limiter.enabled:
            log.info("client keys: %s; limits: %s", len(keys) or "off (limits per client address)",
                     limiter.describe() if limiter.enabled else "none")
        # Everything made so far (modules, settings, the app) lives as long as the process;
        # frozen, the collector stops walking it: a full collection took 33-40 ms, a stall
        # of every open stream each time it ran (docs/performance.md).
        gc.freeze()
        try:
            yield
        finally:
            await limiter.aclose()
            if app.state.jobs is not None:
                await app.state.jobs.aclose()
            await app.state.provider.aclose()

    metrics = Metrics()
    routes = [
        Route("/", _index, methods=["GET"]),
        Route("/api/get-response", get_response, methods=["POST"]),  # POST served by StreamRoutes
        Route("/api/info", info, methods=["GET"]),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/api/jobs/{job_id}/stream", stream_job, methods=["GET"]),
        Route("/api/probe", probe, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),  # likewise
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(WEB_DIR)), name="static"),
    ]
    keys = load_keys(settings)
    limiter = Limiter(per_minute=settings.requests_per_minute_per_key,
                      concurrent=settings.max_concurrent_streams_per_key, redis_url=settings.redis_url)
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={TokenrelayError: _tokenrelay_error, HTTPException: _http_error,
                            ClientDisconnect: _client_left},
    )
    app.state.keys = keys
    app.add_middleware(StreamRoutes, endpoints={"/api/get-response": get_response,
                                                "/v1/chat/completions": chat_completions})
    if keys or limiter.enabled:
        app.add_middleware(AccessMiddleware, keys=keys, limiter=limiter)
    app.state.metrics = metrics
    app.state.readiness = Readiness()
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, **cors_options(settings.cors_origins))
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
