"""Small read-only routes: what answers (``/api/info``) and liveness (``/healthz``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from .. import __version__
from ..state import app_state
from ..upstreams import is_simulated, upstream_summary, upstream_views


async def info(request: Request) -> JSONResponse:
    state = app_state(request)
    settings = state.settings
    return JSONResponse(
        {
            "upstream": upstream_summary(settings),
            # Each route's upstream (one entry without routes), so the page and `ask` can say
            # which one answers a model: name, kind, pattern, URL without credentials.
            "upstreams": [view.to_dict() for view in upstream_views(settings)],
            "routed": bool(settings.routes),
            "simulated": is_simulated(settings),
            # None with routes and no TOKENRELAY_MODEL: clients pick from GET /v1/models.
            "model": settings.default_model,
            "version": __version__,
            # Public, so the page knows to ask for a key before its first request.
            "auth_required": bool(state.keys),
            # The largest request body accepted: the page trims old turns to stay under it.
            "max_body_bytes": settings.max_body_bytes,
        }
    )


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})
