"""``tokenrelay sim``: the simulator served as an OpenAI-compatible HTTP API.

Routes: ``POST /v1/chat/completions`` (stream or not, ``stream_options.include_usage``, tool
calls), ``POST /v1/messages`` (Anthropic's Messages API, see ``sim_anthropic``),
``GET /v1/models``, and ``GET /sim/stats`` — how many streams are open, finished and
cancelled by their client, which is how tests prove that a departed browser really stopped
the model. Options per request ride in the model name (see ``providers.simulator``) or in an
``X-Sim-Options`` header with the same syntax (``echo,tps=5,fault=error-mid``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import sim_anthropic
from .errors import TokenrelayError, UpstreamError, UpstreamProtocolError, ValidationFailed
from .providers.base import Delta
from .providers.simulator import SimOptions, Simulator
from .schemas import ChatRequest, chat_from_openai, parse_json_object
from .streaming.openai_chunks import DONE, ChunkEncoder, Completion

MODELS = ("sim", "sim:echo")


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


class _Completion:
    """One simulated completion as an ASGI response, counted in ``SimStats``."""

    def __init__(self, *, sim: Simulator, chat: ChatRequest, model: str, stream: bool,
                 include_usage: bool, stats: SimStats, anthropic: bool = False) -> None:
        self.sim, self.chat, self.model = sim, chat, model
        self.anthropic = anthropic
        self.stream, self.include_usage, self.stats = stream, include_usage, stats
        self.id = "chatcmpl-sim" + format(stats.total_streams, "x")
        self.created = int(time.time())
        self._done = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        stats = self.stats
        stats.total_streams += 1
        stats.open_streams += 1
        outcome = "failed"
        try:
            async with anyio.create_task_group() as tg:

                async def listen() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not self._done:
                        nonlocal outcome
                        outcome = "cancelled"
                        tg.cancel_scope.cancel()

                tg.start_soon(listen)
                if self.anthropic:
                    body = sim_anthropic.stream_messages if self.stream else sim_anthropic.whole_message
                    done = await body(self, send)
                else:
                    done = await (self._stream(send) if self.stream else self._whole(send))
                if done:
                    outcome = "completed"
                self._done = True
                tg.cancel_scope.cancel()
        finally:
            stats.open_streams -= 1
            if outcome == "completed":
                stats.completed_streams += 1
            elif outcome == "cancelled":
                stats.cancelled_streams += 1
            else:
                stats.failed_streams += 1

    async def _open(self, send: Any) -> AsyncIterator[Delta] | None:
        try:
            return await self.sim.open(self.chat, model=self.model)
        except UpstreamError as exc:
            status = exc.upstream_status or 500
            headers = [(b"content-type", b"application/json")]
            headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            body = sim_anthropic.error_body(exc, status) if self.anthropic else _openai_error(exc)
            await send({"type": "http.response.body", "body": body})
            return None

    async def _stream(self, send: Any) -> bool:
        deltas = await self._open(send)
        if deltas is None:
            return False
        enc = ChunkEncoder(id=self.id, model=self.model, created=self.created)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": enc.role(), "more_body": True})
        try:
            async for delta in deltas:
                body = enc.encode(delta, include_usage=self.include_usage)
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
        except UpstreamProtocolError:
            await send({"type": "http.response.body", "body": b'data: {"choices": [{"delta": \n\n'})
            return False
        except UpstreamError as exc:
            await send({"type": "http.response.body", "body": b"data: " + _openai_error(exc) + b"\n\n"})
            return False
        finally:
            with anyio.CancelScope(shield=True):
                await deltas.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": DONE})
        return True

    async def _whole(self, send: Any) -> bool:
        deltas = await self._open(send)
        if deltas is None:
            return False
        completion = Completion()
        try:
            async for delta in deltas:
                completion.add(delta)
        except UpstreamError as exc:
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": _openai_error(exc)})
            return False
        body = completion.body(id=self.id, model=self.model, created=self.created)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return True


async def _client_left(request: Request, exc: Exception) -> Response:
    """The answer to a client that left before its request arrived whole: nobody reads it,
    and it is not the simulator's error (nginx's 499)."""
    return Response(status_code=499)


def create_sim_app(defaults: SimOptions | None = None) -> Starlette:
    sim = Simulator(defaults)
    stats = SimStats()

    async def completions(request: Request) -> Response:
        raw = await request.body()
        data = parse_json_object(raw)
        chat = chat_from_openai(data)
        model = chat.model or "sim"
        extra = request.headers.get("x-sim-options")
        if extra:
            base, _, spec = model.partition(":")
            model = base + ":" + ",".join(filter(None, (spec, extra)))
        sim.defaults.with_model(model)  # refuse unknown options here, as a 400
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        stream = bool(data.get("stream", False))
        return _Completion(sim=sim, chat=chat, model=model, stream=stream,  # type: ignore[return-value]
                           include_usage=include_usage, stats=stats)

    async def messages(request: Request) -> Response:
        """Anthropic's Messages API (``sim_anthropic``)."""
        try:
            if not request.headers.get("x-api-key"):
                return Response(sim_anthropic.error_body(TokenrelayError("x-api-key header is required"), 401),
                                status_code=401, media_type="application/json")
            if not request.headers.get("anthropic-version"):
                raise ValidationFailed("anthropic-version header is required")
            data = parse_json_object(await request.body())
            chat = sim_anthropic.chat_from_messages(data)
            model = chat.model or "sim"
            sim.defaults.with_model(model)
        except TokenrelayError as exc:
            return Response(sim_anthropic.error_body(exc, 400), status_code=400, media_type="application/json")
        return _Completion(sim=sim, chat=chat, model=model, stream=bool(data.get("stream", False)),  # type: ignore[return-value]
                           include_usage=False, stats=stats, anthropic=True)

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

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/sim/stats", sim_stats, methods=["GET"]),
        ],
        exception_handlers={TokenrelayError: error, ClientDisconnect: _client_left},
        lifespan=lifespan,
    )
