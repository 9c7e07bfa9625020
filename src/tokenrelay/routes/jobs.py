"""``/api/jobs``: submit a question, get the answer later (poll, follow, or a webhook).

    POST   /api/jobs              chat body + "webhook_url" → 202 {"id","status"}, Location
    GET    /api/jobs/{id}         the job, its result and every webhook attempt
    DELETE /api/jobs/{id}         cancel a queued or running job (and its upstream request)
    GET    /api/jobs/{id}/stream  SSE: what the job has written so far, then live, then
                                  event: done or event: error; with ``Last-Event-ID: N``
                                  (or ``?after=N``) only the pieces after N

The backend (``app.state.jobs``) is a ``jobs.backend.JobBackend``: ``LocalJobs`` (SQLite,
run in this process) or ``RemoteJobs`` (Redis, run by ``tokenrelay worker``).

With client keys a job is its submitting key's (``Job.owner``, the key's name): other keys
get 404 for it, and Idempotency-Keys are scoped to the key. A store that fails answers 507
(disk full) or 503, with Retry-After, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import BadRequest, Conflict, NotFound, ServiceUnavailable, TokenrelayError, ValidationFailed
from ..jobs.backend import JobBackend
from ..jobs.model import Job, new_job
from ..jobs.runner import close
from ..jobs.store import FollowEvent
from ..jobs.webhooks import check_url_syntax
from ..config import Settings
from ..logs import client_name, request_id
from ..schemas import ChatRequest, describe_validation, parse_model
from ..state import app_state
from ..streaming import sse
from ..streaming.response import StreamResponse, body_of
from .endpoint import Endpoint
from .request_body import read_json_body

log = logging.getLogger("tokenrelay.jobs")

IDEMPOTENCY_KEY_MAX = 255


class JobRequest(ChatRequest):
    webhook_url: str | None = Field(default=None, min_length=1, max_length=2048)


class WebhooksNotConfigured(BadRequest):
    type = "webhooks_not_configured"


class IdempotencyKeyReused(ValidationFailed):
    # As the IETF Idempotency-Key draft advises: 422 for a key reused with another body.
    type = "idempotency_key_reused"


class InsufficientStorage(TokenrelayError):
    # RFC 4918's status for "the server cannot store what is needed to complete the request".
    status = 507
    type = "insufficient_storage"


RETRY_AFTER = "5"
"""Seconds a client is told to wait when the job store is away or full."""


@contextlib.asynccontextmanager
async def _reaching(jobs: JobBackend, settings: Settings) -> AsyncIterator[None]:
    """The store's failures become a status that says so, with Retry-After: a full disk
    507, anything else (Redis away or frozen, an I/O error) 503. Every store call is bounded
    (Redis by TOKENRELAY_REDIS_TIMEOUT per call); this bounds a request's few calls together."""
    retry = {"retry-after": RETRY_AFTER}
    try:
        async with asyncio.timeout(settings.redis_timeout * 3):
            yield
    except TimeoutError:
        raise ServiceUnavailable(f"jobs are unavailable: {jobs.label} did not answer in time",
                                 headers=retry) from None
    except RedisError as exc:
        raise ServiceUnavailable(f"jobs are unavailable: {jobs.label} does not answer ({exc})",
                                 headers=retry) from None
    except (sqlite3.Error, OSError) as exc:
        if _disk_full(exc):
            raise InsufficientStorage(f"jobs are unavailable: the disk of {jobs.label} is full; "
                                      "jobs already accepted end once there is room again", headers=retry) from None
        raise ServiceUnavailable(f"jobs are unavailable: {jobs.label} cannot be used ({exc})", headers=retry) from None


def _disk_full(exc: sqlite3.Error | OSError) -> bool:
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return exc.errno == errno.ENOSPC


def _client(request: Request) -> str | None:
    """The name of the client key that sent the request; None when the service has none."""
    return client_name.get() if app_state(request).keys else None


def _jobs(request: Request) -> JobBackend:
    state = app_state(request)
    if state.jobs is None:
        raise ServiceUnavailable(state.jobs_unavailable or "jobs are not available")
    return state.jobs


