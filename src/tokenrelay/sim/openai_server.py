"""``tokenrelay sim``: the simulator served as an OpenAI-compatible HTTP API.

Routes: ``POST /v1/chat/completions`` (stream or not, ``stream_options.include_usage``, tool
calls), ``POST /v1/messages`` (Anthropic's Messages API, see ``anthropic_server``),
``POST /v1/responses`` (OpenAI's Responses API, see ``responses_server``; not with ``--chat-only``),
``GET /v1/models``, and ``GET /sim/stats`` — how many streams are open, finished and
cancelled by their client, which is how tests prove that a departed browser really stopped
the model. Options per request ride in the model name (see ``options``) or in an
``X-Sim-Options`` header with the same syntax (``echo,tps=5,fault=error-mid``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import TokenrelayError, UpstreamError, UpstreamProtocolError, ValidationFailed
from ..providers.base import Delta
from ..schemas import ChatRequest, chat_from_openai, parse_json_object
from ..streaming.openai_chunks import DONE, ChunkEncoder
from ..streaming.relay import collect
from ..routes.endpoint import Endpoint
from ..streaming.response import Body, Headers, StreamResponse
from . import anthropic_server, responses_server
from .options import MODELS, SimOptions
from .provider import Simulator


@dataclass
class SimStats:
    open_streams: int = 0
    total_streams: int = 0
    completed_streams: int = 0
    cancelled_streams: int = 0
    failed_streams: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _openai_error(exc: TokenrelayError) -> bytes:
    message = getattr(exc, "reason", "") or exc.message
    kind = "rate_limit_error" if exc.status == 429 else (
        "invalid_request_error" if exc.status < 500 else "server_error"
    )
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


class SimAnswer:
    """One simulated answer: its body for ``StreamResponse`` in OpenAI's or Anthropic's
    wire, counted in ``SimStats`` as completed, cancelled by its client, or failed."""

    def __init__(self, *, sim: Simulator, chat: ChatRequest, model: str, stream: bool,
                 include_usage: bool, stats: SimStats, anthropic: bool = False,
                 responses: dict[str, Any] | None = None) -> None:
        self.sim, self.chat, self.model = sim, chat, model
        self.anthropic = anthropic
        self.responses = responses
        """The request's fields a Response repeats, for a ``/v1/responses`` answer."""
        self.stream, self.include_usage, self.stats = stream, include_usage, stats
        self.id = "chatcmpl-sim" + format(stats.total_streams, "x")
        self.created = int(time.time())
        self.headers: Headers = [(b"cache-control", b"no-cache")]
        self.complete = False
        """Set by the body once the whole answer, with its proper ending, was written."""

    def response(self) -> StreamResponse:
        return StreamResponse(self._open, headers=self.headers, error_response=self._error)

    async def _open(self) -> Body:
        stats = self.stats
        stats.total_streams += 1
        stats.open_streams += 1
        try:
            deltas = await self.sim.open(self.chat, model=self.model)
        except BaseException:
            self._count("failed")
            raise
        if self.responses is not None:
            body = (responses_server.stream_events if self.stream else responses_server.whole_response)(
                self, deltas, self.responses)
        elif self.anthropic:
            body = (anthropic_server.stream_messages if self.stream else anthropic_server.whole_message)(self, deltas)
        else:
            body = self._stream(deltas) if self.stream else self._whole(deltas)
        return self._counted(body)

    async def _counted(self, body: Body) -> Body:
        outcome = "failed"
        try:
            async for piece in body:
                yield piece
            if self.complete:
                outcome = "completed"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"  # the client left
            raise
        finally:
            await body.aclose()
            self._count(outcome)

    def _count(self, outcome: str) -> None:
        stats = self.stats
        stats.open_streams -= 1
        if outcome == "completed":
            stats.completed_streams += 1
        elif outcome == "cancelled":
            stats.cancelled_streams += 1
        else:
            stats.failed_streams += 1

    def _error(self, exc: TokenrelayError) -> tuple[int, Headers, bytes]:
        status = getattr(exc, "upstream_status", None) or 500
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        body = anthropic_server.error_body(exc, status) if self.anthropic else _openai_error(exc)
        return status, headers, body

    async def _stream(self, deltas: AsyncIterator[Delta]) -> Body:
        enc = ChunkEncoder(id=self.id, model=self.model, created=self.created)
        self.headers.append((b"content-type", b"text/event-stream"))
        try:
            yield enc.role()
            async for delta in deltas:
                body = enc.encode(delta, include_usage=self.include_usage)
                if body:
                    yield body
        except UpstreamProtocolError:
            yield b'data: {"choices": [{"delta": \n\n'
            return
        except UpstreamError as exc:
            yield b"data: " + _openai_error(exc) + b"\n\n"
            return
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]
        yield DONE
        self.complete = True

    async def _whole(self, deltas: AsyncIterator[Delta]) -> Body:
        completion = await collect(deltas)
        self.headers.append((b"content-type", b"application/json"))
        yield completion.body(id=self.id, model=self.model, created=self.created)
        self.complete = True


