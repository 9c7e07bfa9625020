"""``/v1/responses``: OpenAI's Responses API through tokenrelay, for any upstream
(docs/openai-relay.md, "The Responses API").

    POST /v1/responses                       stream or not; ``background: true`` returns at once
    GET  /v1/responses/{id}                  the Response object: status, output so far
    GET  /v1/responses/{id}?stream=true&starting_after=N
                                             the events after ``sequence_number`` N, then live
    POST /v1/responses/{id}/cancel           stop the model (as ``DELETE /api/streams/{id}``)

A request goes by its model's route, with the keys, limits, retries before the first byte
and fallback of ``/v1/chat/completions``. Two paths:

* **passthrough** — an OpenAI-compatible upstream that serves ``/responses`` itself gets the
  body unchanged and its answer goes back as it is. tokenrelay learns whether it does by
  trying: a 404 for the path (not for a model) marks the upstream as one that serves only
  chat completions, and this request and every later one are translated (the mark lasts
  for the process).
* **translated** — the simulator, the Anthropic route, a chat-completions-only upstream, and
  every ``background`` request: the body becomes a chat completions request
  (``responses_request``), the answer's deltas become Responses events
  (``streaming.responses_events``). Each event's JSON goes into the stream log as it is
  sent, so the response id is a stream of ``resume.registry.Streams`` (``resp_`` + the
  stream id's 128 random bits, owned by the client key like any stream): any reader can
  replay it by ``sequence_number`` and follow it live, and the Response object is rebuilt
  from the log.

A client that leaves a streamed (not background) response stops the model, as on
``/v1/chat/completions``, after the ``X-Resume-Grace`` it asked for (default 0). A background
response runs with nobody attached for ``TOKENRELAY_STREAM_TTL``.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import NotFound, TokenrelayError, UpstreamError, UpstreamProtocolError, UpstreamRejected
from ..logs import client_name, request_id
from ..providers.base import Delta, OpenAIRequest, Passthrough, UpstreamBody, Usage
from ..providers.chat_chunks import chunk_deltas
from ..providers.openai_compat import OpenAICompatible
from ..providers.sse_decoder import SSEDecoder
from ..resume.log import Ending
from ..resume.registry import LiveStream, StreamRef, Streams, new_stream_id
from ..responses_request import ResponsesBody, Unsupported, check_body, echo_fields, to_chat
from ..routing import Attempts, Upstream
from ..state import AppState, app_state
from ..streaming.openai_relay import STREAM_HEADERS, openai_error, pass_whole
from ..streaming.record import StreamRecord, log_request
from ..streaming.relay import close_deltas
from ..streaming.response import Body, Headers, StreamResponse, body_of
from ..streaming.responses_events import Event, ResponseEvents, frame, frame_of_piece, snapshot, sse
from .endpoint import ASGIResponse, Endpoint
from .openai import read_v1_body
from .stream import resume_grace

WIRE = "responses"
"""The ``wire`` of a response's stream in ``Streams``: its pieces are Responses events' JSON."""

ROUTE = "/v1/responses"
SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"
PING = b": ping\n\n"

_background: set[asyncio.Task[None]] = set()
"""Background responses being generated: held so the loop does not drop them mid-answer."""


def response_id(stream_id: str) -> str:
    return "resp_" + stream_id.removeprefix("st_")


def _stream_id(response_id: str) -> str:
    return "st_" + response_id.removeprefix("resp_")


# --- POST /v1/responses ---

@Endpoint
async def create_response(request: Request) -> ASGIResponse:
    state = app_state(request)
    settings = state.settings
    raw, body, checked, model = await read_v1_body(request, check_body, lambda m: Unsupported(m, param="model"))
    stream, background = bool(checked.stream), bool(checked.background)
    record = StreamRecord(request_id=request_id.get(), stream_id=new_stream_id(), model=model,
                          mode="sse" if stream else "json", route=ROUTE)
    opener = _Opener(state, raw, body, model, passthrough=not background)
    if background:
        return await _start_background(state, opener, checked, record, stream=stream)

    answer = _Answer(state.streams)
    headers: Headers = [*STREAM_HEADERS, (b"x-request-id", record.request_id.encode())]
    grace = resume_grace(request, settings) if "x-resume-grace" in request.headers else 0.0

    async def open_body() -> Body:
        opened = await opener.open(record)
        if isinstance(opened, Passthrough):
            if stream:
                return pass_events(opened.response, record, headers)
            return pass_whole(opened.response, record, headers)
        log_stream = state.streams.open(owner=client_name.get(), model=model, wire=WIRE, grace=grace)
        log_stream.stopper = response.stop
        answer.stream = log_stream
        record.stream_id = log_stream.id
        events = ResponseEvents(id=response_id(log_stream.id), model=model, echo=echo_fields(checked))
        return produce(opened, events, events.start(), log_stream, state.streams, record, answer,
                       out="sse" if stream else "json", headers=headers)

    response = StreamResponse(open_body, headers=headers, record=record, observer=state.metrics,
                              ping=PING if stream else None, heartbeat=settings.heartbeat_interval,
                              send_timeout=settings.send_timeout, error_response=openai_error, resumable=answer)
    answer.response = response
    return response


class _Opener:
    """Opens the request on its model's route, with retries and fallback (``routing``):
    passed through where the upstream serves the Responses API, else translated."""

    __slots__ = ("body", "model", "passthrough", "raw", "state")

    def __init__(self, state: AppState, raw: bytes, body: dict[str, Any], model: str, *, passthrough: bool) -> None:
        self.state, self.raw, self.body, self.model, self.passthrough = state, raw, body, model, passthrough

    async def open(self, record: StreamRecord) -> Passthrough | AsyncIterator[Delta]:
        router = self.state.router
        attempts = Attempts()
        try:
            return await router.open_with_retries(router.resolve(self.model), self._attempt, attempts)
        finally:
            record.attempts = str(attempts)

    async def _attempt(self, upstream: Upstream) -> Passthrough | AsyncIterator[Delta]:
        provider = upstream.provider
        if isinstance(provider, OpenAICompatible):
            if self.passthrough and provider.serves_responses is not False:
                try:
                    opened = Passthrough(await provider.send_responses(self.raw, stream=bool(self.body.get("stream"))))
                except UpstreamRejected as exc:
                    if not _path_missing(exc):
                        raise
                    provider.serves_responses = False  # from now on: translated
                else:
                    provider.serves_responses = True
                    return opened
            chat = to_chat(self.body, model=self.model, kind="openai")
            return chunk_deltas(await provider.send(orjson.dumps(chat), stream=True))
        kind: Literal["anthropic", "simulator"] = "anthropic" if upstream.kind == "anthropic" else "simulator"
        chat = to_chat(self.body, model=self.model, kind=kind)
        answer = await provider.open_openai(OpenAIRequest(orjson.dumps(chat), chat, True), model=self.model)
        if isinstance(answer, Passthrough):  # a provider that speaks chat completions, relayed as bytes
            return chunk_deltas(answer.response)
        return answer


def _path_missing(exc: UpstreamError) -> bool:
    """A 404 for ``/responses`` itself, not for the model: OpenAI and the servers that copy it
    say ``model`` in a model's 404; a server without the route says nothing of the sort."""
    return exc.upstream_status == 404 and "model" not in (exc.reason or "").lower()


