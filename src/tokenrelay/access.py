"""Who may call the API, how often, from which web origins, and under which host names.

``BrowserGuard`` runs first, on every request: the ``Host`` header must be one the service
answers to (``TOKENRELAY_ALLOWED_HOSTS``; by default the address it listens on and
localhost), which defeats DNS rebinding, and on the API paths a request that a browser
marks as sent by another site (``Sec-Fetch-Site``, else ``Origin``) is refused unless its
origin is in the CORS allow-list. Without it any web page could make its visitors'
browsers start answers and jobs on a tokenrelay at ``127.0.0.1:8000``: a ``no-cors``
``fetch`` with a ``text/plain`` body needs no preflight, and the API reads such a body as
JSON (the original design's own same-origin page sends it that way). See docs/security.md.

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
import time
from collections.abc import Awaitable, Sequence
from typing import Any
from urllib.parse import urlsplit

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Scope

from .auth import KeyRing, bearer_token, key_id
from .errors import (
    Forbidden,
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


WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::", "[::]"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(listen_host: str) -> list[str]:
    """The host names a service listening on ``listen_host`` answers to by default: that
    address and localhost; any, when it listens on every address (it cannot know the names
    it is reached by; a public address needs client keys anyway, see ``cli.serve``)."""
    if listen_host.strip("[]") in WILDCARD_ADDRESSES or listen_host in WILDCARD_ADDRESSES:
        return ["*"]
    return [listen_host.strip("[]").lower(), *LOOPBACK_NAMES]


def host_name(value: bytes) -> str:
    """The name in a ``Host`` header, without the port: ``[::1]:8000`` → ``::1``."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.rpartition(":")[0] if text.count(":") == 1 else text


def host_allowed(name: str, allowed: Sequence[str]) -> bool:
    name = name.rstrip(".")
    for pattern in allowed:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith(".") and (name.endswith(pattern) or name == pattern[1:]):
            return True
    return False


class BrowserGuard:
    """Refuses a ``Host`` the service does not answer to (every path), and on the API paths a
    request a browser sends on behalf of another site. Plain ASGI, before the key check."""

    def __init__(self, app: Any, *, allowed_hosts: Sequence[str], cors_origins: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = list(allowed_hosts)
        self.any_host = "*" in self.allowed_hosts
        self.origins = frozenset(cors_origins)
        self.any_origin = "*" in self.origins

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        # Decided before the app runs, so the app's coroutine is returned, not awaited: no
        # frame of this guard stays alive beside each open stream.
        if scope["type"] != "http":
            return self.app(scope, receive, send)  # type: ignore[no-any-return]
        host = header(scope, b"host")
        if not self.any_host and host is not None:
            name = host_name(host)
            if not host_allowed(name, self.allowed_hosts):
                exc = Forbidden(f"this service does not answer to the host name {name[:100]!r}; its operator can "
                                "add it to TOKENRELAY_ALLOWED_HOSTS")
                return refuse(scope, send, exc, reason=f"host {name[:100]!r} not allowed")
        if not self.any_origin and is_api_path(route_path(scope)):
            why = self._cross_site(scope, host)
            if why is not None:
                exc = Forbidden("cross-site requests are refused: call the API from the service's own page, "
                                "or add your page's origin to TOKENRELAY_CORS_ORIGINS")
                return refuse(scope, send, exc, reason=why)
        return self.app(scope, receive, send)  # type: ignore[no-any-return]

    def _cross_site(self, scope: Scope, host: bytes | None) -> str | None:
        """Why a browser sent this request for another site; None when it did not."""
        origin = header(scope, b"origin")
        origin_text = origin.decode("latin-1") if origin is not None else None
        if origin_text is not None and origin_text in self.origins:
            return None
        site = header(scope, b"sec-fetch-site")
        if site is not None:  # every current browser sends it; "none": the user typed the URL
            if site in (b"same-origin", b"none"):
                return None
            return f"sec-fetch-site {site.decode('latin-1')[:20]}, origin {(origin_text or '-')[:100]}"
        if origin_text is None:  # not a browser, or a same-origin GET: nothing to refuse
            return None
        # An older browser: the origin's host and port must be the request's own.
        try:
            netloc = urlsplit(origin_text).netloc.lower()
        except ValueError:  # not a URL at all ("http://[::1")
            netloc = None
        if host is not None and netloc == host.decode("latin-1").lower():
            return None
        return f"origin {origin_text[:100]}"


class AccessMiddleware:
    def __init__(self, app: Any, *, keys: KeyRing, limiter: Limiter, failed_per_minute: int = 0) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter if limiter.enabled else None
        # Failed keys are counted per address in this process's memory: guessing costs the
        # guesser, and nothing else must be reached (not even Redis) to refuse it.
        self._failed = RateLimitItemPerMinute(failed_per_minute) if keys and failed_per_minute else None
        self._failures = MovingWindowRateLimiter(MemoryStorage())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_api_path(route_path(scope)):
            await self.app(scope, receive, send)
            return
        if self.keys:
            address = client_address(scope)
            if self._failed is not None and not await self._failures.test(self._failed, address):
                # Over the limit, even a right key waits: otherwise the limit would still
                # answer which guess was right.
                stats = await self._failures.get_window_stats(self._failed, address)
                wait = max(1, int(stats.reset_time - time.time() + 0.999))
                exc_limited = RateLimited(
                    f"too many requests with a missing or wrong client key from this address: at most "
                    f"{self._failed.amount} per minute; retry in {wait} s", headers={"retry-after": str(wait)})
                await refuse(scope, send, exc_limited, reason=f"failed keys from {address}")
                return
            token = bearer_token(header(scope, b"authorization"))
            key = self.keys.match(token) if token is not None else None
            if key is None:
                if token is None:
                    reason = "no client key"
                    exc = Unauthorized("this API needs a client key: send 'Authorization: Bearer <key>'")
                else:
                    reason = f"unknown client key {key_id(token)}"
                    exc = Unauthorized("the client key is not valid")
                if self._failed is not None:
                    await self._failures.hit(self._failed, address)
                await refuse(scope, send, exc, reason=reason, bearer_error=token is not None)
                return
            who, subject = key.name, "this key"
            client_name.set(key.name)
        else:
            who, subject = "addr:" + client_address(scope), "this client address"
        if self.limiter is None or _route_is_unlimited(scope):
            await self.app(scope, receive, send)
            return
        try:
            release = await self.limiter.admit(who, subject=subject)
        except RateLimited as exc:
            await refuse(scope, send, exc, reason=exc.message)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await release()



async def refuse(scope: dict[str, Any], send: Any, exc: TokenrelayError, *, reason: str,
                 bearer_error: bool = False) -> None:
    """Answer ``exc`` in the error shape of the path, and log why."""
    log.info("%s %s status=%d outcome=%s (%s)", scope["method"], scope["path"], exc.status, exc.type, reason)
    headers = [*error_headers(exc), (b"x-request-id", request_id.get().encode())]
    if isinstance(exc, Unauthorized):
        challenge = b'Bearer realm="tokenrelay"' + (b', error="invalid_token"' if bearer_error else b"")
        headers.append((b"www-authenticate", challenge))
    # OpenAI's shape on /v1, which its SDKs raise as AuthenticationError / RateLimitError.
    body = openai_body(exc) if route_path(scope).startswith("/v1") else exc.body()
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


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


__all__ = ["AccessMiddleware", "BrowserGuard", "CORSMiddleware", "cors_options", "default_allowed_hosts", "header",
           "is_api_path", "route_path"]
