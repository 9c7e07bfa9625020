"""Exceptions become responses in one place: Starlette looks each raised exception up here
along its ``__mro__`` (``create_app`` registers ``EXCEPTION_HANDLERS``), and only before the
response has started — after that, a streamed answer says its failure in-band
(``streaming.response``).

Errors have tokenrelay's shape (``{"error": {"type", "message"}}``) on ``/api`` and OpenAI's
on ``/v1``, which its SDKs raise as the matching exception.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .access import route_path
from .errors import TokenrelayError, openai_dict
from .logs import request_id
from .state import app_state

log = logging.getLogger("tokenrelay")


def _is_v1(request: Request) -> bool:
    return route_path(request.scope).startswith("/v1/")


async def tokenrelay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TokenrelayError)
    app_state(request).metrics.count_request(route_path(request.scope), exc.status)
    headers = {**exc.headers, "x-request-id": request_id.get()}
    body = openai_dict(exc) if _is_v1(request) else exc.to_dict()
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def client_left(request: Request, exc: Exception) -> Response:
    """A client gone before its request arrived whole: nothing went wrong here, and nobody
    reads the answer (the server drops it). Counted as nginx counts it: 499."""
    assert isinstance(exc, ClientDisconnect)
    path = route_path(request.scope)
    log.info("%s client left before its request arrived whole", path)
    app_state(request).metrics.count_request(path, 499)
    return Response(status_code=499)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405, in the path's error shape."""
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    app_state(request).metrics.count_request(route_path(request.scope), exc.status_code)
    body: dict[str, Any]
    if _is_v1(request):
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": kind}}
    else:
        body = {"error": {"type": kind, "message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    TokenrelayError: tokenrelay_error,
    HTTPException: http_error,
    ClientDisconnect: client_left,
}