class _Answer:
    """A translated answer's part in its ``StreamResponse`` (``response.Resumable``)."""

    __slots__ = ("closing", "response", "stream", "streams")

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.stream: LiveStream | None = None
        self.response: StreamResponse | None = None
        self.closing: bytes | None = None
        """The events a stop ends the answer with (``response.incomplete``), for a client still connected."""

    def client_left(self) -> None:
        if self.stream is not None:
            self.streams.detach(self.stream)
        elif self.response is not None:  # not (or never) logged: leaving stops it at once
            self.response.stop("client_cancelled")

    def closing_on_stop(self) -> bytes | None:
        return self.closing


Out = Literal["sse", "json", "none"]


async def produce(deltas: AsyncIterator[Delta], events: ResponseEvents, opening: list[Event], stream: LiveStream,
                  streams: Streams, record: StreamRecord, answer: _Answer | None, *, out: Out,
                  headers: Headers) -> AsyncGenerator[bytes, None]:
    """The answer as Responses events, each written to the stream's log as it is made; to
    the client as SSE (``out="sse"``), as the Response object at the end (``"json"``), or
    not at all (``"none"``: a background response)."""
    log = stream.log

    def write(batch: list[Event]) -> bytes:
        frames = b""
        for event in batch:
            piece, framed = sse(event)
            log.append(piece)
            frames += framed
        return frames

    async def caught_up() -> None:
        """Wait while the shared store (Redis) is far behind, as every logged answer does."""
        if log.backlog is not None and (behind := log.backlog()) is not None:
            await behind

    ending: Ending | None = None
    failure: TokenrelayError | None = None
    closing = b""
    last: Event | None = None
    try:
        first = write(opening)
        if out == "sse":
            headers.insert(0, (b"content-type", SSE_CONTENT_TYPE))
            yield first
        async for delta in deltas:
            record.note(delta)
            batch = events.delta(delta)
            if not batch:
                continue
            framed = write(batch)
            await caught_up()
            if record.first_token is None:
                record.first_token = time.perf_counter()
            record.chunks += 1
            record.bytes_out += len(framed)
            if out == "sse":
                yield framed
        batch = events.complete()
        last = batch[-1]
        closing = write(batch)
        ending = Ending("done", {"finish_reason": record.finish_reason, "usage": _usage(record)})
    except TokenrelayError as exc:  # the upstream failed, or the answer outgrew its log
        failure = exc
    finally:
        await close_deltas(deltas)
        if failure is not None:
            batch = events.fail(failure)
            last = batch[0]
            closing = _write_last(write, batch)
            ending = Ending("error", failure.to_dict())
        elif ending is None:  # cancelled: stopped, its client gone, or shutdown
            closing = _write_last(write, events.cancelled())
            if answer is not None:
                answer.closing = closing
            ending = Ending("stopped", {"reason": stream.stop_reason or "client_cancelled", "usage": _usage(record)})
        streams.finished(stream, ending)
    if out == "json":
        if failure is not None:
            raise failure  # nothing sent yet: an honest status, in OpenAI's shape
        assert last is not None
        whole = orjson.dumps(last["response"])
        record.bytes_out = len(whole)
        headers.insert(0, (b"content-type", b"application/json"))
        yield whole
        return
    if failure is not None:
        record.fail(failure, midway=True)
    if out == "sse":
        record.bytes_out += len(closing)
        yield closing


