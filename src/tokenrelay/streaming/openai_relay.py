"""The ``/v1/chat/completions`` response: an OpenAI-compatible answer from any upstream.

Two paths, picked by the upstream that accepted the request:

* **passthrough** (an OpenAI-compatible upstream): the upstream's bytes go to the client as
  they arrive, unchanged — every field the upstream sends (tool calls, logprobs, refusals,
  usage) reaches the SDK. ``StreamWatch`` looks at them in passing for the log line and to
  notice a stream that broke off.
* **encode** (the simulator, an Anthropic upstream): the provider's deltas are written as
  ``chat.completion.chunk`` events (``openai_chunks``).

As in ``relay.RelayResponse``, a disconnect listener runs beside the answer, so a client
that leaves closes the upstream request at once. Before the first byte, failures
are an HTTP status with OpenAI's error body, after retries where they are safe
(``routing``); after it, a ``data: {"error": …}`` event that the SDKs raise, and the end.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from ..errors import (
    TokenrelayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    error_headers,
    openai_body,
)
from ..providers.base import Delta, Usage
from ..providers.anthropic import Anthropic
from ..providers.http import UpstreamResponse
from ..providers.openai_compat import OpenAICompatible
from ..routing import Attempts, Router, Upstream
from ..schemas import ChatRequest, chat_from_openai
from .openai_chunks import DONE, ChunkEncoder, Completion, error_event
from .relay import CancellableResponse, StreamObserver, StreamRecord, close_deltas
from .sse_watch import StreamWatch

Send = Any
Receive = Any

_STREAM_HEADERS = [
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


class V1Response(CancellableResponse):
    def __init__(self, *, router: Router, upstream: Upstream, raw: bytes, body: dict[str, Any],
                 record: StreamRecord, stream: bool, observer: StreamObserver | None = None) -> None:
        super().__init__(record, observer)
        self.router = router
        self.upstream = upstream
        self.raw = raw
        self.body = body
        self.stream = stream
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self._chat: ChatRequest | None = None
        self._request_id = [(b"x-request-id", record.request_id.encode())]

    async def _open(self, upstream: Upstream) -> UpstreamResponse | AsyncIterator[Delta]:
        provider = upstream.provider
        if isinstance(provider, OpenAICompatible):
            return await provider.send(self.raw, stream=self.stream)
        if isinstance(provider, Anthropic):  # translates the whole OpenAI body, tool results too
            return await provider.open_openai(self.body, model=self.record.model)
        if self._chat is None:
            self._chat = chat_from_openai(self.body)
        return await provider.open(self._chat, model=self.record.model)

    async def _run(self, send: Send) -> None:
        attempts = Attempts()
        try:
            opened = await self.router.open_with_retries(self.upstream, self._open, attempts)
        except TokenrelayError as exc:
            self.record.attempts = str(attempts)
            self.record.fail(exc, midway=False)
            await self._send_error(send, exc)
            return
        self.record.attempts = str(attempts)
        if isinstance(opened, UpstreamResponse):
            if self.stream:
                await self._pass_stream(send, opened)
            else:
                await self._pass_whole(send, opened)
        elif self.stream:
            await self._encode_stream(send, opened)
        else:
            await self._encode_whole(send, opened)

    async def _send_error(self, send: Send, exc: TokenrelayError) -> None:
        await send({"type": "http.response.start", "status": exc.status,
                    "headers": error_headers(exc) + self._request_id})
        await send({"type": "http.response.body", "body": openai_body(exc), "more_body": False})

    def _headers(self, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", content_type), *_STREAM_HEADERS, *self._request_id]

    # --- passthrough ---

    async def _pass_stream(self, send: Send, response: UpstreamResponse) -> None:
        record = self.record
        headers = self._headers(response.headers.get("content-type", "text/event-stream").encode())
        if "content-encoding" in response.headers:
            headers.append((b"content-encoding", response.headers["content-encoding"].encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        watch = StreamWatch()
        failure: UpstreamError | None = None
        try:
            async for chunk in response:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if record.first_token is None:
                    record.first_token = time.perf_counter()
                record.bytes_out += len(chunk)
                watch.feed(chunk)
        except UpstreamError as exc:  # went silent, or hung up
            failure = exc
        finally:
            response.close()
        record.chunks = watch.events
        if watch.usage:
            record.usage = _usage(watch.usage)
        record.finish_reason = watch.finish_reason
        closing = b""
        if watch.error is not None:
            record.outcome = "failed_midway"
            record.error_type = str(watch.error.get("code") or watch.error.get("type") or "upstream_error")
        elif not watch.done:
            failure = failure or UpstreamProtocolError("upstream closed the stream before data: [DONE]")
        if failure is not None:
            record.fail(failure, midway=True)
            # Finish a line the upstream left half-written, so the error is an event of its own.
            closing = (b"\n\n" if watch.pending else b"") + error_event(failure)
        await send({"type": "http.response.body", "body": closing, "more_body": False})

    async def _pass_whole(self, send: Send, response: UpstreamResponse) -> None:
        record = self.record
        failure: UpstreamError | None = None
        try:
            body = await response.read()
        except UpstreamTimeout:
            body, failure = b"", UpstreamTimeout("upstream did not finish its answer in time")
        except UpstreamError as exc:
            body, failure = b"", exc
        finally:
            response.close()
        if failure is not None:
            record.fail(failure, midway=False)
            await self._send_error(send, failure)
            return
        record.first_token = time.perf_counter()
        record.bytes_out = len(body)
        try:
            answer = orjson.loads(body)
            record.usage = _usage(answer.get("usage"))
            record.finish_reason = answer["choices"][0].get("finish_reason")
        except (orjson.JSONDecodeError, AttributeError, LookupError, TypeError):
            pass
        headers = self._headers(response.headers.get("content-type", "application/json").encode())
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # --- encode ---

    async def _encode_stream(self, send: Send, deltas: AsyncIterator[Delta]) -> None:
        record = self.record
        enc = ChunkEncoder(id=_completion_id(record), model=record.model)
        await send({"type": "http.response.start", "status": 200, "headers": self._headers(b"text/event-stream")})
        await send({"type": "http.response.body", "body": enc.role(), "more_body": True})
        try:
            async for delta in deltas:
                body = enc.encode(delta, include_usage=self.include_usage)
                if delta.usage is not None:
                    record.usage = delta.usage
                if delta.finish_reason is not None:
                    record.finish_reason = delta.finish_reason
                if body:
                    if record.first_token is None:
                        record.first_token = time.perf_counter()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    record.chunks += 1
                    record.bytes_out += len(body)
            closing = DONE
        except UpstreamError as exc:
            record.fail(exc, midway=True)
            closing = error_event(exc)
        finally:
            await close_deltas(deltas)
        await send({"type": "http.response.body", "body": closing, "more_body": False})

    async def _encode_whole(self, send: Send, deltas: AsyncIterator[Delta]) -> None:
        record = self.record
        completion = Completion()
        try:
            async for delta in deltas:
                completion.add(delta)
        except UpstreamError as exc:
            record.fail(exc, midway=False)
            await self._send_error(send, exc)
            return
        finally:
            await close_deltas(deltas)
        record.first_token = time.perf_counter()
        record.usage, record.finish_reason = completion.usage, completion.finish_reason
        body = completion.body(id=_completion_id(record), model=record.model)
        record.bytes_out = len(body)
        await send({"type": "http.response.start", "status": 200, "headers": self._headers(b"application/json")})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _completion_id(record: StreamRecord) -> str:
    return "chatcmpl-" + record.stream_id.removeprefix("st_")


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    return Usage(prompt, completion, int(raw.get("total_tokens") or prompt + completion))
