"""Jobs beyond one machine: with ``TOKENRELAY_REDIS_URL`` set, ``tokenrelay serve`` keeps
jobs in Redis and puts them on a saq queue; ``tokenrelay worker`` processes, anywhere, run
them (docs/jobs.md says why saq).

A worker heartbeats each job it runs. When a worker dies, another worker's sweep finds the
job's heartbeat stale and queues it again; ``runner.process`` then runs it from the start,
or goes on with its webhook under the same id. A job is cancelled with saq's abort, which
cancels the task on its worker: the provider's iterator closes, and the upstream request
with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from saq import Worker
from saq.queue.redis import RedisQueue
from saq.types import PartialTimersDict

from ..config import Settings
from ..routing import ModelRouter, Router
from .model import Job
from .redis_store import RedisJobStore
from .runner import JobContext, cancel, process
from .webhooks import Deliverer

log = logging.getLogger("tokenrelay.jobs")

QUEUE_NAME = "tokenrelay-jobs"
TASK = "process_job"
RETRIES = 100
"""Times a job is queued again after its worker died: enough for any rolling restart."""


def redis_label(url: str) -> str:
    """The Redis URL without its password, for logs."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class JobQueue(RedisQueue):
    """saq's Redis queue, with a shorter wait in the sweep.

    The sweep asks a stuck job's worker to abort it and waits for an answer (5 s per job,
    one job after the other) before queueing it again. A job is stuck here only when its
    heartbeat stopped, that is when its worker is dead or frozen and will not answer; 1 s
    is ample, and a dead worker's jobs then start again within seconds, not 5 s × jobs."""

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        return await super().sweep(lock, abort=min(abort, 1.0))


def make_queue(settings: Settings) -> JobQueue:
    assert settings.redis_url is not None
    queue = JobQueue.from_url(settings.redis_url, name=QUEUE_NAME)
    assert isinstance(queue, JobQueue)
    return queue


class RemoteJobs:
    """Submit and cancel jobs from ``tokenrelay serve``; workers run them, and unless
    ``TOKENRELAY_JOBS_IN_SERVE=false`` this process runs one too, so a single ``serve``
    with a Redis URL (set for the per-key limits, say) still gets its jobs done."""

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.label = redis_label(settings.redis_url)
        self.store = RedisJobStore(settings.redis_url)
        self.queue = make_queue(settings)
        self.worker = make_worker(settings) if settings.jobs_in_serve else None
        self._worker_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.queue.connect()
        if self.worker is not None:
            self._worker_task = asyncio.create_task(self._run_worker(self.worker), name="tokenrelay jobs worker")
        else:
            log.info("jobs: run by 'tokenrelay worker' processes only (TOKENRELAY_JOBS_IN_SERVE=false)")

    async def _run_worker(self, worker: Worker[Any]) -> None:
        """Start the worker once Redis answers: saq's worker logs a traceback a second while
        Redis is down, and a serve whose Redis is away (for its limits too) keeps serving."""
        warned = False
        while True:
            try:
                await self.store.redis.ping()  # type: ignore[misc]
                break
            except Exception as exc:  # noqa: BLE001 - any failure to reach Redis
                if not warned:
                    log.warning("jobs: Redis at %s does not answer (%s); jobs wait until it does", self.label, exc)
                    warned = True
                await asyncio.sleep(5)
        if warned:
            log.info("jobs: Redis at %s answers again", self.label)
        await worker.start()

    async def submit(self, job: Job) -> tuple[Job, bool]:
        job, created = await self.store.create(job)
        # A job seen again (same Idempotency-Key) and still queued is queued again: saq keeps
        # one job per key, and this heals a job whose first enqueue died with its process.
        if created or job["status"] == "queued":
            await self.queue.enqueue(TASK, key=job["id"], job_id=job["id"], timeout=0,
                                     heartbeat=self.settings.job_heartbeat, retries=RETRIES)
        return job, created

    async def cancel(self, job_id: str) -> Job | None:
        job = await cancel(self.store, job_id)
        if job is not None:
            queued = await self.queue.job(job_id)
            if queued is not None:
                await self.queue.abort(queued, error="cancelled")
        return job

    async def aclose(self) -> None:
        if self.worker is not None and self._worker_task is not None:
            await self.worker.stop()  # its running jobs go back on the queue
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker_task
            await self.worker.queue.disconnect()
        await self.queue.disconnect()
        await self.store.aclose()


class JobWorker(Worker[Any]):
    """saq's worker without its own signal handlers: inside ``tokenrelay serve`` the server
    owns SIGINT and SIGTERM and stops the worker from its lifespan."""

    SIGNALS = []


def make_worker(settings: Settings, *, concurrency: int | None = None, signals: bool = False) -> Worker[Any]:
    """A saq worker that runs tokenrelay's jobs, with its provider and webhook sender."""
    assert settings.redis_url is not None
    queue = make_queue(settings)
    heartbeat = settings.job_heartbeat

    async def startup(ctx: dict[str, Any]) -> None:
        store = RedisJobStore(settings.redis_url or "")
        ctx["jobs"] = JobContext(store=store, provider=ModelRouter(Router(settings)),
                                 deliverer=Deliverer(settings, store))
        log.info("worker %s: running jobs from %s (%s)", ctx["worker"].id, redis_label(settings.redis_url or ""),
                 settings.upstream_label)

    async def shutdown(ctx: dict[str, Any]) -> None:
        jobs: JobContext | None = ctx.get("jobs")
        if jobs is not None:
            await jobs.deliverer.aclose()
            await jobs.provider.aclose()
            await jobs.store.aclose()

    async def process_job(ctx: dict[str, Any], *, job_id: str) -> None:
        beat = asyncio.create_task(_heartbeat(ctx["job"], heartbeat / 3))
        try:
            await process(ctx["jobs"], job_id)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    return (Worker if signals else JobWorker)(
        queue,
        functions=[(TASK, process_job)],
        concurrency=concurrency or settings.job_concurrency,
        startup=startup,
        shutdown=shutdown,
        # Look for jobs of dead workers as often as a heartbeat may be missed.
        timers=cast(PartialTimersDict, {"sweep": heartbeat, "abort": 1}),
    )


async def _heartbeat(job: Any, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await job.update()
        except Exception as exc:  # noqa: BLE001 - Redis away for a moment: the next beat may work
            log.warning("job %s: heartbeat failed: %s", job.key, exc)
