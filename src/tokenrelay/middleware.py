"""The middleware stack, outermost first: CORS (when origins are allowed), request ids,
request metrics, the host and cross-site checks, then keys and limits (when configured).

All plain ASGI on purpose: Starlette's ``BaseHTTPMiddleware`` would hide the client's
disconnect from the streaming routes and re-pipe every chunk through a memory stream.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from .access import AccessMiddleware, BrowserGuard, CORSMiddleware, cors_options, default_allowed_hosts, header
from .auth import KeyRing
from .config import Settings
from .logs import request_id
from .metrics import Metrics, MetricsMiddleware
from .ratelimit import Limiter


# What a request id may hold when a client sends one: enough for UUIDs, W3C trace ids and
# most schemes, nothing that can break a log line or a header (CR, LF, quotes, spaces).
_SAFE_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


class RequestIdMiddleware:
    """Takes the client's ``X-Request-Id`` (or makes one) for logs and responses; one with
    other characters, or longer than 128, is replaced by a new one.

    Its work is done before the app runs, so it returns the app's coroutine rather than
    awaiting it: no frame of its own stays alive beside each open stream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http":
            given = header(scope, b"x-request-id")
            # Not a secret (unlike a stream id), so no system call for it.
            request_id.set(given.decode("ascii") if given and _SAFE_ID.fullmatch(given)
                           else f"req_{random.getrandbits(64):016x}")
        return self.app(scope, receive, send)


def add_middleware(app: Starlette, *, settings: Settings, keys: KeyRing, limiter: Limiter, metrics: Metrics) -> None:
    # Starlette wraps each one added around the ones before: add innermost first.
    if keys or limiter.enabled:
        app.add_middleware(AccessMiddleware, keys=keys, limiter=limiter,
                           failed_per_minute=settings.failed_keys_per_minute)
    app.add_middleware(BrowserGuard, allowed_hosts=settings.allowed_hosts or default_allowed_hosts(settings.host),
                       cors_origins=settings.cors_origins)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, **cors_options(settings.cors_origins))
