"""The baseline: a minimal relay as the original design wrote it (Starlette + httpx).

What a team writes in an afternoon, and what tokenrelay is measured against:

- ``POST /api/get-response``: asks the upstream for a stream, decodes each SSE line with
  ``json.loads`` and yields the delta's text through a ``StreamingResponse``;
- ``POST /v1/chat/completions``: passes the upstream's bytes through unchanged.

One shared ``httpx.AsyncClient``; no error handling beyond what the libraries do. Served by
uvicorn with its defaults::

    BASELINE_UPSTREAM=http://127.0.0.1:9000/v1 uvicorn bench.baseline_relay:app --port 8100
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("BASELINE_UPSTREAM", "http://127.0.0.1:9000/v1").rstrip("/")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    limits = httpx.Limits(max_connections=10_000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        app.state.client = client
        yield


async def get_response(request: Request) -> StreamingResponse:
    body = await request.json()
    client: httpx.AsyncClient = request.app.state.client
    upstream_body = {"model": body.get("model", "sim"), "messages": body["messages"], "stream": True}

    async def tokens() -> AsyncIterator[str]:
        async with client.stream("POST", UPSTREAM + "/chat/completions", json=upstream_body) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                choices = chunk.get("choices") or []
                if choices:
                    text = (choices[0].get("delta") or {}).get("content")
                    if text:
                        yield text

    return StreamingResponse(tokens(), media_type="text/plain; charset=utf-8")


async def completions(request: Request) -> StreamingResponse:
    client: httpx.AsyncClient = request.app.state.client
    upstream_request = client.build_request(
        "POST", UPSTREAM + "/chat/completions", content=await request.body(),
        headers={"content-type": "application/json"},
    )
    resp = await client.send(upstream_request, stream=True)

    async def passthrough() -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        finally:
            await resp.aclose()

    return StreamingResponse(passthrough(), status_code=resp.status_code,
                             media_type=resp.headers.get("content-type", "text/event-stream"))


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/api/get-response", get_response, methods=["POST"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ],
    lifespan=lifespan,
)
