"""Who may call the API, how often, and from which web origins.

``AccessMiddleware`` guards every API path — ``/api/*`` and ``/v1/*``, except the public
``/api/info`` — by path alone, before routing, so a route added later is guarded too. The
page, ``/static/*``, ``/healthz``, ``/readyz`` and ``/metrics`` stay public.

It is plain ASGI and does not wrap ``send``: it checks the key and the limits, calls the
app, and gives the slot back in ``finally`` once the app has returned — which for a stream
is when the stream has ended, whether it completed, failed or lost its client. Nothing
runs per chunk. Refusals are answered here, in the error shape of the path: tokenrelay's
``{"error": {"type", "message"}}`` on ``/api``, OpenAI's on ``/v1``.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.types import Scope

from .auth import KeyRing, bearer_token, key_id
from .errors import (
    RateLimited,
    TokenrelayError,
    Unauthorized,
    error_headers,
    openai_body,
)
from .logs import client_name, request_id
from .ratelimit import Limiter

log = logging.getLogger("tokenrelay.access")

PUBLIC_API_PATHS = frozenset({"/api/info"})
EXPOSED_HEADERS = ["X-Request-Id", "X-Stream-Id", "Retry-After"]


def is_api_path(path: str) -> bool:
    return (path.startswith(("/api/", "/v1/")) or path in ("/api", "/v1")) and path not in PUBLIC_API_PATHS


class AccessMiddleware:
    def __init__(self, app: Any, *, keys: KeyRing, limiter: Limiter) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter if limiter.enabled else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_api_path(route_path(scope)):
            await self.app(scope, receive, send)
            return
        if self.keys:
            token = bearer_token(header(scope, b"authorization"))
            key = self.keys.match(token) if token is not None else None
            if key is None:
                if token is None:
                    reason = "no client key"
                    exc = Unauthorized("this API needs a client key: send 'Authorization: Bearer <key>'")
                else:
                    reason = f"unknown client key {key_id(token)}"
                    exc = Unauthorized("the client key is not valid")
                await self._refuse(scope, send, exc, reason=reason, bearer_error=token is not None)
                return
            who, subject = key.name, "this key"
            client_name.set(key.name)
        else:
            client = scope.get("client")
            who, subject = "addr:" + (client[0] if client else "unknown"), "this client address"
        if self.limiter is None or _route_is_unlimited(scope):
            await self.app(scope, receive, send)
            return
        try:
            release = await self.limiter.admit(who, subject=subject)
        except RateLimited as exc:
            await self._refuse(scope, send, exc, reason=exc.message)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await release()

    async def _refuse(self, scope: dict[str, Any], send: Any, exc: TokenrelayError, *, reason: str,
                      bearer_error: bool = False) -> None:
        log.info("%s %s status=%d outcome=%s (%s)", scope["method"], scope["path"], exc.status, exc.type, reason)
        headers = [*error_headers(exc), (b"x-request-id", request_id.get().encode())]
        if isinstance(exc, Unauthorized):
            challenge = b'Bearer realm="tokenrelay"' + (b', error="invalid_token"' if bearer_error else b"")
            headers.append((b"www-authenticate", challenge))
        # OpenAI's shape on /v1, which its SDKs raise as AuthenticationError / RateLimitError.
        body = openai_body(exc) if scope["path"].startswith("/v1") else exc.body()
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _route_is_unlimited(scope: Scope) -> bool:
    """Resuming or stopping an answer (``/api/streams/…``) takes no slot of its own: the
    answer already holds one until it ends, and a stop must never wait for a free slot."""
    return route_path(scope).startswith("/api/streams/")


def route_path(scope: Scope) -> str:
    """The path the router matches: without the ``root_path`` a mount point adds (as
    Starlette's own routing strips it), so a prefix cannot carry a request past the check."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def cors_options(origins: list[str]) -> dict[str, Any]:
    """Starlette's ``CORSMiddleware`` (plain ASGI) for the allow-listed origins. Keys travel
    in ``Authorization``, never in cookies, so credentials stay off and ``*`` is allowed."""
    return {
        "allow_origins": origins,
        "allow_methods": ["GET", "POST", "DELETE", "OPTIONS"],
        "allow_headers": ["*"],  # the SDKs send their own x-stainless-* headers
        "expose_headers": EXPOSED_HEADERS,
        "max_age": 600,
    }


__all__ = ["AccessMiddleware", "CORSMiddleware", "cors_options", "header", "is_api_path", "route_path"]
