"""``/api/get-response``'s one-shot answer (``"stream": false``): provider deltas → one JSON
object at the end. The streamed wires (text, SSE) are written by ``streaming.live``, through
the stream's log.

``json_body`` is a body for ``StreamResponse``: it takes the provider's opened deltas, fills
in the request's ``StreamRecord``, and closes the deltas — and with them the upstream
request — however it ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

import orjson

from ..providers.base import Delta
from .openai_chunks import Completion
from .record import StreamRecord


async def json_body(deltas: AsyncIterator[Delta], record: StreamRecord) -> AsyncGenerator[bytes, None]:
    parts: list[str] = []
    try:
        async for delta in deltas:
            if delta.text:
                if not parts:
                    record.first_token = time.perf_counter()
                parts.append(delta.text)
                record.chunks += 1
            if delta.finish_reason is not None or delta.usage is not None:
                record.note(delta)
    finally:
        await close_deltas(deltas)
    body = orjson.dumps({
        "text": "".join(parts),
        "finish_reason": record.finish_reason,
        "usage": record.usage.to_dict() if record.usage else None,
        "model": record.model,
    })
    record.bytes_out = len(body)
    yield body


CONTENT_TYPES = {
    "text": b"text/plain; charset=utf-8",
    "sse": b"text/event-stream; charset=utf-8",
    "json": b"application/json",
}


async def close_deltas(deltas: AsyncIterator[Delta]) -> None:
    """Close the provider's iterator, and with it the upstream request. Providers close
    their upstream response without waiting (``UpstreamResponse.close``), so this finishes
    even in a task being cancelled because the client left."""
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        await aclose()


async def collect(deltas: AsyncIterator[Delta]) -> Completion:
    """The whole answer, for a wire that sends it in one piece; the deltas are closed
    however the collecting ends."""
    completion = Completion()
    try:
        async for delta in deltas:
            completion.add(delta)
    finally:
        await close_deltas(deltas)
    return completion
