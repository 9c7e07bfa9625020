"""Model routing and safe retries: which upstream answers a model, and what to do when it
refuses before the first byte.

``settings.routes`` maps model names or globs to upstreams (first match wins), each with its
own kind, URL, key and timeouts. With no routes, ``TOKENRELAY_UPSTREAM_URL`` — or the
built-in simulator — serves every model, as it always did.

Retries happen only before tokenrelay has written a byte to the client: connection errors,
429 and 5xx at ``open``. Each upstream gets ``retries`` more tries with doubling backoff
(``Retry-After`` when the upstream gives one), all waits together bounded by
``retry_budget``; then its ``fallback`` route, if any, gets the same. Once bytes reached the
client nothing is retried: the client would receive two answers spliced together.
"""

from __future__ import annotations

import asyncio
import fnmatch
import glob
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .config import Settings, UpstreamRoute
from .errors import ModelNotFound, UpstreamError, UpstreamRateLimited, UpstreamUnavailable
from .providers.anthropic import Anthropic
from .providers.base import Delta, OpenAIRequest, Passthrough, Provider
from .providers.openai_compat import OpenAICompatible, make_client
from .schemas import ChatRequest
from .sim import MODELS as SIM_MODELS
from .sim import SimOptions, Simulator

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Upstream:
    name: str
    kind: str
    pattern: str
    provider: Provider
    listed: list[str] = field(default_factory=list)
    fallback: Upstream | None = None
    also: tuple[str, ...] = ()
    """More patterns it serves (the built-in simulator: ``sim:*`` and the default model)."""

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model, self.pattern) or any(fnmatch.fnmatchcase(model, p) for p in self.also)


@dataclass
class Attempts:
    """What happened before the answer started, for the request log line."""

    tries: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return ",".join(self.tries)


class Router:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.upstreams: list[Upstream] = []
        if not settings.routes:
            self.upstreams.append(self._default(settings))
        else:
            by_name = {}
            for route in settings.routes:
                upstream = self._build(route)
                self.upstreams.append(upstream)
                by_name[upstream.name] = upstream
            for route, upstream in zip(settings.routes, self.upstreams):
                if route.fallback:
                    upstream.fallback = by_name[route.fallback]

    @property
    def default(self) -> Upstream:
        return self.upstreams[0]

    def _default(self, settings: Settings) -> Upstream:
        if settings.upstream_url is None:
            # The simulator serves its own names only: a client asking for gpt-4o learns that
            # no model API is configured, instead of getting a simulated answer as gpt-4o's.
            also = ("sim:*", *([glob.escape(settings.model)] if settings.model else []))
            return Upstream("simulator", "simulator", "sim", _simulator(settings), list(SIM_MODELS), also=also)
        key = settings.upstream_key.get_secret_value() if settings.upstream_key else None
        provider = OpenAICompatible(base_url=settings.upstream_url, api_key=key, client=make_client(settings),
                                    label=settings.upstream_label)
        return Upstream(settings.upstream_label, "openai", "*", provider)

    def _build(self, route: UpstreamRoute) -> Upstream:
        settings = self.settings
        key = os.environ.get(route.key_env) if route.key_env else None  # checked by Settings
        provider: Provider
        if route.kind == "simulator":
            provider = _simulator(settings)
        else:
            assert route.url is not None
            client = make_client(settings, connect_timeout=route.connect_timeout, read_timeout=route.read_timeout)
            if route.kind == "anthropic":
                provider = Anthropic(base_url=route.url, api_key=key, client=client, label=route.label)
            else:
                provider = OpenAICompatible(base_url=route.url, api_key=key, client=client, label=route.label)
        listed = list(route.models)
        if not _is_glob(route.pattern):
            listed.insert(0, route.pattern)
        return Upstream(route.label, route.kind, route.pattern, provider, listed)

    def resolve(self, model: str) -> Upstream:
        for upstream in self.upstreams:
            if upstream.matches(model):
                return upstream
        served = [p for u in self.upstreams for p in (*u.listed, u.pattern, *u.also)]
        raise ModelNotFound(f"The model {model!r} does not exist or no upstream serves it; "
                            f"models served: {', '.join(dict.fromkeys(served))} (see GET /v1/models).")

    async def models(self) -> list[tuple[str, str]]:
        """(model, upstream name) for every model a request can name."""
        seen: dict[str, str] = {}
        for upstream in self.upstreams:
            names = list(upstream.listed)
            if _is_glob(upstream.pattern):
                names += [m for m in await upstream.provider.models() if upstream.matches(m)]
            for name in names:
                # a model listed by a later route may be shadowed by an earlier pattern
                if name not in seen and self.resolve(name) is upstream:
                    seen[name] = upstream.name
        default = self.settings.default_model
        if default and default not in seen:
            try:
                seen[default] = self.resolve(default).name
            except ModelNotFound:
                pass
        return list(seen.items())

    async def open_with_retries(self, upstream: Upstream, op: Callable[[Upstream], Awaitable[T]],
                                attempts: Attempts) -> T:
        """``op(upstream)``, retried where safe (see the module docstring)."""
        settings = self.settings
        budget = settings.retry_budget
        current: Upstream | None = upstream
        tried: set[int] = set()
        while current is not None and id(current) not in tried:
            tried.add(id(current))
            for attempt in range(settings.retries + 1):
                try:
                    result = await op(current)
                except UpstreamError as exc:
                    attempts.tries.append(f"{current.name}:{_short(exc)}")
                    if not retryable(exc):
                        raise
                    last_error = exc
                    wait = _wait(exc, settings.retry_backoff * 2**attempt)
                    if attempt == settings.retries or wait > budget:
                        break
                    budget -= wait
                    await asyncio.sleep(wait)
                    continue
                attempts.tries.append(f"{current.name}:ok")
                return result
            current = current.fallback
        raise last_error


