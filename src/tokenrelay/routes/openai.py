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
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..config import Settings
from ..errors import TokenrelayError, ValidationFailed
from ..logs import client_name, request_id
from ..providers.base import OpenAIRequest
from ..resume.registry import new_stream_id
from ..routing import Attempts
from ..schemas import OpenAIChatBody, describe_validation, parse_json_object, parse_openai_body
from ..state import app_state
from ..streaming.openai_relay import STREAM_HEADERS, V1Resume, failed, openai_error, v1_body
from ..streaming.record import StreamRecord
from ..streaming.response import Body, StreamResponse
from ..streaming.wire import WIRES
from .endpoint import Endpoint
from .request_body import read_json_body
from .stream import resume_grace


class _Param(ValidationFailed):
    """A bad field, named in OpenAI's ``param``; 400 as OpenAI answers it."""

    status = 400

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def check_body(body: dict[str, Any]) -> OpenAIChatBody:
    """The body checked as far as tokenrelay reads or translates it (``schemas.OpenAIChatBody``);
    the first bad field is OpenAI's ``param``."""
    try:
        return parse_openai_body(body)
    except ValidationError as exc:
        param = next((str(e["loc"][0]) for e in exc.errors() if e["loc"]), None)
        raise _Param(describe_validation(exc), param=param) from None


def _grace(request: Request, settings: Settings) -> float:
    """0 (leaving stops the model) unless the request sends ``X-Resume-Grace``; a bad one is a
    400, as OpenAI answers bad input."""
    if "x-resume-grace" not in request.headers:
        return 0.0
    try:
        return resume_grace(request, settings)
    except ValidationFailed as exc:
        raise _Param(exc.message, param=None) from None


class _Checked(Protocol):
    model: str | None


Checked = TypeVar("Checked", bound=_Checked)


async def read_v1_body(request: Request, check: Callable[[dict[str, Any]], Checked],
                       missing_model: Callable[[str], TokenrelayError]) -> tuple[bytes, dict[str, Any], Checked, str]:
    """A ``/v1`` request's body as the upstream gets it, the parsed body, what ``check`` made of
    it, and the model — the default written in where none was sent — which the routes know
    (an unknown one is a 404 here, before anything starts)."""
    state = app_state(request)
    settings = state.settings
    raw = await read_json_body(request, settings.max_body_bytes)
    body = parse_json_object(raw)
    checked = check(body)
    model = checked.model or settings.default_model
    if model is None:
        raise missing_model("model: required, since no default model is set (TOKENRELAY_MODEL)")
    raw = with_model(raw, body, model)
    state.router.resolve(model)
    return raw, body, checked, model


def with_model(raw: bytes, body: dict[str, Any], model: str) -> bytes:
    """The request as the upstream gets it: a body sent without a model has the default
    written in (into ``body`` and ``raw``), the rest of its bytes as sent."""
    if body.get("model") is not None:
        return raw
    body["model"] = model
    return raw.rstrip()[:-1] + b',"model":' + orjson.dumps(model) + b"}"


@Endpoint
async def chat_completions(request: Request) -> StreamResponse:
    state = app_state(request)
    settings = state.settings
    raw, body, checked, model = await read_v1_body(request, check_body, lambda m: _Param(m, param="model"))
    stream = bool(checked.stream)
    resume: V1Resume | None = None
    if stream:
        # Logged as it is relayed, so it can be resumed and stopped at /api/streams/{id}. Leaving
        # still stops it at once (OpenAI's semantics) unless the request asks for a grace.
        grace = _grace(request, settings)
        live = state.streams.open(owner=client_name.get(), model=model, wire="openai", grace=grace)
        resume = V1Resume(live, WIRES["openai"], state.streams)
        stream_id = live.id
    else:
        stream_id = new_stream_id()
    record = StreamRecord(request_id=request_id.get(), stream_id=stream_id, model=model,
                          mode="sse" if stream else "json", route="/v1/chat/completions")
    include_usage = bool(checked.stream_options and checked.stream_options.include_usage)
    provider = state.provider
    headers = [*STREAM_HEADERS, (b"x-request-id", record.request_id.encode())]
    if resume is not None:
        headers.append((b"x-stream-id", stream_id.encode()))

    async def open_body() -> Body:
        attempts = Attempts()
        try:
            opened = await provider.open_openai(OpenAIRequest(raw, body, stream), model=model, attempts=attempts)
        except BaseException as exc:  # refused, or stopped while the upstream was asked
            if resume is not None:
                resume.streams.finished(resume.stream, failed(exc) if isinstance(exc, TokenrelayError)
                                        else resume.stopped(record))
            raise
        finally:
            record.attempts = str(attempts)
        return v1_body(opened, record, headers, resume=resume, include_usage=include_usage)

    response = StreamResponse(open_body, headers=headers, record=record, observer=state.metrics,
                              send_timeout=settings.send_timeout, error_response=openai_error, resumable=resume)
    if resume is not None:
        resume.stream.stopper = response.stop
    return response


async def list_models(request: Request) -> JSONResponse:
    models = await app_state(request).router.models()
    created = int(time.time())
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": upstream} for name, upstream in models]})