def _with_header_options(model: str, request: Request) -> str:
    """The model name with the ``X-Sim-Options`` header's options added to its own."""
    extra = request.headers.get("x-sim-options")
    if not extra:
        return model
    base, _, spec = model.partition(":")
    return base + ":" + ",".join(filter(None, (spec, extra)))


async def _client_left(request: Request, exc: Exception) -> Response:
    """The answer to a client that left before its request arrived whole: nobody reads it,
    and it is not the simulator's error (nginx's 499)."""
    return Response(status_code=499)


def create_sim_app(defaults: SimOptions | None = None, *, responses: bool = True) -> Starlette:
    """The simulator's app; ``responses=False`` serves no ``/v1/responses`` (a chat-completions-only upstream)."""
    sim = Simulator(defaults)
    stats = SimStats()

    async def completions(request: Request) -> StreamResponse:
        raw = await request.body()
        data = parse_json_object(raw)
        chat = chat_from_openai(data)
        model = chat.model or "sim"
        model = _with_header_options(model, request)
        sim.defaults.with_model(model)  # refuse unknown options here, as a 400
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        stream = bool(data.get("stream", False))
        return SimAnswer(sim=sim, chat=chat, model=model, stream=stream, include_usage=include_usage,
                         stats=stats).response()

    async def create_response(request: Request) -> StreamResponse:
        """OpenAI's Responses API (``responses_server``)."""
        data = parse_json_object(await request.body())
        chat, echo = responses_server.chat_from_responses(data)
        model = _with_header_options(chat.model or "sim", request)
        sim.defaults.with_model(model)
        return SimAnswer(sim=sim, chat=chat, model=model, stream=bool(data.get("stream", False)),
                         include_usage=False, stats=stats, responses=echo).response()

    async def messages(request: Request) -> Response | StreamResponse:
        """Anthropic's Messages API (``anthropic_server``)."""
        try:
            if not request.headers.get("x-api-key"):
                return Response(anthropic_server.error_body(TokenrelayError("x-api-key header is required"), 401),
                                status_code=401, media_type="application/json")
            if not request.headers.get("anthropic-version"):
                raise ValidationFailed("anthropic-version header is required")
            data = parse_json_object(await request.body())
            chat = anthropic_server.chat_from_messages(data)
            model = chat.model or "sim"
            sim.defaults.with_model(model)
        except TokenrelayError as exc:
            return Response(anthropic_server.error_body(exc, 400), status_code=400, media_type="application/json")
        return SimAnswer(sim=sim, chat=chat, model=model, stream=bool(data.get("stream", False)),
                         include_usage=False, stats=stats, anthropic=True).response()

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "tokenrelay-simulator"} for m in MODELS]})

    async def sim_stats(request: Request) -> JSONResponse:
        return JSONResponse(stats.to_dict())

    async def error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TokenrelayError)
        status = 400 if isinstance(exc, ValidationFailed) else exc.status
        return Response(_openai_error(exc), status_code=status, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.stats = stats
        yield

    routes = [
        Route("/v1/chat/completions", Endpoint(completions), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/messages", Endpoint(messages), methods=["POST"]),
        Route("/sim/stats", sim_stats, methods=["GET"]),
    ]
    if responses:
        routes.append(Route("/v1/responses", Endpoint(create_response), methods=["POST"]))
    return Starlette(
        routes=routes,
        exception_handlers={TokenrelayError: error, ClientDisconnect: _client_left},
        lifespan=lifespan,
    )