def _simulator(settings: Settings) -> Simulator:
    return Simulator(SimOptions(ttft=settings.sim_ttft, tps=settings.sim_tps, tokens=settings.sim_tokens,
                                seed=settings.sim_seed))


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def retryable(exc: UpstreamError) -> bool:
    if exc.request_sent:
        return False
    if isinstance(exc, (UpstreamUnavailable, UpstreamRateLimited)):
        return True
    return exc.upstream_status is not None and exc.upstream_status >= 500


def _wait(exc: UpstreamError, backoff: float) -> float:
    retry_after = exc.headers.get("Retry-After", "")
    if retry_after.replace(".", "", 1).isdigit():
        return float(retry_after)
    return backoff * (0.5 + random.random() / 2)  # jitter: retries from many clients spread out


def _short(exc: UpstreamError) -> str:
    return str(exc.upstream_status) if exc.upstream_status else exc.type


class ModelRouter:
    """The whole router behind the ``Provider`` protocol: each request goes to the route of
    its model, retried where safe (``attempts`` collects the tries for the log line). Every
    process — ``serve``, ``worker``, a test — builds its provider as
    ``ModelRouter(Router(settings))``, so an answer comes from the same route wherever it runs."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.label = router.default.provider.label

    async def open(self, request: ChatRequest, *, model: str, attempts: Attempts | None = None) -> AsyncIterator[Delta]:
        async def attempt(upstream: Upstream) -> AsyncIterator[Delta]:
            return await upstream.provider.open(request, model=model)

        return await self.router.open_with_retries(self.router.resolve(model), attempt, attempts or Attempts())

    async def open_openai(self, request: OpenAIRequest, *, model: str,
                          attempts: Attempts | None = None) -> Passthrough | AsyncIterator[Delta]:
        async def attempt(upstream: Upstream) -> Passthrough | AsyncIterator[Delta]:
            return await upstream.provider.open_openai(request, model=model)

        return await self.router.open_with_retries(self.router.resolve(model), attempt, attempts or Attempts())

    async def models(self) -> list[str]:
        return [name for name, _ in await self.router.models()]

    async def check_ready(self, *, timeout: float) -> str | None:
        """The default upstream's readiness (the simulator is always ready)."""
        return await self.router.default.provider.check_ready(timeout=timeout)

    async def aclose(self) -> None:
        for upstream in self.router.upstreams:
            await upstream.provider.aclose()
