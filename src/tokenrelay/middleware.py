"""The middleware stack, outermost first: CORS (when origins are allowed), request ids,
request metrics, then keys and limits (when configured).

All plain ASGI on purpose: Starlette's ``BaseHTTPMiddleware`` would hide the client's
disconnect from the streaming routes and re-pipe every chunk through a memory stream.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from .access import AccessMiddleware, CORSMiddleware, cors_options, header
from .auth import KeyRing
from .config import Settings
from .logs import request_id
from .metrics import Metrics, MetricsMiddleware
from .ratelimit import Limiter


class RequestIdMiddleware:
    """Takes the client's ``X-Request-Id`` (or makes one) for logs and responses.

    Its work is done before the app runs, so it returns the app's coroutine rather than
    awaiting it: no frame of its own stays alive beside each open stream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http":
            given = header(scope, b"x-request-id")
            # Not a secret (unlike a stream id), so no system call for it.
            request_id.set(given.decode("latin-1") if given and len(given) <= 128
                           else f"req_{random.getrandbits(64):016x}")
        return self.app(scope, receive, send)


def add_middleware(app: Starlette, *, settings: Settings, keys: KeyRing, limiter: Limiter, metrics: Metrics) -> None:
    # Starlette wraps each one added around the ones before: add innermost first.
    if keys or limiter.enabled:
        app.add_middleware(AccessMiddleware, keys=keys, limiter=limiter)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, **cors_options(settings.cors_origins))