async def create_job(request: Request) -> Response:
    jobs = _jobs(request)
    settings = app_state(request).settings
    body = parse_model(JobRequest, await read_json_body(request, settings.max_body_bytes))
    model = body.model or settings.default_model
    if model is None:
        raise ValidationFailed("model: required, since no default model is set (TOKENRELAY_MODEL)")
    if body.webhook_url is not None:
        check_url_syntax(body.webhook_url, allow_internal=settings.webhook_allow_private)
        if settings.webhook_secret is None:
            raise WebhooksNotConfigured(
                "this service cannot sign webhooks: set TOKENRELAY_WEBHOOK_SECRET (whsec_…) on the server, "
                "or submit the job without webhook_url and poll GET /api/jobs/{id}"
            )
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
        raise ValidationFailed(f"Idempotency-Key: must be 1 to {IDEMPOTENCY_KEY_MAX} characters")
    chat = ChatRequest.model_validate(body.model_dump(exclude={"webhook_url"})).model_dump(exclude={"stream"})
    body_hash = hashlib.sha256(orjson.dumps({"request": chat, "model": model, "webhook_url": body.webhook_url},
                                            option=orjson.OPT_SORT_KEYS)).hexdigest()
    async with _reaching(jobs, settings):
        job, created = await jobs.submit(new_job(request=chat, model=model, webhook_url=body.webhook_url,
                                                 idempotency_key=key, body_hash=body_hash, owner=_client(request)))
    if not created and job.body_hash != body_hash:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was used for job {job.id} with another body; use a new key for a new job"
        )
    headers = {"location": f"/api/jobs/{job.id}"}
    if not created:
        headers["idempotent-replayed"] = "true"
    return JSONResponse({"id": job.id, "status": job.status}, status_code=202, headers=headers)


async def _get(request: Request) -> tuple[JobBackend, Job]:
    jobs = _jobs(request)
    job_id = request.path_params["job_id"]
    async with _reaching(jobs, app_state(request).settings):
        job = await jobs.get(job_id)
    # Another key's job is "not found", not "forbidden": that it exists is not for others to learn.
    if job is None or not job.visible_to(_client(request)):
        raise NotFound(f"no job {job_id!r}")
    return jobs, job


async def get_job(request: Request) -> Response:
    _, job = await _get(request)
    return JSONResponse(job.public())


async def delete_job(request: Request) -> Response:
    jobs, job = await _get(request)
    async with _reaching(jobs, app_state(request).settings):
        cancelled = await jobs.cancel(job.id)
        if cancelled is None:
            job = await jobs.get(job.id) or job
    if cancelled is None:
        raise Conflict(f"job {job.id} {'was' if job.status == 'cancelled' else 'has'} already {job.status}; "
                       "only queued or running jobs can be cancelled")
    return JSONResponse(cancelled.public())


class JobCursor(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    after: int = Field(default=0, ge=0, description="Send only the pieces after this event id.")


def _cursor(request: Request) -> int:
    """Where a follower that reconnects left off: ``?after=N``, else ``Last-Event-ID``, which
    a browser's EventSource sends by itself when it reconnects."""
    query = dict(request.query_params)
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None and "after" not in query:
        query["after"] = last_event_id.strip()
    try:
        return JobCursor.model_validate(query).after
    except ValidationError as exc:
        raise ValidationFailed(describe_validation(exc)) from None


@Endpoint
async def stream_job(request: Request) -> StreamResponse:
    after = _cursor(request)
    jobs, job = await _get(request)
    settings = app_state(request).settings
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache, no-transform"),
        (b"x-accel-buffering", b"no"),
        (b"x-request-id", request_id.get().encode()),
    ]
    return StreamResponse(body_of(_sse(jobs.follow(job.id), job_id=job.id, model=job.model, after=after)),
                          headers=headers,
                          ping=sse.PING, heartbeat=settings.heartbeat_interval, send_timeout=settings.send_timeout)


async def _sse(events: AsyncIterator[FollowEvent], *, job_id: str, model: str,
               after: int = 0) -> AsyncGenerator[bytes, None]:
    """The job's events in tokenrelay's SSE format (``streaming.sse``), the pieces numbered
    from 1 and those up to ``after`` left out, as the follower has them; the response sends
    the pings in silences."""
    try:
        yield sse.start(job_id, model)
        seq = 0
        async for event in events:
            if event.kind == "text":
                if event.whole and after:
                    # The store no longer has the pieces the follower counted: where piece
                    # ``after`` ended is unknown, so give the whole text to replace its own.
                    seq = max(after, seq + 1)
                    yield b"id: %d\n" % seq + sse.event(b"reset", {"text": event.text})
                    continue
                seq += 1
                if seq > after:
                    yield sse.delta(seq, event.text)
            elif event.kind == "done":
                yield sse.event(b"done", event.data or {})
                return
            else:
                yield sse.event(b"error", event.data or {})
                return
    except Exception as exc:  # noqa: BLE001  # e.g. Redis gone: say so in-band, the status is sent
        log.warning("job %s: following failed: %s", job_id, exc)
        yield sse.error(TokenrelayError(f"following the job failed: {exc}"))
        return
    finally:
        await close(events)
    yield sse.error(TokenrelayError("the job's stream ended before the job did"))