def _write_last(write: Any, batch: list[Event]) -> bytes:
    """The last events, logged where the log still takes them (a log past its size cap
    does not): the client is told either way."""
    try:
        framed: bytes = write(batch)
        return framed
    except TokenrelayError:
        return b"".join(sse(event)[1] for event in batch)


def _usage(record: StreamRecord) -> dict[str, int] | None:
    return record.usage.to_dict() if record.usage else None


# --- background ---

async def _start_background(state: AppState, opener: _Opener, checked: ResponsesBody, record: StreamRecord, *,
                            stream: bool) -> ASGIResponse:
    """Log the queued response, generate it in a task of its own, and answer as soon as every
    instance can find it."""
    streams = state.streams
    log_stream = streams.open(owner=client_name.get(), model=opener.model, wire=WIRE, grace=state.settings.stream_ttl)
    record.stream_id = log_stream.id
    events = ResponseEvents(id=response_id(log_stream.id), model=opener.model, echo=echo_fields(checked))
    queued = [sse(event)[0] for event in events.start(queued=True)]
    for piece in queued:
        log_stream.log.append(piece)
    task = asyncio.get_running_loop().create_task(_generate(state, opener, events, log_stream, record))
    _background.add(task)
    task.add_done_callback(_background.discard)

    def stop(reason: str) -> None:
        task.cancel()

    log_stream.stopper = stop
    streams.detach(log_stream)  # nobody attached: it runs on for its grace, TOKENRELAY_STREAM_TTL
    await streams.published(log_stream)  # its id may be cancelled on another instance at once
    if stream:
        return _replay_response(state, log_stream, after=0)
    return JSONResponse(snapshot(queued), headers={"x-request-id": record.request_id})


async def _generate(state: AppState, opener: _Opener, events: ResponseEvents, stream: LiveStream,
                    record: StreamRecord) -> None:
    streams = state.streams
    state.metrics.stream_started(record)
    try:
        try:
            deltas = await opener.open(record)
        except TokenrelayError as exc:
            record.fail(exc, midway=False)
            _write_last(lambda batch: [stream.log.append(sse(e)[0]) for e in batch], events.fail(exc))
            streams.finished(stream, Ending("error", exc.to_dict()))
            return
        except asyncio.CancelledError:
            _write_last(lambda batch: [stream.log.append(sse(e)[0]) for e in batch], events.cancelled())
            streams.finished(stream, Ending("stopped", {"reason": stream.stop_reason or "stopped", "usage": None}))
            record.outcome = stream.stop_reason or "stopped"
            return
        assert not isinstance(deltas, Passthrough)  # a background request is always translated
        body = produce(deltas, events, events.running(), stream, streams, record, None, out="none", headers=[])
        try:
            async for _ in body:
                pass
        except asyncio.CancelledError:
            record.outcome = stream.stop_reason or "stopped"
        finally:
            await body.aclose()
    finally:
        log_request(record)
        state.metrics.stream_finished(record)


# --- passthrough of a streamed response ---

