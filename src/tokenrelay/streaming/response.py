"""``StreamResponse``: the one ASGI response that writes every streamed answer to its client.

Every route that streams — ``/api/get-response`` (text, SSE, one JSON), ``/v1``, a job's
stream, ``/api/probe`` and the simulator's own server — hands it ``open_body``: a coroutine
function that opens the answer (the upstream request, with its retries) and returns its
*body*, an async generator of bytes already in the route's wire format. The response owns
everything around it:

* **Headers go out with the first piece.** Until then a failure — a refusal while opening,
  or an error raised before the body's first ``yield`` — is still an honest status with a
  JSON error (``error_response``).
* **After the first piece the status is gone.** A body that has an in-band error form (SSE's
  ``event: error``, OpenAI's error chunk) catches the error and yields it. An error it lets
  through aborts the connection (``StreamAborted``), so the client sees a truncated body —
  never a short answer that looks complete.
* **A client that leaves** cancels the body at once, as Starlette's ``StreamingResponse``
  does with its disconnect listener: closing the body closes the upstream request.
* **Heartbeats** (``ping``, e.g. ``: ping`` for SSE) after ``heartbeat`` seconds of silence,
  so idle proxies keep a slow model's stream open.
* **A send timeout**: a client that keeps its connection open but stops reading would hold
  its stream, its upstream connection and its rate-limit slot forever; after
  ``send_timeout`` seconds in one unfinished write it is dropped, logged and counted
  (outcome ``client_stalled``).
* **The record**: one log line and the observer's start and finish calls frame every outcome.

Intentional divergences from Starlette's and sse-starlette's responses, for the cost per
chunk and per open stream (docs/performance.md): plain asyncio rather than an anyio task
group; one timer per stream, re-armed lazily, watches both heartbeat and send timeout
instead of a sleeping task; the heartbeat and the body never send at once because the body
waits for a heartbeat being written (``_ping``) before its next send, which is the send lock
without a lock's cost on every chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol

from starlette.types import Message, Receive, Scope, Send

from ..errors import TokenrelayError, error_headers
from .record import StreamObserver, StreamRecord, log_request, note_crash

log = logging.getLogger("tokenrelay.request")

Headers = list[tuple[bytes, bytes]]
ErrorResponse = Callable[[TokenrelayError], tuple[int, Headers, bytes]]
Body = AsyncGenerator[bytes, None]
OpenBody = Callable[[], Awaitable[Body]]


class Resumable(Protocol):
    """An answer that outlives its connection (``streaming.live.Resume``)."""

    def client_left(self) -> None:
        """Its client is gone; the answer goes on into its log until it ends or is stopped."""

    def closing_on_stop(self) -> bytes | None:
        """What a client still connected is told when the answer is stopped on request;
        None: the body breaks off."""


class StreamStopped(TokenrelayError):
    status = 409
    type = "stream_stopped"


class StreamAborted(Exception):
    """Raised to the server so it drops the connection mid-body (see the module docstring)."""


def body_of(body: Body) -> OpenBody:
    """``open_body`` for a body that has nothing to open first."""

    async def open_body() -> Body:
        return body

    return open_body


def tokenrelay_error(exc: TokenrelayError) -> tuple[int, Headers, bytes]:
    """tokenrelay's own error shape: ``{"error": {"type", "message"}}``."""
    return exc.status, error_headers(exc), exc.body()


