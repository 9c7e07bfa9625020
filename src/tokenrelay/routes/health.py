"""``GET /readyz``: readiness, for load balancers and Kubernetes (``/healthz`` is liveness).

Ready means the upstream answers: for an OpenAI-compatible API, ``GET {upstream}/models``
within a short timeout (see ``OpenAICompatible.check_ready``); the built-in simulator is
always ready. The answer is cached for a few seconds, so a load balancer polling every
second from several places costs the model API one request per few seconds, and only one
check runs at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

CHECK_TIMEOUT = 2.0
CACHE_SECONDS = 5.0


class Readiness:
    def __init__(self, *, ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._checked_at: float | None = None
        self._reason: str | None = None
        self._lock = anyio.Lock()

    async def reason(self, provider: object) -> str | None:
        """None when ready, else why not."""
        check = getattr(provider, "check_ready", None)
        if check is None:  # the simulator: nothing outside the process to wait for
            return None
        async with self._lock:
            now = self.clock()
            if self._checked_at is None or now - self._checked_at >= self.ttl:
                self._reason = await check(timeout=CHECK_TIMEOUT)
                self._checked_at = self.clock()
            return self._reason


async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    reason = await state.readiness.reason(state.provider)
    if reason is None:
        return JSONResponse({"status": "ready", "upstream": state.settings.upstream_label})
    return JSONResponse(
        {"status": "not_ready", "reason": reason, "upstream": state.settings.upstream_label},
        status_code=503, headers={"cache-control": "no-store"},
    )
