"""The ``/v1/chat/completions`` answer: an OpenAI-compatible answer from any upstream.

Two paths, picked by what the provider returned (``providers.base``):

* **passthrough** (a ``Passthrough``, from an OpenAI-compatible upstream): the upstream's
  bytes go to the client as they arrive, unchanged — every field the upstream sends (tool
  calls, logprobs, refusals, usage) reaches the SDK. ``StreamWatch`` looks at them in passing
  for the log line and to notice a stream that broke off.
* **encode** (deltas, from the simulator or an Anthropic upstream): the deltas are written as
  ``chat.completion.chunk`` events (``openai_chunks``).

``v1_body`` picks the body for ``StreamResponse``, which answers a failure before the first byte
with OpenAI's error body (``openai_error``), after retries where they are safe (``routing``);
after it, the body ends with a ``data: {"error": …}`` event that the SDKs raise.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from ..errors import TokenrelayError, UpstreamError, UpstreamProtocolError, UpstreamTimeout, error_headers, openai_body
from ..providers.base import Delta, Passthrough, UpstreamBody, Usage
from .openai_chunks import DONE, ChunkEncoder, error_event
from .record import StreamRecord
from .relay import close_deltas, collect
from .response import Body, Headers
from .sse_watch import StreamWatch

STREAM_HEADERS: Headers = [
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


def openai_error(exc: TokenrelayError) -> tuple[int, Headers, bytes]:
    """An error before the first byte, in OpenAI's shape (for ``StreamResponse``)."""
    return exc.status, error_headers(exc), openai_body(exc)


def v1_body(opened: Passthrough | AsyncIterator[Delta], record: StreamRecord, headers: Headers, *,
            stream: bool, include_usage: bool) -> Body:
    """The answer, in whichever of the four shapes the request and the provider make. Each
    body adds its content type to ``headers`` before its first piece."""
    if isinstance(opened, Passthrough):
        response = opened.response
        return pass_stream(response, record, headers) if stream else pass_whole(response, record, headers)
    if stream:
        return encode_stream(opened, record, headers, include_usage=include_usage)
    return encode_whole(opened, record, headers)


# --- passthrough ---

MAX_WHOLE_BODY = 64 << 20
"""Bytes of a non-streamed answer held before it is refused: an answer is a few kilobytes;
this bounds what a broken upstream can make tokenrelay hold."""


async def pass_stream(response: UpstreamBody, record: StreamRecord, headers: Headers) -> AsyncGenerator[bytes, None]:
    headers.insert(0, (b"content-type", response.headers.get("content-type", "text/event-stream").encode()))
    watch = StreamWatch()
    # The client gets the events plain whatever the upstream did (it was asked for identity),
    # and each piece is checked as UTF-8: the SDKs fail on anything else with their own error
    # instead of an upstream error they can report.
    utf8 = codecs.getincrementaldecoder("utf-8")()
    failure: UpstreamError | None = None
    sent = False
    try:
        _check_encoding(response)
        async for chunk in response:
            try:
                utf8.decode(chunk)
            except UnicodeDecodeError as exc:
                raise UpstreamProtocolError(f"upstream sent bytes that are not UTF-8 in its event stream: {exc}") from None
            if record.first_token is None:
                record.first_token = time.perf_counter()
            record.bytes_out += len(chunk)
            watch.feed(chunk)
            sent = True
            yield chunk
    except UpstreamProtocolError as exc:
        if not sent:
            raise  # nothing reached the client yet: an honest 502
        failure = exc
    except UpstreamError as exc:  # went silent, or hung up
        failure = exc
    finally:
        response.close()
    record.chunks = watch.events
    if watch.usage:
        record.usage = _usage(watch.usage)
    record.finish_reason = watch.finish_reason
    if watch.error is not None:
        record.outcome = "failed_midway"
        record.error_type = str(watch.error.get("code") or watch.error.get("type") or "upstream_error")
    elif not watch.done:
        failure = failure or UpstreamProtocolError("upstream closed the stream before data: [DONE]")
    if failure is not None:
        record.fail(failure, midway=True)
        # Finish a line the upstream left half-written, so the error is an event of its own.
        yield (b"\n\n" if watch.pending else b"") + error_event(failure)


