"""``/api/get-response``'s answer: provider deltas → tokenrelay's wire → ``StreamResponse``.

Each function here is a *body* for ``StreamResponse``: it takes the provider's opened deltas,
writes each in its wire format, fills in the request's ``StreamRecord``, and closes the
deltas — and with them the upstream request — however it ends. Three wires:

* **text**: the answer's text, piece by piece. A failure midway propagates, and the response
  drops the connection without the terminating chunk, so every HTTP client reports a
  truncated body instead of a short answer that looks complete.
* **sse**: ``event: start`` as soon as the upstream accepts (so heartbeats can keep idle
  proxies from cutting a slow model's stream), an ``id: <seq>`` event per piece, then
  ``event: done`` or ``event: error``.
* **json**: one object at the end.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

import orjson

from ..errors import UpstreamError
from ..providers.base import Delta
from . import sse
from .record import StreamRecord


async def text_body(deltas: AsyncIterator[Delta], record: StreamRecord) -> AsyncGenerator[bytes, None]:
    try:
        async for delta in deltas:
            text = delta.text
            if text:
                body = text.encode()
                if record.first_token is None:
                    record.first_token = time.perf_counter()
                record.chunks += 1
                record.bytes_out += len(body)
                yield body
            if delta.finish_reason is not None or delta.usage is not None:
                record.note(delta)
    finally:
        await close_deltas(deltas)


async def sse_body(deltas: AsyncIterator[Delta], record: StreamRecord) -> AsyncGenerator[bytes, None]:
    try:
        yield sse.start(record.stream_id, record.model)
        seq = 0
        async for delta in deltas:
            text = delta.text
            if text:
                seq += 1
                if seq == 1:
                    record.first_token = time.perf_counter()
                body = sse.delta(seq, text)
                record.chunks += 1
                record.bytes_out += len(body)
                yield body
            if delta.finish_reason is not None or delta.usage is not None:
                record.note(delta)
        closing = sse.done(record.finish_reason, record.usage)
    except UpstreamError as exc:
        record.fail(exc, midway=True)
        closing = sse.error(exc)
    finally:
        await close_deltas(deltas)
    yield closing


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


BODIES = {"text": text_body, "sse": sse_body, "json": json_body}

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
