"""Jobs inside ``tokenrelay serve``: kept in SQLite, run by the serving process itself.

At start-up every job the last process left unfinished is taken up again: queued or running
jobs run (from the start), ended jobs with a webhook pending go on with its delivery
schedule. Runs take one of ``TOKENRELAY_JOB_CONCURRENCY`` slots; webhook attempts take
none, and a retry waits on one timer (a heap of due times, woken when a new one comes), not
in a task of its own.

When the store fails (a full disk, an I/O error), a job that cannot start or end yet is
tried again with a backoff until it can, so it ends, and its followers get their end, once
the store works again; ``trouble`` says why meanwhile (``/readyz``). Ended jobs older than
``TOKENRELAY_JOB_RETENTION`` are deleted in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import sqlite3
import time
from collections.abc import AsyncIterator

from ..config import Settings
from ..providers.base import Provider
from . import runner
from .model import Job, iso
from .runner import JobContext
from .store import FollowEvent, SQLiteJobStore
from .webhooks import Deliverer

log = logging.getLogger("tokenrelay.jobs")

STORE_ERRORS = (sqlite3.Error, OSError)
"""How SQLite and the file system fail: a full disk, an I/O error, a read-only file."""
STORE_RETRY_FIRST = 0.5
STORE_RETRY_MAX = 15.0
"""Seconds between tries while the store fails: doubling from the first to the most."""


class LocalJobs:
    """The ``JobBackend`` of one process: submit, cancel and run jobs here."""

    def __init__(self, settings: Settings, provider: Provider) -> None:
        self.store = SQLiteJobStore(settings.data_dir)
        self.label = str(self.store.path)
        self.ctx = JobContext(store=self.store, provider=provider, deliverer=Deliverer(settings, self.store))
        self._slots = asyncio.Semaphore(settings.job_concurrency)
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._due: list[tuple[float, str]] = []  # (when, job id): a heap
        self._next: dict[str, float] = {}  # job id → its one current due time; older heap entries are stale
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None
        self._retention = settings.job_retention
        self.trouble: str | None = None
        """Why the store failed last, until it works again."""

    async def start(self) -> None:
        todo = await self.store.unfinished()
        if todo:
            log.info("taking up %d unfinished job(s) from %s", len(todo), self.store.path)
        for job in todo:
            if job.status.active:
                self._schedule_run(job.id)
            else:
                self._schedule_delivery(job)
        self._timer = asyncio.create_task(self._deliveries(), name="tokenrelay webhook timer")
        if self._retention:
            self._purger = asyncio.create_task(self._purge(), name="tokenrelay job retention")

    async def submit(self, job: Job) -> tuple[Job, bool]:
        try:
            job, created = await self.store.create(job)
        except STORE_ERRORS as exc:
            self._failed(exc)
            raise
        self._works()
        if created:
            self._schedule_run(job.id)
        return job, created

    async def get(self, job_id: str) -> Job | None:
        return await self.store.get(job_id)

    def follow(self, job_id: str) -> AsyncIterator[FollowEvent]:
        return self.store.follow(job_id)

    async def cancel(self, job_id: str) -> Job | None:
        job = await runner.cancel(self.store, job_id)
        task = self._runs.get(job_id)
        if job is not None and task is not None:
            task.cancel()  # unwinds the provider's iterator: the upstream request is closed
        return job

    def _schedule_run(self, job_id: str) -> None:
        if job_id in self._runs:
            return
        self.store.watch(job_id)
        task = asyncio.create_task(self._run(job_id), name=f"job {job_id}")
        self._runs[job_id] = task
        task.add_done_callback(lambda _: self._runs.pop(job_id, None))

    def _failed(self, exc: Exception) -> None:
        if self.trouble is None:
            log.warning("jobs: the store at %s fails (%s: %s); jobs wait until it works again",
                        self.label, type(exc).__name__, exc)
        self.trouble = f"the job store at {self.label} fails: {exc}"

    def _works(self) -> None:
        if self.trouble is not None:
            log.info("jobs: the store at %s works again", self.label)
            self.trouble = None

    async def _run(self, job_id: str) -> None:
        delay = STORE_RETRY_FIRST
        while True:
            try:
                async with self._slots:
                    job = await runner.run(self.ctx, job_id)
            except asyncio.CancelledError:
                raise
            except STORE_ERRORS as exc:
                # The run could not start (or a record not be read): the job stays queued;
                # trying again is safe, since runner.run is idempotent.
                self._failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)
                continue
            except Exception:
                log.exception("job %s: processing failed; it is taken up again at the next start", job_id)
                return
            self._works()
            if job is not None:
                self._schedule_delivery(job)
            return

    def _schedule_delivery(self, job: Job) -> None:
        due = job.delivery_due
        if due is None:
            return
        self._next[job.id] = due
        heapq.heappush(self._due, (due, job.id))
        self._wake.set()

    async def _deliveries(self) -> None:
        """Start each webhook attempt when it is due; sleep until the next, or a new one."""
        while True:
            self._wake.clear()
            now = time.time()
            while self._due and self._due[0][0] <= now:
                due, job_id = heapq.heappop(self._due)
                if self._next.get(job_id) != due or job_id in self._sending:
                    continue  # superseded by a later schedule, or being sent right now
                del self._next[job_id]
                task = asyncio.create_task(self._deliver(job_id), name=f"webhook of job {job_id}")
                self._sending[job_id] = task
            wait = self._due[0][0] - now if self._due else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _deliver(self, job_id: str) -> None:
        job: Job | None = None
        try:
            job = await runner.deliver(self.ctx, job_id)
        except STORE_ERRORS as exc:
            self._failed(exc)
            # Its record could not be read or written: try this attempt again later.
            self._next[job_id] = due = time.time() + STORE_RETRY_MAX
            heapq.heappush(self._due, (due, job_id))
            self._wake.set()
            return
        except Exception:
            log.exception("job %s: webhook attempt failed; it is taken up again at the next start", job_id)
        finally:
            self._sending.pop(job_id, None)
        if job is not None:
            self._schedule_delivery(job)  # the next attempt, if one is due

    async def _purge(self) -> None:
        """Delete the ended jobs older than the retention, now and then."""
        interval = min(max(self._retention / 10, 1.0), 3600.0)
        while True:
            try:
                count = await self.store.purge(iso(time.time() - self._retention))
            except STORE_ERRORS as exc:
                self._failed(exc)
            else:
                if count:
                    log.info("jobs: deleted %d job(s) older than %d s (TOKENRELAY_JOB_RETENTION)", count,
                             self._retention)
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        """Stop at once. Jobs still running stay 'running' in the store and run again at the
        next start; that is the same path as a crash, so it is the one that gets tested."""
        tasks = [*self._runs.values(), *self._sending.values(),
                 *(task for task in (self._timer, self._purger) if task is not None)]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.ctx.deliverer.aclose()
        await self.store.aclose()
