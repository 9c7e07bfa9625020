"""The floor for W3's memory per open stream: uvicorn with the parser and event loop
tokenrelay runs on, and an ASGI app that only writes OpenAI-style SSE chunks itself on a
timer — no upstream, no framework, no log, no limits. What an open stream costs a Python
server that does nothing else; tokenrelay's figure above it is what relaying adds (its
upstream connection among it).

    python -m bench.floor_app --port 8200
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"word "}}]}\n\n'
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def request_body(scope: dict[str, Any], receive: Any, send: Any,
                       on_shutdown: Callable[[], Awaitable[None]] | None = None) -> bytes | None:
    """What the floor apps share: the lifespan and a readiness ``GET`` answered here (None),
    else the request's body."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        if on_shutdown is not None:
            await on_shutdown()
        await send({"type": "lifespan.shutdown.complete"})
        return None
    if scope["method"] == "GET":  # readiness
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b""})
        return None
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = await request_body(scope, receive, send)
    if body is None:
        return
    model = orjson.loads(body).get("model", "")
    tps = float(_option(model, "tps", 2.0))
    tokens = int(_option(model, "tokens", 60))
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    for _ in range(tokens):
        if tps:
            await asyncio.sleep(1 / tps)
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def _option(model: str, name: str, default: float) -> str | float:
    found = re.search(rf"{name}=([0-9.]+)", model)
    return found.group(1) if found else default


if __name__ == "__main__":
    import uvicorn

    from tokenrelay.cli import fast_server

    port = int(sys.argv[sys.argv.index("--port") + 1])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", **fast_server())