async def pass_whole(response: UpstreamBody, record: StreamRecord, headers: Headers) -> AsyncGenerator[bytes, None]:
    """The upstream's JSON answer, checked to be one: anything else (an HTML error page
    behind a 200, bytes that are not UTF-8) is a 502 in OpenAI's shape, which the SDKs raise,
    rather than a 200 they would hand to the caller as a string."""
    try:
        _check_encoding(response)
        parts: list[bytes] = []
        size = 0
        async for piece in response:
            size += len(piece)
            if size > MAX_WHOLE_BODY:
                raise UpstreamProtocolError(f"upstream answer is larger than {MAX_WHOLE_BODY >> 20} MiB")
            parts.append(piece)
    except UpstreamTimeout:
        raise UpstreamTimeout("upstream did not finish its answer in time") from None
    finally:
        response.close()
    body = b"".join(parts)
    record.first_token = time.perf_counter()
    record.bytes_out = len(body)
    try:
        answer = orjson.loads(body)  # also refuses bytes that are not UTF-8
    except orjson.JSONDecodeError:
        kind = response.headers.get("content-type", "no content type")
        raise UpstreamProtocolError(
            f"upstream answered 200 with a body that is not JSON ({kind}): {body[:80].decode('utf-8', 'replace')!r}"
        ) from None
    if not isinstance(answer, dict):
        raise UpstreamProtocolError("upstream answered 200 with JSON that is not an object")
    record.usage = _usage(answer.get("usage"))
    try:
        record.finish_reason = answer["choices"][0].get("finish_reason")
    except (AttributeError, LookupError, TypeError):
        pass
    headers.insert(0, (b"content-type", b"application/json"))
    yield body


def _check_encoding(response: UpstreamBody) -> None:
    """The transport decodes gzip and deflate; a body still encoded cannot be checked, and
    most clients could not read it either."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UpstreamProtocolError(f"upstream answered in Content-Encoding {encoding!r}, which tokenrelay does not decode")


# --- encode ---

async def encode_stream(deltas: AsyncIterator[Delta], record: StreamRecord, headers: Headers, *,
                        include_usage: bool) -> AsyncGenerator[bytes, None]:
    enc = ChunkEncoder(id=completion_id(record), model=record.model)
    headers.insert(0, (b"content-type", b"text/event-stream"))
    try:
        yield enc.role()
        async for delta in deltas:
            body = enc.encode(delta, include_usage=include_usage)
            if delta.usage is not None:
                record.usage = delta.usage
            if delta.finish_reason is not None:
                record.finish_reason = delta.finish_reason
            if body:
                if record.first_token is None:
                    record.first_token = time.perf_counter()
                record.chunks += 1
                record.bytes_out += len(body)
                yield body
        closing = DONE
    except UpstreamError as exc:
        record.fail(exc, midway=True)
        closing = error_event(exc)
    finally:
        await close_deltas(deltas)
    yield closing


async def encode_whole(deltas: AsyncIterator[Delta], record: StreamRecord, headers: Headers) -> AsyncGenerator[bytes, None]:
    completion = await collect(deltas)
    record.first_token = time.perf_counter()
    record.usage, record.finish_reason = completion.usage, completion.finish_reason
    body = completion.body(id=completion_id(record), model=record.model)
    record.bytes_out = len(body)
    headers.insert(0, (b"content-type", b"application/json"))
    yield body


def completion_id(record: StreamRecord) -> str:
    return "chatcmpl-" + record.stream_id.removeprefix("st_")


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    try:
        prompt = int(raw.get("prompt_tokens") or 0)
        completion = int(raw.get("completion_tokens") or 0)
        return Usage(prompt, completion, int(raw.get("total_tokens") or prompt + completion))
    except (TypeError, ValueError):  # the answer goes on as sent; only the log line lacks its usage
        return None
