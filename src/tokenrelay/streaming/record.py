"""What one streamed request did: ``StreamRecord``, filled in as the answer goes out, and
the one log line and observer calls it ends in. Nothing here runs per chunk."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..errors import TokenrelayError, UpstreamError
from ..providers.base import Delta, Usage

log = logging.getLogger("tokenrelay.request")

Mode = Literal["text", "sse", "json"]


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


def note_crash(record: StreamRecord, exc: BaseException | None) -> None:
    """Record an unexpected exception ending the stream as status 500, ``internal_error``.
    A client leaving (``CancelledError``), a failed write to it (``OSError``) and
    tokenrelay's own errors (already recorded by ``fail``) are not crashes."""
    if exc is None or isinstance(exc, (TokenrelayError, OSError)) or not isinstance(exc, Exception):
        return
    if record.outcome != "completed" or record.error_type is not None:
        return
    record.status = 500
    record.outcome = "internal_error"
    record.error_type = "internal_error"


class StreamObserver(Protocol):
    """Told when a stream starts and ends (``metrics.Metrics``); never per chunk."""

    def stream_started(self, record: StreamRecord) -> None: ...

    def stream_finished(self, record: StreamRecord) -> None: ...


def log_request(record: StreamRecord) -> None:
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
