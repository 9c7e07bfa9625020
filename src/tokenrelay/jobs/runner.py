"""Run one job, and make one webhook attempt: the same code wherever jobs are kept
(``jobs.local`` in ``tokenrelay serve``, ``jobs.distributed`` in ``tokenrelay worker``).

Both steps are idempotent, so doing one again after a crash is always right: a job still
queued or running (its last run died with its process) runs again from the start; a webhook
attempt is recorded only onto the record it was made from. Neither waits for anything but
the model and the receiver: when the next attempt is due is on the record
(``Job.delivery_due``), and the backend schedules it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import TokenrelayError
from ..providers.base import Provider
from ..schemas import ChatRequest
from .model import Job, JobError, JobStatus, Result
from .store import CANCELLED_EVENT, JobStore, end_event
from .webhooks import Deliverer

log = logging.getLogger("tokenrelay.jobs")
T = TypeVar("T")

job_observers: weakref.WeakKeyDictionary[Provider, Callable[[Job], object]] = weakref.WeakKeyDictionary()
"""Told of each job a run ends, by the provider that answered it: each app's metrics
(``Metrics.watch``) count the jobs of their own provider, wherever the job was queued."""


@dataclass(frozen=True, slots=True)
class JobContext:
    """What running a job needs; built once per process."""

    store: JobStore
    provider: Provider
    deliverer: Deliverer


async def run(ctx: JobContext, job_id: str) -> Job | None:
    """Ask the model and record the answer, if the job has not ended; the job afterwards
    (None if there is no such job)."""
    store = ctx.store
    job = await store.get(job_id)
    if job is None:
        log.warning("job %s: not found", job_id)
        return None
    if not job.status.active:
        return job  # ended already; its webhook may still be due
    started = await store.update(job_id, lambda j: j.started() if j.status.active else None)
    if started is None:  # cancelled meanwhile
        return await store.get(job_id)
    if job.status is JobStatus.RUNNING:
        log.warning("job %s: its last run stopped with its process; running it again", job_id)
    await store.live_start(job_id)
    began = time.perf_counter()
    pieces: list[str] = []
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: JobError | None = None
    try:
        deltas = await ctx.provider.open(ChatRequest.model_validate(started.request), model=started.model)
        try:
            async for delta in deltas:
                if delta.text:
                    pieces.append(delta.text)
                    await store.live_append(job_id, delta.text)
                if delta.finish_reason is not None:
                    finish_reason = delta.finish_reason
                if delta.usage is not None:
                    usage = delta.usage.to_dict()
        finally:
            await close(deltas)  # on cancel too: closing it closes the upstream request
    except TokenrelayError as exc:
        body = exc.to_dict()["error"]
        error = JobError(type=str(body["type"]), message=str(body["message"]))
    except asyncio.CancelledError:
        raise  # cancelled (its record says so already) or this process stopping: it runs again
    except Exception as exc:  # a bug must still end the job, visibly
        log.exception("job %s: failed", job_id)
        error = JobError(type="internal_error", message=f"{type(exc).__name__}: {exc}")
    result = Result(text="".join(pieces), finish_reason=finish_reason, usage=usage)

    def end(current: Job) -> Job | None:
        # Only the run that started: a job cancelled meanwhile keeps its cancel, and a run
        # taken over by another worker (this one thought dead) is that worker's to end.
        if current.status is not JobStatus.RUNNING or current.runs != started.runs:
            return None
        return current.ended(result, error)

    ended = await _until_recorded(lambda: store.update(job_id, end), job_id)
    if ended is None:
        return await store.get(job_id)
    await store.live_end(job_id, end_event(ended))
    if observe := job_observers.get(ctx.provider):
        observe(ended)
    log.info("job %s: %s in %.2f s (%d pieces%s)", job_id, ended.status, time.perf_counter() - began, len(pieces),
             f", {error.type}" if error else "")
    return ended


RECORD_RETRY_FIRST = 0.5
RECORD_RETRY_MAX = 15.0
"""Seconds between attempts to record a job's end while its store fails (a full disk, Redis
away): doubling from the first to the most."""


async def _until_recorded(write: Callable[[], Awaitable[T]], job_id: str) -> T:
    """``write()``, tried again until the store takes it. The answer is in hand: asking the
    model again because the disk was full for a while would cost a second answer, and the
    job's followers wait for this end. Said once when it fails and once when it works."""
    delay = RECORD_RETRY_FIRST
    failed = False
    while True:
        try:
            result = await write()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any store failure: try again
            if not failed:
                log.warning("job %s: cannot record its end (%s: %s); trying again until the store takes it",
                            job_id, type(exc).__name__, exc)
                failed = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECORD_RETRY_MAX)
            continue
        if failed:
            log.info("job %s: its end is recorded", job_id)
        return result


async def deliver(ctx: JobContext, job_id: str) -> Job | None:
    """One attempt at the job's webhook if one is pending; the job afterwards, whose
    ``delivery_due`` says when the next attempt is due, if any."""
    job = await ctx.store.get(job_id)
    if job is None or job.delivery_due is None:
        return job
    return await ctx.deliverer.attempt(job)


async def close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def cancel(store: JobStore, job_id: str) -> Job | None:
    """Mark a queued or running job cancelled, keeping what it has written so far; None when
    it had already ended. Stopping the run itself is the caller's part (it knows where the
    job runs)."""
    partial = await store.live_text(job_id)
    job = await store.update(job_id, lambda j: j.cancelled(partial) if j.status.active else None)
    if job is not None:
        await store.live_end(job_id, CANCELLED_EVENT)
    return job
