"""A job's record: one JSON object, the same in SQLite and in Redis.

    {"id", "status", "model", "request", "idempotency_key", "body_hash",
     "result": {"text", "finish_reason", "usage"} | None, "error": {"type", "message"} | None,
     "created_at", "started_at", "finished_at", "runs",
     "webhook": {"url", "id", "state", "next_attempt_at"} | None, "deliveries": [...]}

``webhook.state`` is ``waiting`` until the job ends, then ``pending`` until an attempt
succeeds (``delivered``) or the attempts run out (``failed``); a cancelled job sends none
(``skipped``). ``webhook.id`` is chosen when the job is created and sent on every attempt.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any

Job = dict[str, Any]

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE = frozenset({QUEUED, RUNNING})
ENDED = frozenset({SUCCEEDED, FAILED, CANCELLED})

WAITING, PENDING, DELIVERED, UNDELIVERED, SKIPPED = "waiting", "pending", "delivered", "failed", "skipped"


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
            body_hash: str) -> Job:
    return {
        "id": new_job_id(),
        "status": QUEUED,
        "model": model,
        "request": request,
        "idempotency_key": idempotency_key,
        "body_hash": body_hash,
        "result": None,
        "error": None,
        "created_at": now_iso(),
        "started_at": None,
        "finished_at": None,
        "runs": 0,
        "webhook": {"url": webhook_url, "id": new_webhook_id(), "state": WAITING, "next_attempt_at": 0.0}
        if webhook_url else None,
        "deliveries": [],
    }


def public(job: Job) -> dict[str, Any]:
    """The job as ``GET /api/jobs/{id}`` shows it."""
    hook = job.get("webhook")
    return {
        "id": job["id"],
        "status": job["status"],
        "model": job["model"],
        "result": job["result"],
        "error": job["error"],
        "created_at": job["created_at"],
        "started_at": job["started_at"],
        "finished_at": job["finished_at"],
        "webhook": {"url": hook["url"], "id": hook["id"], "state": hook["state"]} if hook else None,
        "deliveries": job["deliveries"],
    }


def payload(job: Job) -> dict[str, Any]:
    """The webhook body. Built from fields that no longer change once the job has ended, so
    every attempt sends the same bytes."""
    data = public(job)
    del data["deliveries"]
    data["webhook"] = {"url": job["webhook"]["url"], "id": job["webhook"]["id"]}
    return {"type": "job." + job["status"], "timestamp": job["finished_at"], "data": data}
