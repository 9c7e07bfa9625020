"""The relay: provider deltas → wire encoder → the client's socket.

``RelayResponse`` is a plain ASGI response. It runs the stream beside a disconnect listener,
as Starlette's ``StreamingResponse`` does: a client that leaves — before the first token,
midway, or during a one-shot request — cancels the stream, which closes the upstream
request at once.

Before the first byte, an upstream failure is still an HTTP status with a JSON error. After
it, the status is gone: SSE says ``event: error``; plain text drops the connection without
the terminating chunk, so every HTTP client reports a truncated body instead of a short
answer that looks complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from ..errors import TokenrelayError, UpstreamError, error_headers
from ..providers.base import Delta, Provider, Usage
from ..schemas import ChatRequest
from . import sse

log = logging.getLogger("tokenrelay.request")

Mode = Literal["text", "sse", "json"]
Send = Any
Receive = Any

_CONTENT_TYPES = {
    "text": b"text/plain; charset=utf-8",
    "sse": b"text/event-stream; charset=utf-8",
    "json": b"application/json",
}


class StreamAborted(Exception):
    """Raised to the server so it drops the connection mid-body (see module docstring)."""


@dataclass(slots=True)
class StreamRecord:
    """What one request did; read by the request log line (and metrics)."""

    request_id: str
    stream_id: str
    model: str
    mode: Mode
    route: str = "/api/get-response"
    status: int = 200
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    chunks: int = 0
    bytes_out: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    outcome: str = "completed"
    error_type: str | None = None
    prompt: str | None = None
    """The last user message, kept only with ``TOKENRELAY_LOG_PROMPTS=true``."""
    attempts: str = ""
    """Upstream tries before the answer began, e.g. ``main:429,backup:ok`` (empty: one try)."""

    def note(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.usage is not None:
            self.usage = delta.usage

    def fail(self, exc: TokenrelayError, *, midway: bool) -> None:
        self.error_type = exc.type
        if not midway:
            self.status = exc.status
        self.outcome = "failed_midway" if midway else (
            "upstream_error" if isinstance(exc, UpstreamError) else "rejected"
        )

    @property
    def tokens(self) -> int:
        return self.usage.completion_tokens if self.usage else self.chunks


class StreamObserver(Protocol):
    """Told when a stream starts and ends (``metrics.Metrics``); never per chunk."""

    def stream_started(self, record: StreamRecord) -> None: ...

    def stream_finished(self, record: StreamRecord) -> None: ...


class CancellableResponse:
    """An ASGI response whose ``_run`` is cancelled when the client disconnects.

    A listener task waits for the client's disconnect beside ``_run`` (Starlette's
    ``StreamingResponse`` does the same with an anyio task group; plain asyncio costs less
    per request and per open stream, docs/performance.md), so a client that leaves stops
    ``_run`` — and with it the upstream request — at once. The request's log line and the
    observer's start and finish frame every outcome."""

    record: StreamRecord
    observer: StreamObserver | None

    def __init__(self, record: StreamRecord, observer: StreamObserver | None) -> None:
        self.record = record
        self.observer = observer
        self._finished = False
        self._client_left = False

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if self.observer is not None:
            self.observer.stream_started(self.record)
        task = asyncio.current_task()
        assert task is not None
        listener = asyncio.get_running_loop().create_task(self._listen_for_disconnect(receive, task))
        try:
            await self._run(send)
        except asyncio.CancelledError:
            # The listener's cancellation ends the response; any other (shutdown) goes on.
            if not self._client_left or task.uncancel() > 0:
                raise
        finally:
            self._finished = True
            listener.cancel()
            _log_request(self.record)
            if self.observer is not None:
                self.observer.stream_finished(self.record)

    async def _run(self, send: Send) -> None:
        raise NotImplementedError

    async def _listen_for_disconnect(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._finished:
            self._client_left = True
            self.record.outcome = "client_cancelled"
            task.cancel()


class RelayResponse(CancellableResponse):
    def __init__(
        self,
        *,
        provider: Provider,
        request: ChatRequest,
        record: StreamRecord,
        heartbeat: float,
        observer: StreamObserver | None = None,
    ) -> None:
        super().__init__(record, observer)
        self.provider = provider
        self.request: ChatRequest | None = request
        self.heartbeat = heartbeat
        self._abort: UpstreamError | None = None
        self._last_send = 0.0
        self._sse_closed = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self._headers = [
            (b"content-type", _CONTENT_TYPES[record.mode]),
            (b"cache-control", b"no-cache, no-transform"),
            (b"x-accel-buffering", b"no"),
            (b"x-request-id", record.request_id.encode()),
            (b"x-stream-id", record.stream_id.encode()),
        ]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)
        if self._abort is not None:
            raise StreamAborted(self._abort.message)

    async def _run(self, send: Send) -> None:
        if self.record.mode == "text":
            await self._text(send)
        elif self.record.mode == "sse":
            await self._sse(send)
        else:
            await self._json(send)

    async def _open(self, send: Send) -> AsyncIterator[Delta] | None:
        try:
            # The request is the provider's from here: not kept for the stream's lifetime.
            request, self.request = self.request, None
            assert request is not None
            return await self.provider.open(request, model=self.record.model)
        except TokenrelayError as exc:
            self.record.fail(exc, midway=False)
            await send_error(send, exc, request_id=self.record.request_id)
            return None

    async def _text(self, send: Send) -> None:
        record = self.record
        deltas = await self._open(send)
        if deltas is None:
            return
        started = False
        try:
            async for delta in deltas:
                text = delta.text
                if text:
                    body = text.encode()
                    if not started:
                        # Headers wait for the first token: until then a failure can
                        # still be an honest status code.
                        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
                        started = True
                        record.first_token = time.perf_counter()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    record.chunks += 1
                    record.bytes_out += len(body)
                if delta.finish_reason is not None or delta.usage is not None:
                    record.note(delta)
        except UpstreamError as exc:
            record.fail(exc, midway=started)
            if started:
                self._abort = exc
            else:
                await send_error(send, exc, request_id=record.request_id)
            return
        finally:
            await close_deltas(deltas)
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _sse(self, send: Send) -> None:
        record = self.record
        deltas = await self._open(send)
        if deltas is None:
            return
        # Headers and the start event go out as soon as the upstream accepts, so heartbeats
        # can keep idle proxies from timing out while a slow model thinks.
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        start = sse.start(record.stream_id, record.model)
        await send({"type": "http.response.body", "body": start, "more_body": True})
        loop = asyncio.get_running_loop()
        self._last_send = loop.time()
        self._arm_ping(send)
        seq = 0
        closing: bytes
        try:
            async for delta in deltas:
                text = delta.text
                if text:
                    seq += 1
                    if seq == 1:
                        record.first_token = time.perf_counter()
                    body = sse.delta(seq, text)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    self._last_send = loop.time()
                    record.chunks += 1
                    record.bytes_out += len(body)
                if delta.finish_reason is not None or delta.usage is not None:
                    record.note(delta)
            closing = sse.done(record.finish_reason, record.usage)
        except UpstreamError as exc:
            record.fail(exc, midway=True)
            closing = sse.error(exc)
        finally:
            self._stop_pings()
            await close_deltas(deltas)
        if self._ping_task is not None:  # a ping being written goes first: the last send ends the body
            await asyncio.wait([self._ping_task])
        await send({"type": "http.response.body", "body": closing, "more_body": False})

    def _arm_ping(self, send: Send) -> None:
        """Send ': ping' after each ``heartbeat`` seconds of silence: a timer per stream,
        re-armed when it fires, rather than a task that sleeps."""
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_at(self._last_send + self.heartbeat, self._ping_due, send)

    def _ping_due(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        if self._sse_closed:
            return
        if loop.time() < self._last_send + self.heartbeat:
            self._arm_ping(send)
            return
        self._ping_timer = None
        self._ping_task = loop.create_task(self._send_ping(send))

    async def _send_ping(self, send: Send) -> None:
        try:
            await send({"type": "http.response.body", "body": sse.PING, "more_body": True})
        except OSError:
            return  # the client is gone; the disconnect listener ends the stream
        finally:
            self._ping_task = None
        self._last_send = asyncio.get_running_loop().time()
        if not self._sse_closed:
            self._arm_ping(send)

    def _stop_pings(self) -> None:
        self._sse_closed = True
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None

    async def _json(self, send: Send) -> None:
        record = self.record
        deltas = await self._open(send)
        if deltas is None:
            return
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
        except UpstreamError as exc:
            record.fail(exc, midway=False)
            await send_error(send, exc, request_id=record.request_id)
            return
        finally:
            await close_deltas(deltas)
        body = orjson.dumps(
            {
                "text": "".join(parts),
                "finish_reason": record.finish_reason,
                "usage": record.usage.to_dict() if record.usage else None,
                "model": record.model,
            }
        )
        record.bytes_out = len(body)
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def close_deltas(deltas: AsyncIterator[Delta]) -> None:
    """Close the provider's iterator, and with it the upstream request. Providers close
    their upstream response without waiting (``UpstreamResponse.close``), so this finishes
    even in a task being cancelled because the client left."""
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        await aclose()


async def send_error(send: Send, exc: TokenrelayError, *, request_id: str | None = None) -> None:
    headers = error_headers(exc)
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": exc.body(), "more_body": False})


def _log_request(record: StreamRecord) -> None:
    """One line per request; with JSON logs the same values are fields of the object."""
    duration_ms = round((time.perf_counter() - record.started) * 1000, 1)
    ttft_ms = round((record.first_token - record.started) * 1000, 1) if record.first_token else None
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "route": record.route,
        "stream_id": record.stream_id,
        "status": record.status,
        "mode": record.mode,
        "model": record.model,
        "outcome": record.outcome,
        "ttft_ms": ttft_ms,
        "chunks": record.chunks,
        "tokens": record.tokens,
        "bytes": record.bytes_out,
        "duration_ms": duration_ms,
        "error_type": record.error_type,
    }
    if record.prompt is not None:
        fields["prompt"] = record.prompt
    if record.attempts.count(","):
        fields["attempts"] = record.attempts
    log.info(
        "%s %s status=%d mode=%s model=%s outcome=%s ttft_ms=%s chunks=%d tokens=%d bytes=%d duration_ms=%.1f%s%s%s",
        record.route,
        record.stream_id,
        record.status,
        record.mode,
        record.model,
        record.outcome,
        "-" if ttft_ms is None else f"{ttft_ms:.1f}",
        record.chunks,
        record.tokens,
        record.bytes_out,
        duration_ms,
        f" error={record.error_type}" if record.error_type else "",
        f" prompt={record.prompt!r}" if record.prompt is not None else "",
        f" attempts={record.attempts}" if record.attempts.count(",") else "",
        extra={"fields": fields},
    )
