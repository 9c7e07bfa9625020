"""``POST /api/get-response``: the route of the original design, done right.

request → validation (here) → provider (routed, ``routing.ModelRouter``) → body in the wire
format (``streaming.live``, written to the stream's log as it goes) → ``StreamResponse``
→ client. The ``Accept`` header picks the wire: plain text by default, SSE for
``text/event-stream``; ``"stream": false`` asks for one JSON answer at the end. A streamed
answer can be resumed and stopped at ``/api/streams/{id}`` (``routes.streams``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request

from ..config import Settings
from ..errors import TokenrelayError, ValidationFailed
from ..logs import client_name, request_id
from ..providers.base import Delta
from ..resume.log import Ending
from ..resume.registry import LiveStream, new_stream_id
from ..routing import Attempts, ModelRouter
from ..schemas import ChatRequest, parse_model
from ..state import app_state
from ..streaming.live import live_body
from ..streaming.record import Mode, StreamRecord
from ..streaming.relay import CONTENT_TYPES, json_body
from ..streaming.response import Body, StreamResponse
from ..streaming.wire import WIRES
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
    if mode == "text" and chat.tools:
        # Plain text carries only the answer's text: an answer that is a tool call would be
        # a 200 with nothing in it.
        raise ValidationFailed("tools: plain text cannot carry a tool call; ask for SSE "
                               "('Accept: text/event-stream') or use /v1/chat/completions")
    provider = state.provider
    if mode == "json":  # one answer at the end: nothing to resume, leaving stops it
        record = StreamRecord(request_id=request_id.get(), stream_id=new_stream_id(), model=model, mode=mode,
                              prompt=last_user_message(chat) if settings.log_prompts else None)

        async def open_whole() -> Body:
            deltas = await open_deltas(provider, chat, model, record)
            return json_body(deltas, record)

        return StreamResponse(open_whole, headers=[*_HEADERS[mode], *_ids(record)], record=record,
                              observer=state.metrics, send_timeout=settings.send_timeout)

    streams = state.streams
    stream = streams.open(owner=client_name.get(), model=model, wire=mode, grace=resume_grace(request, settings))
    record = StreamRecord(request_id=request_id.get(), stream_id=stream.id, model=model, mode=mode,
                          prompt=last_user_message(chat) if settings.log_prompts else None)
    wire = WIRES[mode]

    async def open_body() -> Body:
        try:
            deltas = await open_deltas(provider, chat, model, record)
        except BaseException as exc:  # refused, or stopped while the upstream was asked
            streams.finished(stream, _ending_of(exc, stream))
            raise
        return live_body(deltas, record, stream, wire, streams)

    def say_stopped() -> bytes | None:
        return wire.ending(stream.log.ending) if stream.log.ending is not None else None

    response = StreamResponse(open_body, headers=[*_HEADERS[mode], *_ids(record)], record=record,
                              observer=state.metrics, ping=wire.ping, heartbeat=settings.heartbeat_interval,
                              send_timeout=settings.send_timeout, on_disconnect=lambda: streams.detach(stream),
                              on_stop=say_stopped)
    stream.stopper = response.stop
    return response


async def open_deltas(provider: ModelRouter, chat: ChatRequest, model: str,
                      record: StreamRecord) -> AsyncIterator[Delta]:
    attempts = Attempts()
    try:
        # The request is the provider's from here: not kept for the stream's lifetime.
        return await provider.open(chat, model=model, attempts=attempts)
    finally:
        record.attempts = str(attempts)


def resume_grace(request: Request, settings: Settings) -> float:
    """``TOKENRELAY_RESUME_GRACE``, or the request's own ``X-Resume-Grace``."""
    given = request.headers.get("x-resume-grace")
    if given is None:
        return settings.resume_grace
    try:
        grace = float(given)
    except ValueError:
        grace = -1.0
    if not 0 <= grace <= 3600:
        raise ValidationFailed(f"X-Resume-Grace: seconds from 0 to 3600 (got {given[:40]!r})")
    return grace


def _ids(record: StreamRecord) -> list[tuple[bytes, bytes]]:
    return [(b"x-request-id", record.request_id.encode()), (b"x-stream-id", record.stream_id.encode())]


def _ending_of(exc: BaseException, stream: LiveStream) -> Ending:
    if isinstance(exc, TokenrelayError):
        return Ending("error", exc.to_dict())
    return Ending("stopped", {"reason": stream.stop_reason or "client_cancelled", "usage": None})


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
