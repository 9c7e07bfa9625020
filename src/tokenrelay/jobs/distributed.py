"""Jobs beyond one machine: with ``TOKENRELAY_REDIS_URL`` set, ``tokenrelay serve`` keeps
jobs in Redis and puts them on a saq queue; ``tokenrelay worker`` processes, anywhere, run
them (docs/jobs.md says why saq).

Two kinds of saq job: a job's run (``RUN``, keyed by the job's id) and each webhook attempt
(``DELIVER``, keyed by job and attempt number, scheduled for when it is due), both through
``jobs.runner`` as in ``jobs.local``. A webhook retry waits in saq's schedule, not in a
worker slot. A worker heartbeats each saq job it runs; when a worker dies, another worker's
sweep finds the heartbeat stale and queues it again, and the runner's steps are idempotent.
A job is cancelled with saq's abort, which cancels the task on its worker: the provider's
iterator closes, and the upstream request with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError
from saq import Job as SaqJob
from saq import Worker
from saq.queue.redis import ID_PREFIX, PubSubMultiplexer, RedisQueue
from saq.types import PartialTimersDict

from ..config import Settings
from ..providers.base import Provider
from ..routing import ModelRouter, Router
from . import runner
from .model import Job, JobStatus
from .redis_store import RedisJobStore, connect
from .runner import JobContext
from .store import FollowEvent
from .webhooks import Deliverer

log = logging.getLogger("tokenrelay.jobs")

QUEUE_NAME = "tokenrelay-jobs"
RUN = "process_job"
"""The saq function that runs a job (the name runs queued by earlier versions carry)."""
DELIVER = "deliver_webhook"
"""The saq function that makes one webhook attempt, queued for when it is due."""
RETRIES = 100
"""Times a job is queued again after its worker died: enough for any rolling restart."""


def redis_label(url: str) -> str:
    """The Redis URL without its password, for logs."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


REDIS_ERRORS = (RedisError, OSError)
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 5.0
"""Seconds between pings while Redis is away: doubling from the first to the most."""


