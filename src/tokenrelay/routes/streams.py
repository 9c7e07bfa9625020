"""``/api/streams/{id}``: come back for an answer, or stop it (docs/resume.md).

    GET    /api/streams/{id}   Accept: text/event-stream  the events after ``Last-Event-ID: N``
                                                          (or ``?after=N``; none: from the start),
                                                          then live, then its ending
                               Accept: text/plain         the text from byte ``?offset=N`` on,
                                                          then live
                               Accept: application/json   status, text so far, finish reason, usage
    DELETE /api/streams/{id}                              stop the model; answers once it stopped

The id is the one ``/api/get-response`` gave in ``X-Stream-Id`` (and SSE's ``start`` event).
An unknown, expired or someone else's id is a 404.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import TokenrelayError, ValidationFailed
from ..logs import client_name, request_id
from ..resume.log import Ending
from ..resume.registry import StreamRef, Streams
from ..schemas import describe_validation
from ..state import app_state
from ..streaming.response import StreamResponse, body_of
from ..streaming.wire import WIRES, Wire, text_of_events
from .endpoint import ASGIResponse, Endpoint


class Cursor(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    after: int = Field(default=0, ge=0, description="Replay the events after this id.")
    offset: int = Field(default=0, ge=0, description="Plain text: the answer from this byte on.")


def _cursor(request: Request) -> Cursor:
    query = dict(request.query_params)
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None and "after" not in query:
        query["after"] = last_event_id.strip()
    try:
        return Cursor.model_validate(query)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation(exc)) from None


def _find_args(request: Request) -> tuple[Streams, str, str | None]:
    return app_state(request).streams, request.path_params["stream_id"], client_name.get()


class NotAcceptable(TokenrelayError):
    status = 406
    type = "not_acceptable"


_OWN_WIRES = frozenset({"sse", "text"})
"""The wires whose pieces are the answer's text (``/api/get-response``)."""


@Endpoint
async def get_stream(request: Request) -> ASGIResponse:
    streams, stream_id, owner = _find_args(request)
    stream = await streams.find(stream_id, owner=owner)
    accept = request.headers.get("accept", "")
    if "text/event-stream" in accept or "last-event-id" in request.headers:  # only an SSE reader sends one
        # /api/get-response's text and SSE answers replay as tokenrelay's SSE; any other wire
        # (/v1's OpenAI chunks) as itself.
        if stream.wire in _OWN_WIRES:
            wire = WIRES["sse"]
        elif stream.wire in WIRES:
            wire = WIRES[stream.wire]
        else:  # a Responses API stream: its own cursor, by sequence_number
            raise NotAcceptable(f"a {stream.wire} stream replays at GET /v1/responses/resp_{stream.id[3:]}"
                                "?stream=true&starting_after=N; here: application/json for its status and text")
    elif "text/plain" in accept:
        if stream.wire not in _OWN_WIRES:
            raise NotAcceptable(f"a {stream.wire} stream has no plain-text form: ask for text/event-stream "
                                "(its events) or application/json (its status and text)")
        wire = WIRES["text"]
    else:
        return JSONResponse(await status(streams, stream),
                            headers={"x-stream-id": stream.id, "cache-control": "no-store"})
    cursor = _cursor(request)
    settings = app_state(request).settings
    headers = [(b"content-type", wire.content_type), (b"cache-control", b"no-cache, no-transform"),
               (b"x-accel-buffering", b"no"), (b"x-request-id", request_id.get().encode()),
               (b"x-stream-id", stream.id.encode())]
    return StreamResponse(body_of(replay(streams, stream, wire, cursor)), headers=headers, ping=wire.ping,
                          heartbeat=settings.heartbeat_interval, send_timeout=settings.send_timeout)


async def replay(streams: Streams, stream: StreamRef, wire: Wire, cursor: Cursor) -> AsyncGenerator[bytes, None]:
    """What the reader missed, then the rest as it comes, in ``wire``: encoded as the first
    connection's was, so nothing differs but where it starts."""
    async with streams.reading(stream):
        if wire.name == "text":
            async for piece in _text_from(streams, stream, cursor.offset):
                yield piece
            return
        opening = wire.opening(stream.id, stream.model)
        if opening:
            yield opening
        async for event in streams.follow(stream, cursor.after):
            if isinstance(event, Ending):
                closing = wire.ending(event)
                if closing:
                    yield closing
                return
            yield wire.piece(*event)


async def _text_from(streams: Streams, stream: StreamRef, offset: int) -> AsyncGenerator[bytes, None]:
    """The text from byte ``offset``: what is there, then each piece as it comes. A stream
    that failed or was stopped breaks off, as the first connection's did."""
    there = await streams.snapshot(stream, offset=offset)
    if there.text:
        yield there.text
    async for event in streams.follow(stream, there.last_seq):
        if isinstance(event, Ending):
            if event.kind != "done":
                raise TokenrelayError(f"the answer {event.status}; its SSE events or JSON status say why")
            return
        yield event[1].encode()


@Endpoint
async def delete_stream(request: Request) -> JSONResponse:
    streams, stream_id, owner = _find_args(request)
    ended = await streams.stop_id(stream_id, owner=owner)
    stream = await streams.find(stream_id, owner=owner)
    if not ended:
        # Not ended within the wait: say so, never "stopped" before it is.
        return JSONResponse(await status(streams, stream), status_code=202, headers={"retry-after": "1"})
    return JSONResponse(await status(streams, stream))


async def status(streams: Streams, stream: StreamRef) -> dict[str, object]:
    if stream.wire in _OWN_WIRES:
        now = await streams.snapshot(stream)
        text, last_seq, ending = now.text.decode(), now.last_seq, now.ending
    else:  # pieces that are events: the text is read out of them
        pieces, ending = await streams.pieces(stream)
        text, last_seq = text_of_events(stream.wire, pieces), len(pieces)
    return {
        "id": stream.id,
        "model": stream.model,
        "status": ending.status if ending else "running",
        "text": text,
        "last_event_id": last_seq,
        "ending": {"kind": ending.kind, **ending.data} if ending else None,
    }
