"""Small read-only routes: what answers (``/api/info``) and liveness (``/healthz``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from .. import __version__


async def info(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    return JSONResponse(
        {
            "upstream": settings.upstream_label,
            "simulated": settings.simulated,
            "model": settings.default_model,
            "version": __version__,
            # Public, so the page knows to ask for a key before its first request.
            "auth_required": bool(request.app.state.keys),
        }
    )


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})
