"""``GET /readyz``: readiness, for load balancers and Kubernetes (``/healthz`` is liveness).

Ready means every upstream answers: each route's upstream is checked at the same time, each
within a short timeout, by its provider's ``check_ready`` (``GET {upstream}/models`` for the
OpenAI-compatible and Anthropic APIs); the built-in simulator is always ready. One
upstream down makes the whole service not ready, and the answer names it: a request for its
models would fail, and a load balancer has no other way to learn that. ``jobs`` says whether
jobs work (``ok``, ``degraded`` while their store fails, ``unavailable``) without changing
the status.

The answer is cached for a few seconds, so a load balancer polling every second from several
places costs each model API one request per few seconds, and only one check runs at a time.

``limits`` says whether the per-key limits are enforced: ``off``, ``ok``, or ``degraded``
with the reason when their Redis fails or hangs (requests are then let through, so the
service stays ready).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..config import Settings
from ..providers.base import Provider
from ..routing import Upstream
from ..state import AppState, app_state
from ..upstreams import UpstreamView, upstream_summary, upstream_views

CHECK_TIMEOUT = 2.0
CACHE_SECONDS = 5.0
T = TypeVar("T")


class Readiness:
    """The last readiness answer, reused for ``ttl`` seconds."""

    def __init__(self, *, ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._checked_at: float | None = None
        self._answer: Any = None
        self._lock = anyio.Lock()

    async def cached(self, check: Callable[[], Awaitable[T]]) -> T:
        """``check()``'s answer, from the cache while it is fresh."""
        async with self._lock:
            now = self.clock()
            if self._checked_at is None or now - self._checked_at >= self.ttl:
                self._answer = await check()
                self._checked_at = self.clock()
            answer: T = self._answer
            return answer

    async def reason(self, provider: Provider) -> str | None:
        """One provider's readiness: None when ready, else why not."""
        return await self.cached(lambda: provider.check_ready(timeout=CHECK_TIMEOUT))


@dataclass(frozen=True)
class UpstreamCheck:
    view: UpstreamView
    reason: str | None  # None: ready

    def to_dict(self) -> dict[str, str | None]:
        status = "ready" if self.reason is None else "not_ready"
        return {**self.view.to_dict(), "status": status, "reason": self.reason}


async def check_upstreams(upstreams: Sequence[Upstream], settings: Settings, *,
                          timeout: float = CHECK_TIMEOUT) -> list[UpstreamCheck]:
    """Every upstream checked at once, each within ``timeout``, in the routes' order."""
    views = {view.name: view for view in upstream_views(settings)}
    results: list[str | None] = [None] * len(upstreams)

    async def check(index: int, upstream: Upstream) -> None:
        # A check that ignores its own timeout must not hold /readyz longer than promised.
        with anyio.move_on_after(timeout + 0.5) as scope:
            results[index] = await upstream.provider.check_ready(timeout=timeout)
        if scope.cancelled_caught:
            results[index] = f"upstream did not answer within {timeout:g} s"

    async with anyio.create_task_group() as group:
        for index, upstream in enumerate(upstreams):
            group.start_soon(check, index, upstream)
    return [
        UpstreamCheck(views.get(upstream.name) or _view_of(upstream), reason)
        for upstream, reason in zip(upstreams, results)
    ]


def _view_of(upstream: Upstream) -> UpstreamView:
    return UpstreamView(upstream.name, upstream.kind, upstream.pattern, None)


def _reason(checks: Sequence[UpstreamCheck]) -> str | None:
    """Each failing upstream by name and URL, and why."""
    failed = []
    for check in checks:
        if check.reason is not None:
            view = check.view
            where = f"{view.name} ({view.url})" if view.url and view.url != view.name else view.name
            failed.append(f"{where}: {check.reason}")
    return "; ".join(failed) or None


def jobs_status(state: AppState) -> dict[str, str | None]:
    """Whether jobs work, for /readyz. Jobs away do not make the service not ready: the
    streaming routes need neither the disk nor Redis, so a load balancer keeps sending them."""
    if state.jobs is None:
        return {"status": "unavailable", "reason": state.jobs_unavailable or "jobs are not available"}
    trouble = state.jobs.trouble
    if trouble is not None:
        return {"status": "degraded", "store": state.jobs.label, "reason": trouble}
    return {"status": "ok", "store": state.jobs.label, "reason": None}


async def readyz(request: Request) -> JSONResponse:
    state = app_state(request)
    settings = state.settings
    checks = await state.readiness.cached(lambda: check_upstreams(state.router.upstreams, settings))
    # Limits that cannot be checked are "degraded", not "not ready": requests are still
    # served (fail open), so a load balancer must not take the instance out for it.
    body: dict[str, Any] = {"status": "ready", "upstream": upstream_summary(settings),
                            "upstreams": [check.to_dict() for check in checks], "jobs": jobs_status(state),
                            "limits": await state.limiter.check(), "streams": await state.streams.check()}
    reason = _reason(checks)
    if reason is None:
        return JSONResponse(body)
    return JSONResponse({**body, "status": "not_ready", "reason": reason},
                        status_code=503, headers={"cache-control": "no-store"})
