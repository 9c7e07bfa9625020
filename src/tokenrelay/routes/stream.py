"""``POST /api/get-response``: the route of the original design, done right.

request → validation (here) → provider (routed, ``routing.ModelRouter``) → body in the wire
format (``streaming.relay``) → ``StreamResponse`` → client.
The ``Accept`` header picks the wire: plain text by default, SSE for
``text/event-stream``; ``"stream": false`` asks for one JSON answer at the end.
"""

from __future__ import annotations

import random

from starlette.requests import Request

from ..errors import ValidationFailed
from ..logs import request_id
from ..routing import Attempts
from ..schemas import ChatRequest, parse_model
from ..state import app_state
from ..streaming import sse
from ..streaming.record import Mode, StreamRecord, new_stream_id
from ..streaming.relay import BODIES, CONTENT_TYPES
from ..streaming.response import Body, StreamResponse
from .endpoint import Endpoint
from .request_body import read_json_body


@Endpoint
async def get_response(request: Request) -> StreamResponse:
    state = app_state(request)
    settings = state.settings
    raw = await read_json_body(request, settings.max_body_bytes)
    chat = parse_model(ChatRequest, raw)
    model = chat.model or settings.default_model
    if model is None:
        raise ValidationFailed("model: required, since no default model is set (TOKENRELAY_MODEL)")
    state.router.resolve(model)  # an unknown model is a 404 before anything starts
    mode = pick_mode(request, chat)
    record = StreamRecord(
        request_id=request_id.get(),
        stream_id=new_stream_id(),
        model=model,
        mode=mode,
        prompt=last_user_message(chat) if settings.log_prompts else None,
    )
    provider = state.provider

    async def open_body() -> Body:
        attempts = Attempts()
        try:
            # The request is the provider's from here: not kept for the stream's lifetime.
            deltas = await provider.open(chat, model=model, attempts=attempts)
        finally:
            record.attempts = str(attempts)
        return BODIES[mode](deltas, record)

    headers = [*_HEADERS[mode], (b"x-request-id", record.request_id.encode()),
               (b"x-stream-id", record.stream_id.encode())]
    return StreamResponse(open_body, headers=headers, record=record, observer=state.metrics,
                          ping=sse.PING if mode == "sse" else None, heartbeat=settings.heartbeat_interval,
                          send_timeout=settings.send_timeout)


# Shared by every stream of a mode rather than built for each (memory per open stream).
_HEADERS = {mode: ((b"content-type", content_type), (b"cache-control", b"no-cache, no-transform"),
                   (b"x-accel-buffering", b"no")) for mode, content_type in CONTENT_TYPES.items()}


def last_user_message(chat: ChatRequest) -> str:
    return next((m.content for m in reversed(chat.messages) if m.role == "user"), "")


def pick_mode(request: Request, chat: ChatRequest) -> Mode:
    if not chat.stream:
        return "json"
    if "text/event-stream" in request.headers.get("accept", ""):
        return "sse"
    return "text"
