"""``GET /readyz``: readiness, for load balancers and Kubernetes (``/healthz`` is liveness).

Ready means every upstream answers: each route's upstream is checked at the same time, each
within a short timeout — an OpenAI-compatible API with ``GET {upstream}/models`` (see
``OpenAICompatible.check_ready``), an upstream whose provider has no check of its own
(Anthropic's) with the same request made here; the built-in simulator is always ready. One
upstream down makes the whole service not ready, and the answer names it: a request for its
models would fail, and a load balancer has no other way to learn that.

The answer is cached for a few seconds, so a load balancer polling every second from several
places costs each model API one request per few seconds, and only one check runs at a time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..config import Settings
from ..routing import Upstream
from ..upstreams import SIMULATOR, UpstreamView, upstream_summary, upstream_views

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

    async def reason(self, provider: object) -> str | None:
        """One provider's readiness: None when ready, else why not."""
        check = getattr(provider, "check_ready", None)
        if check is None:  # the simulator: nothing outside the process to wait for
            return None

        async def run() -> str | None:
            reason: str | None = await check(timeout=CHECK_TIMEOUT)
            return reason

        return await self.cached(run)


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
    keys = {route.label: route.key_env for route in settings.routes}
    results: list[str | None] = [None] * len(upstreams)

    async def check(index: int, upstream: Upstream) -> None:
        view = views.get(upstream.name)
        key_env = keys.get(upstream.name)
        # A check that ignores its own timeout must not hold /readyz longer than promised.
        with anyio.move_on_after(timeout + 0.5) as scope:
            results[index] = await _check_one(upstream, view, os.environ.get(key_env) if key_env else None,
                                              timeout)
        if scope.cancelled_caught:
            results[index] = f"upstream did not answer within {timeout:g} s"

    async with anyio.create_task_group() as group:
        for index, upstream in enumerate(upstreams):
            group.start_soon(check, index, upstream)
    return [
        UpstreamCheck(views.get(upstream.name) or _view_of(upstream), reason)
        for upstream, reason in zip(upstreams, results)
    ]


async def _check_one(upstream: Upstream, view: UpstreamView | None, key: str | None,
                     timeout: float) -> str | None:
    if upstream.kind == SIMULATOR:
        return None
    check = getattr(upstream.provider, "check_ready", None)
    if check is not None:
        reason: str | None = await check(timeout=timeout)
        return reason
    if view is None or view.url is None:
        return None
    return await _answers_models(upstream.kind, view.url, key, timeout)


async def _answers_models(kind: str, url: str, key: str | None, timeout: float) -> str | None:
    """For a provider without a check of its own: ``GET {url}/models`` with its key, judged
    as ``OpenAICompatible.check_ready`` judges it (a 404 is an upstream that is up)."""
    headers: dict[str, str] = {}
    if kind == "anthropic":
        from ..providers.anthropic import API_VERSION

        headers["anthropic-version"] = API_VERSION
        if key:
            headers["x-api-key"] = key
    elif key:
        headers["authorization"] = f"Bearer {key}"
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(url.rstrip("/") + "/models", headers=headers)
    except httpx.TimeoutException:
        return f"upstream did not answer GET /models within {timeout:g} s"
    except httpx.HTTPError as exc:
        return f"cannot reach upstream: {str(exc) or type(exc).__name__}"
    if response.status_code >= 500 or response.status_code in (401, 403):
        return f"upstream answered GET /models with {response.status_code}"
    return None


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


async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    settings: Settings = state.settings
    checks = await state.readiness.cached(lambda: check_upstreams(state.router.upstreams, settings))
    body: dict[str, Any] = {"status": "ready", "upstream": upstream_summary(settings),
                            "upstreams": [check.to_dict() for check in checks]}
    reason = _reason(checks)
    if reason is None:
        return JSONResponse(body)
    return JSONResponse({**body, "status": "not_ready", "reason": reason},
                        status_code=503, headers={"cache-control": "no-store"})
