"""A job's record: a frozen ``Job``, stored as the same JSON object in SQLite and in Redis.

    {"id", "status", "model", "request", "idempotency_key", "body_hash", "owner",
     "result": {"text", "finish_reason", "usage"} | None, "error": {"type", "message"} | None,
     "created_at", "started_at", "finished_at", "runs",
     "webhook": {"url", "id", "state", "next_attempt_at"} | None, "deliveries": [...]}

A job changes only through its methods (``started``, ``ended``, ``cancelled``,
``attempted``), each a new record; the stores apply them atomically. ``webhook.state`` is
``waiting`` until the job ends, then ``pending`` until an attempt succeeds (``delivered``)
or the attempts run out (``failed``); a cancelled job sends none (``skipped``).
``webhook.id`` is chosen when the job is created and sent on every attempt;
``webhook.next_attempt_at`` is when the next attempt is due, so a retry is a scheduled
item, not a wait inside a running task.

``owner`` is the name of the client key that created the job (``TOKENRELAY_API_KEYS``):
only that key sees the job, and its Idempotency-Keys are its own. It is None when the
service has no client keys, and on records written before jobs had owners: those stay
readable by any key.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import TypeAdapter


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        """Not ended yet: it may still run (again) or be cancelled."""
        return self in (JobStatus.QUEUED, JobStatus.RUNNING)


class WebhookState(StrEnum):
    WAITING = "waiting"
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    """Attempts exhausted, or the URL refused for good."""
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Result:
    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class JobError:
    type: str
    message: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One webhook delivery attempt, as the job's ``deliveries`` list shows it."""

    attempt: int
    at: str
    status_code: int | None
    duration_ms: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    id: str
    state: WebhookState = WebhookState.WAITING
    next_attempt_at: float = 0.0
    """Epoch seconds when the next attempt is due (while ``pending``)."""


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    status: JobStatus
    model: str
    request: dict[str, Any]
    idempotency_key: str | None
    body_hash: str
    created_at: str
    result: Result | None = None
    error: JobError | None = None
    started_at: str | None = None
    finished_at: str | None = None
    runs: int = 0
    webhook: Webhook | None = None
    deliveries: tuple[Attempt, ...] = ()
    owner: str | None = None

    # --- transitions: each returns the new record ---

    def started(self) -> Job:
        """A run begins (again, from the start, if the last one died with its process)."""
        return dataclasses.replace(self, status=JobStatus.RUNNING, started_at=now_iso(), result=None, error=None,
                                   runs=self.runs + 1)

    def ended(self, result: Result, error: JobError | None) -> Job:
        hook = self.webhook and dataclasses.replace(self.webhook, state=WebhookState.PENDING, next_attempt_at=0.0)
        return dataclasses.replace(self, status=JobStatus.FAILED if error else JobStatus.SUCCEEDED, result=result,
                                   error=error, finished_at=now_iso(), webhook=hook)

    def cancelled(self, partial: str) -> Job:
        """Cancelled; a running job keeps what it had written (``partial``)."""
        hook = self.webhook and dataclasses.replace(self.webhook, state=WebhookState.SKIPPED)
        result = Result(partial) if self.status is JobStatus.RUNNING else None
        return dataclasses.replace(self, status=JobStatus.CANCELLED, finished_at=now_iso(), result=result,
                                   webhook=hook)

    def attempted(self, attempt: Attempt | None, state: WebhookState, next_attempt_at: float = 0.0) -> Job:
        """A delivery attempt recorded, and what follows it: delivered, failed, or the next
        attempt's time. ``attempt`` is None when none could be made (no secret)."""
        assert self.webhook is not None
        hook = dataclasses.replace(self.webhook, state=state, next_attempt_at=next_attempt_at)
        deliveries = self.deliveries if attempt is None else (*self.deliveries, attempt)
        return dataclasses.replace(self, webhook=hook, deliveries=deliveries)

    # --- views ---

    def visible_to(self, client: str | None) -> bool:
        """Whether the client key named ``client`` may see the job: its own, or one without
        an owner; without client keys (``client`` None) every job."""
        return client is None or self.owner is None or self.owner == client

    @property
    def idempotency_scope(self) -> str | None:
        """The job's Idempotency-Key as the stores index it: within its owner's namespace.
        A newline can be in neither a header value nor a key's name, so no two owners'
        scopes meet; a job without an owner keeps the bare key, as records always had."""
        if self.idempotency_key is None or self.owner is None:
            return self.idempotency_key
        return f"{self.owner}\n{self.idempotency_key}"

    @property
    def delivery_due(self) -> float | None:
        """When the webhook's next attempt is due; None when there is nothing to send."""
        if self.webhook is None or self.webhook.state is not WebhookState.PENDING:
            return None
        return self.webhook.next_attempt_at

    def public(self) -> dict[str, Any]:
        """The job as ``GET /api/jobs/{id}`` shows it."""
        data = _RECORD.dump_python(self, mode="json")
        hook = data["webhook"]
        return {
            "id": data["id"],
            "status": data["status"],
            "model": data["model"],
            "result": data["result"],
            "error": data["error"],
            "created_at": data["created_at"],
            "started_at": data["started_at"],
            "finished_at": data["finished_at"],
            "webhook": {"url": hook["url"], "id": hook["id"], "state": hook["state"]} if hook else None,
            "deliveries": data["deliveries"],
        }

    def payload(self) -> dict[str, Any]:
        """The webhook body. Built from fields that no longer change once the job has ended, so
        every attempt sends the same bytes."""
        assert self.webhook is not None
        data = self.public()
        del data["deliveries"]
        data["webhook"] = {"url": self.webhook.url, "id": self.webhook.id}
        return {"type": "job." + self.status, "timestamp": self.finished_at, "data": data}

    # --- the stored record ---

    def to_json(self) -> bytes:
        return _RECORD.dump_json(self)

    @staticmethod
    def from_json(raw: bytes | str) -> Job:
        return _RECORD.validate_json(raw)


_RECORD: TypeAdapter[Job] = TypeAdapter(Job)


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def new_webhook_id() -> str:
    return "msg_" + secrets.token_hex(12)


def iso(ts: float) -> str:
    """An epoch time as RFC 3339 in UTC, milliseconds: ``2026-11-25T21:00:00.123Z``."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso() -> str:
    return iso(time.time())


def new_job(*, request: dict[str, Any], model: str, webhook_url: str | None, idempotency_key: str | None,
            body_hash: str, owner: str | None = None) -> Job:
    return Job(id=new_job_id(), status=JobStatus.QUEUED, model=model, request=request,
               idempotency_key=idempotency_key, body_hash=body_hash, created_at=now_iso(), owner=owner,
               webhook=Webhook(url=webhook_url, id=new_webhook_id()) if webhook_url else None)
