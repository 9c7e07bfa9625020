"""``POST /api/get-response``: the route of the original design, done right.

request → validation (here) → provider → relay (``streaming.relay``) → client.
The ``Accept`` header picks the wire: plain text by default, SSE for
``text/event-stream``; ``"stream": false`` asks for one JSON answer at the end.
"""

from __future__ import annotations

import random

from starlette.requests import Request

from ..errors import PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from ..logs import request_id
from ..schemas import ChatRequest, parse_model
from ..routing import RoutedProvider
from ..streaming.relay import Mode, RelayResponse, StreamRecord


async def get_response(request: Request) -> RelayResponse:
    state = request.app.state
    raw = await read_json_body(request, state.settings.max_body_bytes)
    chat = parse_model(ChatRequest, raw)
    model = chat.model or state.settings.default_model
    if model is None:
        raise ValidationFailed("model: required, since no default model is set (TOKENRELAY_MODEL)")
    upstream = state.router.resolve(model)
    record = StreamRecord(
        request_id=request_id.get(),
        stream_id=new_stream_id(),
        model=model,
        mode=pick_mode(request, chat),
        prompt=last_user_message(chat) if state.settings.log_prompts else None,
    )

    def report(attempts: str) -> None:
        record.attempts = attempts

    return RelayResponse(
        provider=RoutedProvider(state.router, upstream, report), request=chat, record=record,
        heartbeat=state.settings.heartbeat_interval, observer=state.metrics,
    )


def last_user_message(chat: ChatRequest) -> str:
    return next((m.content for m in reversed(chat.messages) if m.role == "user"), "")


def pick_mode(request: Request, chat: ChatRequest) -> Mode:
    if not chat.stream:
        return "json"
    if "text/event-stream" in request.headers.get("accept", ""):
        return "sse"
    return "text"


def new_stream_id() -> str:
    """A stream's name in logs, headers and events. It grants nothing, so it comes from the
    process's PRNG (seeded anew in every process, forked or not) rather than a system call for
    ``secrets``: 96 bits keep names from colliding."""
    return f"st_{random.getrandbits(96):024x}"


# text/plain is what fetch() sends for a string body when no Content-Type is set — as the
# original design's client does — so it is read as JSON too; forms, XML and the like are not.
JSON_MEDIA_TYPES = frozenset({"application/json", "text/plain", ""})


async def read_json_body(request: Request, limit: int) -> bytes:
    """The request body, refused early when it is not JSON or larger than ``limit``."""
    content_type = request.headers.get("content-type", "")
    media = content_type.partition(";")[0].strip().lower()
    if media not in JSON_MEDIA_TYPES and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"send the body as JSON with 'Content-Type: application/json' (got {content_type or 'none'!r})"
        )
    too_large = PayloadTooLarge(f"request body is larger than {limit} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)