class StreamResponse:
    __slots__ = ("_abort", "_body", "_busy_since", "_closed", "_detached", "_last_send", "_open_body", "_ping",
                 "_send", "_stopped_by", "_task", "_timer", "error_response", "headers", "heartbeat", "observer",
                 "ping", "record", "resumable", "send_timeout")

    def __init__(
        self,
        open_body: OpenBody,
        *,
        headers: Headers,
        record: StreamRecord | None = None,
        observer: StreamObserver | None = None,
        ping: bytes | None = None,
        heartbeat: float = 0.0,
        send_timeout: float = 0.0,
        error_response: ErrorResponse = tokenrelay_error,
        resumable: Resumable | None = None,
    ) -> None:
        self._open_body: OpenBody | None = open_body
        self._body: Body | None = None
        self.headers = headers
        """Sent with the first piece; the body may still add to them before it yields."""
        self.record = record
        self.observer = observer if record is not None else None
        self.ping = ping if heartbeat > 0 else None
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.error_response = error_response
        self.resumable = resumable
        """Told when its client leaves, instead of the answer being stopped; the body goes on
        (into its log) until it ends or is stopped (``stop``)."""
        self._detached = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._stopped_by: str | None = None
        self._abort: TokenrelayError | None = None
        self._busy_since = 0.0
        """When the send under way began (0: none): a stalled client shows up here."""
        self._last_send = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._ping: asyncio.Task[None] | None = None
        self._send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One frame for the whole stream (no helper coroutine per phase): it lives as long as
        # the stream, on every open connection (docs/performance.md, memory per stream).
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._send = send
        if self._stopped_by is not None:  # stopped before it began
            task.cancel()
        record = self.record
        if self.observer is not None and record is not None:
            self.observer.stream_started(record)
        loop = asyncio.get_running_loop()
        listener = loop.create_task(self._listen_for_disconnect(receive))
        started = False
        try:
            try:
                body = await self._open()
                async for piece in body:
                    if not started:
                        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                        started = True
                        self._last_send = loop.time()
                        self._arm()
                    elif self._ping is not None:
                        await self._ping  # a heartbeat being written goes first
                    if self._detached:
                        continue  # nobody to send to: the body goes on into its log
                    self._busy_since = now = loop.time()
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    self._busy_since = 0.0
                    self._last_send = now
            except TokenrelayError as exc:
                if record is not None:
                    record.fail(exc, midway=started)
                if started:
                    self._abort = exc
                else:
                    await self._send_error(send, exc)
            else:
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                elif self._ping is not None:
                    await self._ping
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Our own cancellation (the client left or stalled, or a stop) ends the response;
            # any other (shutdown) goes on.
            if self._stopped_by is None or task.uncancel() > 0:
                if record is not None and record.outcome == "completed":
                    record.outcome = "shutdown"  # cancelled from outside: never "completed"
                raise
            if self._stopped_by == "stopped" and not self._detached:
                await self._say_stopped(send, started)
        except Exception as exc:  # a bug: the log line and metrics say 500, never "completed"
            if record is not None:
                note_crash(record, exc)
            raise
        finally:
            self._closed = True
            listener.cancel()
            if self._timer is not None:
                self._timer.cancel()
            if self._ping is not None:
                self._ping.cancel()
            if self._body is not None:
                await self._body.aclose()  # closes the upstream request, also when the client left
            if record is not None:
                log_request(record)
                if self.observer is not None:
                    self.observer.stream_finished(record)
        if self._abort is not None:
            raise StreamAborted(self._abort.message)

    async def _say_stopped(self, send: Send, started: bool) -> None:
        """Tell a client still connected that its answer was stopped on request."""
        closing = self.resumable.closing_on_stop() if self.resumable is not None else None
        if closing is None:
            stopped = StreamStopped("the answer was stopped (DELETE /api/streams/{id})")
            if started:
                self._abort = stopped
            else:
                await self._send_error(send, stopped)
            return
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": closing, "more_body": False})

    async def _open(self) -> Body:
        """The body, opened; the opener is dropped, so what it holds (the request) is not
        kept for the stream's lifetime."""
        open_body, self._open_body = self._open_body, None
        assert open_body is not None
        self._body = await open_body()
        return self._body

    async def _send_error(self, send: Send, exc: TokenrelayError) -> None:
        status, headers, body = self.error_response(exc)
        if self.record is not None:
            headers.append((b"x-request-id", self.record.request_id.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _listen_for_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self.resumable is not None and not self._closed:
            self._detached = True
            self.resumable.client_left()
            return
        self._stop("client_cancelled")

    def stop(self, outcome: str) -> None:
        """End the answer now (its upstream request too), with ``outcome`` in its record."""
        self._stop(outcome)

    def _stop(self, outcome: str) -> None:
        if self._closed or self._stopped_by is not None:
            return
        self._stopped_by = outcome
        if self.record is not None:
            self.record.outcome = outcome
        if self._task is not None:  # else: cancelled as soon as it begins
            self._task.cancel()

    # --- the watch timer: heartbeats and the send timeout ---

    def _arm(self) -> None:
        periods = [p for p in (self.heartbeat if self.ping else 0.0, self.send_timeout) if p > 0]
        if periods:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + min(periods), self._watch)

    def _watch(self) -> None:
        self._timer = None
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        busy = self._busy_since
        due: list[float] = []
        if self.send_timeout > 0:
            if busy and now - busy >= self.send_timeout:
                log.warning("%s: the client stopped reading for %g s; dropped",
                            self.record.stream_id if self.record else "stream", self.send_timeout)
                self._stop("client_stalled")
                return
            due.append((busy or now) + self.send_timeout)
        if self.ping is not None:
            silent_until = self._last_send + self.heartbeat
            if not busy and self._ping is None and now >= silent_until:
                self._ping = loop.create_task(self._send_ping(self.ping))
                due.append(now + self.heartbeat)
            else:
                due.append(max(silent_until, now + 0.001) if not busy else now + self.heartbeat)
        self._timer = loop.call_at(min(due), self._watch)

    async def _send_ping(self, ping: bytes) -> None:
        loop = asyncio.get_running_loop()
        message: Message = {"type": "http.response.body", "body": ping, "more_body": True}
        assert self._send is not None
        self._busy_since = loop.time()
        try:
            await self._send(message)
        except OSError:
            return  # the client is gone; the disconnect listener ends the stream
        finally:
            self._busy_since = 0.0
            self._ping = None
        self._last_send = loop.time()