class RedisHealth:
    """Whether a worker's Redis answers, said once per change: "lost Redis …" when a call
    fails, "Redis … is back" when a ping answers again. While it is away, callers wait in
    ``until_up`` (one of them pings, with a backoff) instead of each failing in a loop."""

    def __init__(self, redis: Redis, label: str, *, says: bool = True) -> None:
        self.redis = redis
        self.label = label
        self.says = says
        """Whether it logs the changes: the API's side only keeps track, for /readyz, since
        each of its requests answers a 503 that says so anyway."""
        self.down_since: float | None = None
        self._lock = asyncio.Lock()

    def lost(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            if self.says:
                log.warning("jobs: lost Redis at %s (%s); trying again with a backoff", self.label, _said(exc))

    def answered(self) -> None:
        if self.down_since is not None:
            if self.says:
                log.info("jobs: Redis at %s is back after %.1f s", self.label, time.monotonic() - self.down_since)
            self.down_since = None

    async def until_up(self) -> None:
        if self.down_since is None:
            return
        async with self._lock:
            delay = BACKOFF_FIRST
            while self.down_since is not None:
                try:
                    await self.redis.ping()  # type: ignore[misc]
                except REDIS_ERRORS:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                self.answered()


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class JobQueue(RedisQueue):
    """saq's Redis queue, with every call bounded in time, a shorter wait in the sweep, and
    a dequeue that waits out a Redis that is away.

    The sweep asks a stuck job's worker to abort it and waits for an answer (5 s per job,
    one job after the other) before queueing it again. A job is stuck here only when its
    heartbeat stopped, that is when its worker is dead or frozen and will not answer; 1 s
    is ample, and a dead worker's jobs then start again within seconds, not 5 s × jobs.

    saq's worker takes a failed dequeue as "no job" and asks again at once: with Redis away
    that was a busy loop. Here a failed dequeue marks Redis lost, and the next one waits
    until a ping answers."""

    def __init__(self, url: str, *, timeout: float, name: str, says: bool = True) -> None:
        super().__init__(connect(url, timeout=timeout), name=name)
        self.health = RedisHealth(self.redis, redis_label(url), says=says)
        # saq listens for job changes on one long-lived subscription, idle for minutes at a
        # time; a read timeout would break it, so it has a client without one (every wait
        # on it is bounded by saq itself).
        self._listener: Redis = Redis.from_url(url, socket_connect_timeout=timeout)
        self._pubsub = PubSubMultiplexer(self._listener.pubsub(), prefix=f"{ID_PREFIX}{self.name}")

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        return await super().sweep(lock, abort=min(abort, 1.0))

    async def dequeue(self, timeout: float = 0.0, poll_interval: float = 0.0) -> SaqJob | None:
        await self.health.until_up()
        try:
            return await super().dequeue(timeout, poll_interval)
        except REDIS_ERRORS as exc:
            self.health.lost(exc)
            return None

    async def disconnect(self) -> None:
        await super().disconnect()
        await self._listener.aclose()


def make_queue(settings: Settings, *, says: bool = True) -> JobQueue:
    assert settings.redis_url is not None
    return JobQueue(settings.redis_url, timeout=settings.redis_timeout, name=QUEUE_NAME, says=says)


class RemoteJobs:
    """The ``JobBackend`` on Redis: submit and cancel jobs from ``tokenrelay serve``; workers
    run them, and unless ``TOKENRELAY_JOBS_IN_SERVE=false`` this process runs one too (with
    ``provider``, the serving one), so a single ``serve`` with a Redis URL (set for the
    per-key limits, say) still gets its jobs done."""

    def __init__(self, settings: Settings, provider: Provider) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.label = redis_label(settings.redis_url)
        self.store = RedisJobStore(settings.redis_url, timeout=settings.redis_timeout,
                                   record_ttl=settings.job_retention)
        self.queue = make_queue(settings, says=False)
        self.worker = make_worker(settings, provider=provider) if settings.jobs_in_serve else None
        self._worker_task: asyncio.Task[None] | None = None

    @property
    def trouble(self) -> str | None:
        healths = [self.queue.health, *([self.worker.queue.health] if isinstance(self.worker, JobWorker) else [])]
        if all(health.down_since is None for health in healths):
            return None
        return f"Redis at {self.label} does not answer"

    @contextlib.asynccontextmanager
    async def _calling(self) -> AsyncIterator[None]:
        """Keeps track of whether Redis answers this process's API calls, for /readyz."""
        try:
            yield
        except REDIS_ERRORS as exc:
            self.queue.health.lost(exc)
            raise
        self.queue.health.answered()

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
        async with self._calling():
            job, created = await self.store.create(job)
            # A job seen again (same Idempotency-Key) and still queued is queued again: saq keeps
            # one job per key, and this heals a job whose first enqueue died with its process.
            if created or job.status is JobStatus.QUEUED:
                await enqueue_run(self.queue, self.settings, job.id)
        return job, created

    async def get(self, job_id: str) -> Job | None:
        async with self._calling():
            return await self.store.get(job_id)

    def follow(self, job_id: str) -> AsyncIterator[FollowEvent]:
        return self.store.follow(job_id)

    async def cancel(self, job_id: str) -> Job | None:
        async with self._calling():
            job = await runner.cancel(self.store, job_id)
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


async def enqueue_run(queue: RedisQueue, settings: Settings, job_id: str) -> None:
    """Queue the job's run, under its id: saq keeps one queued run per job."""
    await queue.enqueue(RUN, key=job_id, job_id=job_id, timeout=0, heartbeat=settings.job_heartbeat,
                        retries=RETRIES)


async def enqueue_delivery(queue: RedisQueue, settings: Settings, job: Job) -> None:
    """Queue the job's next webhook attempt for when it is due, if one is.

    Keyed by the attempt's number, so doing this twice (a run or an attempt done again after
    its worker died) queues it once. saq schedules in whole seconds: rounded up, an attempt
    is never early."""
    due = job.delivery_due
    if due is None:
        return
    scheduled = math.ceil(due) if due > time.time() else 0
    await queue.enqueue(DELIVER, key=f"{job.id}:webhook:{len(job.deliveries) + 1}", job_id=job.id,
                        scheduled=scheduled, timeout=0, heartbeat=settings.job_heartbeat, retries=RETRIES)


class JobWorker(Worker[Any]):
    """saq's worker, quiet while Redis is away, and with signal handlers only when asked:
    inside ``tokenrelay serve`` the server owns SIGINT and SIGTERM and stops the worker from
    its lifespan.

    saq's upkeep loops (abort, schedule, sweep, worker info) log a traceback each time one
    fails, two a second with Redis away; here a Redis failure marks it lost (one line) and
    each loop waits, with the dequeue, until it is back."""

    queue: JobQueue

    def __init__(self, queue: JobQueue, *, signals: bool, **kwargs: Any) -> None:
        super().__init__(queue, **kwargs)
        self.SIGNALS = Worker.SIGNALS if signals else []

    async def start(self) -> None:
        quiet = _RedisQuiet(self.queue.health)
        saq_log.addFilter(quiet)
        try:
            await super().start()
        finally:
            saq_log.removeFilter(quiet)

    async def process(self) -> bool:
        # saq records a job's end in Redis; when that fails, and then its retry too, the
        # error escapes saq's loop. The job's own record is tokenrelay's, written already;
        # the sweep puts the saq job back once Redis answers, and running it again is a no-op.
        try:
            return await super().process()
        except REDIS_ERRORS as exc:
            self.queue.health.lost(exc)
            return True

    async def upkeep(self) -> list[asyncio.Task[None]]:
        health = self.queue.health

        async def poll(func: Callable[[int], Awaitable[Any]], sleep: int, arg: int | None = None) -> None:
            while not self.event.is_set():
                try:
                    await health.until_up()
                    await func(arg or sleep)
                except REDIS_ERRORS as exc:
                    health.lost(exc)
                except Exception:
                    log.exception("jobs: worker upkeep failed")
                await asyncio.sleep(sleep)

        timers = self.timers
        return [
            asyncio.create_task(poll(self.abort, timers["abort"])),
            asyncio.create_task(poll(self.schedule, timers["schedule"])),
            asyncio.create_task(poll(self.queue.sweep, timers["sweep"])),
            asyncio.create_task(poll(self.worker_info, timers["worker_info"], timers["worker_info"] + 1)),
        ]


def make_worker(settings: Settings, *, concurrency: int | None = None, signals: bool = False,
                provider: Provider | None = None) -> Worker[Any]:
    """A saq worker that runs tokenrelay's jobs and sends their webhooks. Its provider is
    ``provider`` (inside ``serve``: the serving one), or one built as ``serve`` builds it:
    the model router, with its routes, retries and fallbacks."""
    assert settings.redis_url is not None
    queue = make_queue(settings)
    heartbeat = settings.job_heartbeat

    async def startup(ctx: dict[str, Any]) -> None:
        store = RedisJobStore(settings.redis_url or "", timeout=settings.redis_timeout,
                              record_ttl=settings.job_retention)
        ctx["own_provider"] = provider is None
        ctx["jobs"] = JobContext(store=store, provider=provider or ModelRouter(Router(settings)),
                                 deliverer=Deliverer(settings, store))
        log.info("worker %s: running jobs from %s (%s)", ctx["worker"].id, redis_label(settings.redis_url or ""),
                 describe_upstreams(settings))

    async def shutdown(ctx: dict[str, Any]) -> None:
        jobs: JobContext | None = ctx.get("jobs")
        if jobs is not None:
            await jobs.deliverer.aclose()
            if ctx.get("own_provider"):
                await jobs.provider.aclose()
            await jobs.store.aclose()

    async def run_job(ctx: dict[str, Any], *, job_id: str) -> None:
        async with _beating(ctx["job"], heartbeat / 3):
            job = await runner.run(ctx["jobs"], job_id)
            if job is not None:
                await enqueue_delivery(ctx["worker"].queue, settings, job)

    async def deliver_webhook(ctx: dict[str, Any], *, job_id: str) -> None:
        async with _beating(ctx["job"], heartbeat / 3):
            job = await runner.deliver(ctx["jobs"], job_id)
            if job is not None:
                await enqueue_delivery(ctx["worker"].queue, settings, job)

    return JobWorker(
        queue,
        functions=[(RUN, run_job), (DELIVER, deliver_webhook)],
        concurrency=concurrency or settings.job_concurrency,
        startup=startup,
        shutdown=shutdown,
        # Look for jobs of dead workers as often as a heartbeat may be missed.
        timers=cast(PartialTimersDict, {"sweep": heartbeat, "abort": 1}),
        # A blocking dequeue must come back before the Redis client's timeout fires.
        dequeue_timeout=settings.redis_timeout / 2,
        signals=signals,
    )


saq_log = logging.getLogger("saq")


class _RedisQuiet(logging.Filter):
    """saq logs a traceback for each of its calls that fails; one that failed because Redis
    is away becomes the worker's one "lost Redis" line instead."""

    def __init__(self, health: RedisHealth) -> None:
        super().__init__()
        self.health = health

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, REDIS_ERRORS):
            self.health.lost(exc)
            return False
        return True


def describe_upstreams(settings: Settings) -> str:
    """Where this process's jobs get their answers, for its start-up log line."""
    if settings.routes:
        return "routes: " + ", ".join(f"{r.pattern} → {r.label} ({r.kind})" for r in settings.routes)
    return "upstream: " + settings.upstream_label


@contextlib.asynccontextmanager
async def _beating(job: Any, interval: float) -> AsyncIterator[None]:
    """saq's heartbeat for the job while the block runs: a silent job is taken to be its
    dead worker's and is queued again."""
    beat = asyncio.create_task(_heartbeat(job, interval))
    try:
        yield
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat


async def _heartbeat(job: Any, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await job.update()
        except REDIS_ERRORS as exc:  # Redis away for a moment: the next beat may work
            health = getattr(job.queue, "health", None)
            if isinstance(health, RedisHealth):
                health.lost(exc)
            else:
                log.warning("job %s: heartbeat failed: %s", job.key, exc)