async def pass_events(response: UpstreamBody, record: StreamRecord, headers: Headers) -> AsyncGenerator[bytes, None]:
    """The upstream's own Responses events, relayed as they arrive. They are looked at in
    passing for the log line (usage) and to notice a stream that broke off before its
    terminal event, which the client is then told by an ``error`` event it raises."""
    headers.insert(0, (b"content-type", response.headers.get("content-type", "text/event-stream").encode()))
    decoder = SSEDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    ended = False
    failure: UpstreamError | None = None
    try:
        async for chunk in response:
            try:
                utf8.decode(chunk)
            except UnicodeDecodeError as exc:
                raise UpstreamProtocolError(f"upstream sent bytes that are not UTF-8 in its event stream: {exc}") from None
            if record.first_token is None:
                record.first_token = time.perf_counter()
            record.bytes_out += len(chunk)
            for event in decoder.feed(chunk):
                record.chunks += 1
                ended = ended or _terminal(event.data, record)
            yield chunk
        if not ended:
            failure = UpstreamProtocolError("upstream closed the stream before response.completed")
    except UpstreamError as exc:
        failure = exc
    finally:
        response.close()
    if failure is not None:
        record.fail(failure, midway=True)
        error = {"type": "server_error", "code": failure.type, "message": failure.message, "param": None}
        yield b"\n\n" + frame("error", orjson.dumps({"type": "error", "sequence_number": -1, "code": failure.type,
                                                     "message": failure.message, "param": None, "error": error}))


def _terminal(data: str, record: StreamRecord) -> bool:
    if '"response.' not in data:
        return False
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    kind = event.get("type") if isinstance(event, dict) else None
    if kind not in ("response.completed", "response.failed", "response.incomplete"):
        return False
    usage = (event.get("response") or {}).get("usage")
    if isinstance(usage, dict):
        try:
            record.usage = Usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0),
                                 int(usage.get("total_tokens") or 0))
        except (TypeError, ValueError):
            pass
    if kind == "response.failed":
        record.outcome = "failed_midway"
    return True


# --- GET /v1/responses/{id}, POST /v1/responses/{id}/cancel ---

async def _find(request: Request) -> tuple[Streams, StreamRef]:
    streams = app_state(request).streams
    given = request.path_params["response_id"]
    try:
        if not given.startswith("resp_"):
            raise NotFound("")
        # Wherever it runs: this instance, or another one writing it into Redis.
        stream = await streams.find(_stream_id(given), owner=client_name.get())
        if stream.wire != WIRE:
            raise NotFound("")
    except NotFound:
        raise NotFound(f"No response found with id {given!r}: unknown, expired (TOKENRELAY_STREAM_TTL), or "
                       "passed through to an upstream that keeps it itself") from None
    return streams, stream


@Endpoint
async def retrieve_response(request: Request) -> ASGIResponse:
    state = app_state(request)
    streams, stream = await _find(request)
    query = request.query_params
    if query.get("stream", "false").lower() not in ("true", "1"):
        return JSONResponse(await _status(streams, stream), headers={"cache-control": "no-store"})
    given = query.get("starting_after")
    try:
        after = -1 if given is None else int(given)
        if after < -1:
            raise ValueError
    except ValueError:
        raise Unsupported(f"starting_after: a sequence_number, 0 or more (got {given!r})",
                          param="starting_after") from None
    return _replay_response(state, stream, after=after + 1)


def _replay_response(state: AppState, stream: StreamRef, *, after: int) -> StreamResponse:
    """The logged events after log piece ``after`` (``sequence_number`` + 1), then live."""
    settings = state.settings
    headers: Headers = [(b"content-type", SSE_CONTENT_TYPE), *STREAM_HEADERS,
                        (b"x-request-id", request_id.get().encode())]
    return StreamResponse(body_of(_replay(state.streams, stream, after)), headers=headers, ping=PING,
                          heartbeat=settings.heartbeat_interval, send_timeout=settings.send_timeout,
                          error_response=openai_error)


async def _replay(streams: Streams, stream: StreamRef, after: int) -> AsyncGenerator[bytes, None]:
    async with streams.reading(stream):
        async for event in streams.follow(stream, after):
            if isinstance(event, Ending):
                return
            yield frame_of_piece(event[1])


async def _status(streams: Streams, stream: StreamRef) -> dict[str, Any]:
    pieces, ending = await streams.pieces(stream)
    response = snapshot(pieces) or {"id": response_id(stream.id), "object": "response",
                                    "status": "queued", "model": stream.model, "output": []}
    if ending is not None and response.get("status") in ("queued", "in_progress"):
        response["status"] = {"done": "completed", "error": "failed", "stopped": "cancelled"}[ending.kind]
    return response


@Endpoint
async def cancel_response(request: Request) -> JSONResponse:
    streams, stream = await _find(request)
    if not await streams.stop(stream):
        return JSONResponse(await _status(streams, stream), status_code=202, headers={"retry-after": "1"})
    return JSONResponse(await _status(streams, stream))
