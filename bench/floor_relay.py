"""The floor for relaying in Python: uvicorn with the parser and event loop tokenrelay runs
on, and an ASGI app that passes each request to the upstream with tokenrelay's own upstream
client (``providers.http11``) and writes every read of the answer back as it came — no
validation, no parsing, no log, no limits, no resume. What the cheapest relay built of
tokenrelay's parts costs; tokenrelay's figures above it are what its features add, and
nginx's below it are what Python and the ASGI hop cost.

    python -m bench.floor_relay --port 8300 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import sys
from typing import Any

from yarl import URL

from tokenrelay.providers.http11 import Pool

from .floor_app import HEADERS, request_body

REQUEST_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}
UPSTREAM = URL(sys.argv[sys.argv.index("--upstream") + 1]) if "--upstream" in sys.argv else URL("http://127.0.0.1")
pool = Pool(size=20_000, connect_timeout=10)  # as the bench's tokenrelay: W3 holds 10,000 streams


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = await request_body(scope, receive, send, on_shutdown=pool.aclose)
    if body is None:
        return
    # Sent once, as tokenrelay sends it: the simulator keeps idle connections longer than the
    # pool does, so none is closed under a request (tokenrelay sim --keepalive-timeout).
    conn = await pool.request("POST", UPSTREAM.with_path(scope["path"]), REQUEST_HEADERS, body)
    try:
        await send({"type": "http.response.start", "status": conn.status, "headers": HEADERS})
        while data := await conn.read():
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        conn.release()


if __name__ == "__main__":
    import uvicorn

    from tokenrelay.cli import fast_server

    port = int(sys.argv[sys.argv.index("--port") + 1])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", **fast_server())
