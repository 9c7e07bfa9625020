"""Prometheus instruments, served at ``GET /metrics``.

One ``Metrics`` per app, each with its own ``CollectorRegistry`` (not the library's global
one), so several apps in one process keep separate counts. Under ``serve --workers N``
every worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (the library's
multiprocess mode, set up by ``serve``) and a scrape, whichever worker answers it, adds up
all workers.

Nothing here runs per chunk. A stream is observed twice: ``stream_started`` when the
relay begins (the in-flight gauge) and ``stream_finished`` from its ``StreamRecord`` at
the end (everything else). Other routes are counted by ``MetricsMiddleware`` from their
status; the stream routes (``STREAM_PATHS``) are left to the relay, and to
``count_request`` for errors raised before the relay starts, so a stream's chunks pass no
wrapped ``send``. The route label is the route's template (``/api/jobs/{job_id}``), or
``other`` for a path no route matched, so random URLs cannot grow the label set. Model names
are client input too: the model label is a name the router lists (``watch``), else ``other``.
The key label is the client key's name (``logs.client_name``; never the key), ``-`` without
keys; a job's is ``-``, as its record keeps no key name.

    tokenrelay_requests_total{route,status}          every HTTP request (499: the client left
                                                     before its request arrived whole)
    tokenrelay_streams_in_flight{mode}               answers being relayed now
    tokenrelay_streams_total{mode,outcome}           completed | client_cancelled | client_stalled |
                                                     stopped | abandoned | upstream_error |
                                                     failed_midway | rejected | internal_error
    tokenrelay_time_to_first_token_seconds{mode}     histogram
    tokenrelay_stream_duration_seconds{mode}         histogram
    tokenrelay_tokens_out_total{model,key,source}    answer tokens, streamed (source="stream")
                                                     or written by a job (source="job"); key is
                                                     the client key's name (a job's submitter)
    tokenrelay_answers_total{model,key,source,outcome}  answers by how they ended: streams as
                                                     above, jobs succeeded | failed
    tokenrelay_bytes_out_total                       answer body bytes sent
    tokenrelay_upstream_errors_total{type}           by error type (upstream_timeout, …)
    tokenrelay_client_cancellations_total            clients that left before the end
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access import route_path
from .jobs import runner
from .logs import client_name

if TYPE_CHECKING:
    from .jobs.model import Job
    from .routing import ModelRouter
    from .streaming.record import StreamRecord

log = logging.getLogger("tokenrelay.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

STREAM_PATHS = frozenset({"/api/get-response", "/v1/chat/completions", "/v1/responses"})
"""Counted from each stream's ``StreamRecord`` and by the error handlers, never by the
middleware."""

_UPSTREAM_OUTCOMES = frozenset({"upstream_error", "failed_midway"})
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
OTHER_MODEL = "other"
NO_KEY = "-"


def route_label(scope: Scope) -> str:
    """The template of the route that matched (Starlette puts it in the scope)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tokenrelay_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=r)
        self.in_flight = Gauge("tokenrelay_streams_in_flight", "Answers being relayed now.", ["mode"], registry=r,
                               multiprocess_mode="livesum")
        self.streams = Counter("tokenrelay_streams", "Answers relayed, by how they ended.",
                               ["mode", "outcome"], registry=r)
        self.ttft = Histogram("tokenrelay_time_to_first_token_seconds",
                              "Seconds from the request to the first token sent.", ["mode"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.duration = Histogram("tokenrelay_stream_duration_seconds", "Seconds from the request to the end.",
                                  ["mode"], buckets=_DURATION_BUCKETS, registry=r)
        self.tokens_out = Counter("tokenrelay_tokens_out", "Answer tokens, by model, client key name and source.",
                                  ["model", "key", "source"], registry=r)
        self.answers = Counter("tokenrelay_answers", "Answers by model, client key name, source and outcome.",
                               ["model", "key", "source", "outcome"], registry=r)
        self.bytes_out = Counter("tokenrelay_bytes_out", "Answer body bytes sent to clients.", registry=r)
        self.upstream_errors = Counter("tokenrelay_upstream_errors", "Upstream failures by error type.",
                                       ["type"], registry=r)
        self.cancellations = Counter("tokenrelay_client_cancellations",
                                     "Clients that left before their answer ended.", registry=r)

        # Each stream's labelled series, looked up once: ``labels()`` validates and locks on
        # every call, and these run for every request. The label values come from small
        # fixed sets (modes, routes, statuses, outcomes).
        self._series: dict[tuple[object, ...], Any] = {}
        self._models: set[str] = set()
        self._learning: asyncio.Task[None] | None = None

    # --- the model label ---

    def watch(self, provider: ModelRouter) -> None:
        """Take the model label's values from ``provider``'s router, and count the tokens of
        the jobs it answers. The names its routes and the default model give are known at
        once; those its upstreams list (``GET /models``, for a route with a pattern) are
        asked for in the background, so start-up never waits on an upstream."""
        router = provider.router
        self._models.update(name for upstream in router.upstreams for name in upstream.listed)
        if router.settings.default_model:
            self._models.add(router.settings.default_model)
        runner.job_observers[provider] = self.job_finished
        self._learning = asyncio.get_running_loop().create_task(self._learn(provider))

    async def _learn(self, provider: ModelRouter) -> None:
        try:
            self._models.update(name for name, _ in await provider.router.models())
        except Exception:  # the label falls back to ``other``; nothing else depends on it
            log.warning("could not list the upstreams' models for the metrics' model label", exc_info=True)

    def model_label(self, model: str) -> str:
        return model if model in self._models else OTHER_MODEL

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*values)
        return child

    # --- the relay's two hooks ---

    def stream_started(self, record: StreamRecord) -> None:
        self._child(self.in_flight, record.mode).inc()

    def stream_finished(self, record: StreamRecord) -> None:
        mode = record.mode
        child = self._child
        child(self.in_flight, mode).dec()
        child(self.requests, record.route, str(record.status)).inc()
        child(self.streams, mode, record.outcome).inc()
        if record.first_token is not None:
            child(self.ttft, mode).observe(record.first_token - record.started)
        child(self.duration, mode).observe(time.perf_counter() - record.started)
        model, key = self.model_label(record.model), client_name.get() or NO_KEY
        child(self.tokens_out, model, key, "stream").inc(record.tokens)
        child(self.answers, model, key, "stream", record.outcome).inc()
        self.bytes_out.inc(record.bytes_out)
        if record.outcome in _UPSTREAM_OUTCOMES and record.error_type:
            self.upstream_errors.labels(record.error_type).inc()
        elif record.outcome == "client_cancelled":
            self.cancellations.inc()

    def job_finished(self, job: Job) -> None:
        """A job ended (``jobs.runner``): its tokens and its outcome."""
        model = self.model_label(job.model)
        usage = job.result.usage if job.result else None
        tokens = usage.get("completion_tokens", 0) if usage else 0
        key = job.owner or NO_KEY  # the name of the client key that submitted it
        self._child(self.tokens_out, model, key, "job").inc(tokens)
        self._child(self.answers, model, key, "job", str(job.status)).inc()

    # --- requests that never reach the relay ---

    def count_request(self, path: str, status: int) -> None:
        """An error response from an exception handler; only the stream routes are counted
        here, as the middleware counts the others."""
        if path in STREAM_PATHS:
            self.requests.labels(path, str(status)).inc()

    async def endpoint(self, request: Request) -> Response:
        registry = self.registry
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts requests by route and status for every route but the stream route (see the
    module docstring). Plain ASGI."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http" or route_path(scope) in STREAM_PATHS:
            # The stream's coroutine itself, not awaited here: no frame of this middleware
            # stays alive beside each open stream.
            return self.app(scope, receive, send)
        return self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500  # an exception that escapes before the response starts

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route_label(scope), str(status)).inc()
