"""Run one job to its end, then send its webhook: the same code in ``tokenrelay serve`` (SQLite
mode) and in ``tokenrelay worker`` (Redis mode).

``process`` is idempotent, so running it again after a crash is always right: a job still
queued or running (its last run died with its process) runs again from the start; an ended
job with a webhook to send goes on with its delivery schedule, under the same webhook id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from ..errors import TokenrelayError
from ..providers.base import Provider
from ..schemas import ChatRequest
from .model import ACTIVE, CANCELLED, FAILED, PENDING, RUNNING, SKIPPED, SUCCEEDED, Job, now_iso
from .store import FollowEvent, JobStore, end_event
from .webhooks import Deliverer

log = logging.getLogger("tokenrelay.jobs")


@dataclass(slots=True)
class JobContext:
    """What running a job needs; built once per process."""

    store: JobStore
    provider: Provider
    deliverer: Deliverer


async def process(ctx: JobContext, job_id: str, *,
                  slot: AbstractAsyncContextManager[Any] | None = None) -> Job | None:
    """Run the job if it has not ended, then deliver its webhook if one is due. ``slot``
    bounds how many jobs run at once; waiting deliveries do not hold one."""
    job = await ctx.store.get(job_id)
    if job is None:
        log.warning("job %s: not found", job_id)
        return None
    if job["status"] in ACTIVE:
        async with slot or nullcontext():
            job = await run(ctx, job)
        if job is None:
            return None
    if job["webhook"] and job["webhook"]["state"] == PENDING:
        job = await ctx.deliverer.deliver(job)
    return job


async def run(ctx: JobContext, job: Job) -> Job | None:
    """Ask the model; record the answer. None when the job was cancelled meanwhile."""
    store = ctx.store
    started = await store.update(job["id"], expect=ACTIVE, status=RUNNING, started_at=now_iso(), result=None,
                                 error=None, runs=job["runs"] + 1)
    if started is None:
        return None
    if job["status"] == RUNNING:
        log.warning("job %s: its last run stopped with its process; running it again", job["id"])
    await store.live_start(job["id"])
    began = time.perf_counter()
    pieces: list[str] = []
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: dict[str, str] | None = None
    try:
        deltas = await ctx.provider.open(ChatRequest.model_validate(job["request"]), model=job["model"])
        try:
            async for delta in deltas:
                if delta.text:
                    pieces.append(delta.text)
                    await store.live_append(job["id"], delta.text)
                if delta.finish_reason is not None:
                    finish_reason = delta.finish_reason
                if delta.usage is not None:
                    usage = delta.usage.to_dict()
        finally:
            await close(deltas)  # on cancel too: closing it closes the upstream request
    except TokenrelayError as exc:
        error = exc.to_dict()["error"]
    except Exception as exc:  # a bug must still end the job, visibly
        log.exception("job %s: failed", job["id"])
        error = {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
    status = FAILED if error else SUCCEEDED
    changes: dict[str, Any] = {
        "status": status,
        "result": {"text": "".join(pieces), "finish_reason": finish_reason, "usage": usage},
        "error": error,
        "finished_at": now_iso(),
    }
    ended = await store.update(job["id"], expect=frozenset({RUNNING}),
                               webhook={"state": PENDING, "next_attempt_at": 0.0}, **changes)
    if ended is None:  # cancelled while the answer was being written
        return None
    await store.live_end(job["id"], end_event(ended))
    log.info("job %s: %s in %.2f s (%d pieces%s)", job["id"], status, time.perf_counter() - began, len(pieces),
             f", {error['type']}" if error else "")
    return ended


async def close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def cancel(store: JobStore, job_id: str) -> Job | None:
    """Mark a queued or running job cancelled; None when it had already ended. Stopping the
    run itself is the caller's part (it knows where the job runs)."""
    job = await store.update(job_id, expect=ACTIVE, status=CANCELLED, finished_at=now_iso(),
                             webhook={"state": SKIPPED})
    if job is not None:
        await store.live_end(job_id, FollowEvent("error", data={"error": {
            "type": "job_cancelled", "message": "the job was cancelled"}}))
    return job
