"""``/v1``: tokenrelay as an OpenAI-compatible API, for the official SDKs and anything else
that speaks it (``base_url="http://127.0.0.1:8000/v1"``).

``POST /v1/chat/completions`` takes OpenAI's request body as it is. tokenrelay reads only
what it needs — ``model`` (to route), ``messages`` (present), ``stream`` — and sends the
body on untouched to an OpenAI-compatible upstream, so ``tools``, ``tool_choice``,
``logprobs``, ``response_format``, ``stream_options`` and fields not yet invented reach it.
``GET /v1/models`` lists the models the routes can serve. Errors have OpenAI's shape.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import TokenrelayError, ValidationFailed, openai_dict
from ..logs import request_id
from ..schemas import parse_json_object
from ..streaming.openai_relay import V1Response
from ..streaming.relay import StreamRecord
from .stream import new_stream_id, read_json_body


class _Param(ValidationFailed):
    """A bad field, named in OpenAI's ``param``; 400 as OpenAI answers it."""

    status = 400

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_body(body: dict[str, Any]) -> tuple[str | None, bool]:
    """The model and stream flag; the fields tokenrelay must understand, checked."""
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
        raise _Param("model: must be a non-empty string", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Param("messages: must be a non-empty list of messages", param="messages")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise _Param("messages: each message must be an object with a 'role'", param="messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _Param("stream: must be true or false", param="stream")
    return model, bool(stream)


async def chat_completions(request: Request) -> V1Response:
    state = request.app.state
    raw = await read_json_body(request, state.settings.max_body_bytes)
    body = parse_json_object(raw)
    model, stream = check_body(body)
    model = model or state.settings.default_model
    if model is None:
        raise _Param("model: required, since no default model is set (TOKENRELAY_MODEL)", param="model")
    if "model" not in body:
        # The upstream needs a model too: the default is written in, the rest stays as sent.
        body["model"] = model
        raw = raw.rstrip()[:-1] + b',"model":' + orjson.dumps(model) + b"}"
    router = state.router
    upstream = router.resolve(model)
    record = StreamRecord(request_id=request_id.get(), stream_id=new_stream_id(), model=model,
                          mode="sse" if stream else "json", route="/v1/chat/completions")
    return V1Response(router=router, upstream=upstream, raw=raw, body=body, record=record, stream=stream,
                      observer=state.metrics)


async def list_models(request: Request) -> JSONResponse:
    models = await request.app.state.router.models()
    created = int(time.time())
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": upstream} for name, upstream in models]})


async def openai_error(request: Request, exc: Exception) -> Response:
    """Errors on ``/v1`` before the first byte, in OpenAI's shape."""
    assert isinstance(exc, TokenrelayError)
    headers = {**exc.headers, "x-request-id": request_id.get()}
    return JSONResponse(openai_dict(exc), status_code=exc.status, headers=headers)

