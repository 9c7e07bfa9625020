"""Jobs inside ``tokenrelay serve``: kept in SQLite, run by the serving process itself.

At start-up every job the last process left unfinished is taken up again: queued or running
jobs run (from the start), ended jobs with a webhook pending go on with its delivery
schedule. Runs take one of ``TOKENRELAY_JOB_CONCURRENCY`` slots; webhook attempts take
none, and a retry waits on one timer (a heap of due times, woken when a new one comes), not
in a task of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import AsyncIterator

from ..config import Settings
from ..providers.base import Provider
from . import runner
from .model import Job
from .runner import JobContext
from .store import FollowEvent, SQLiteJobStore
from .webhooks import Deliverer

log = logging.getLogger("tokenrelay.jobs")


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

    async def submit(self, job: Job) -> tuple[Job, bool]:
        job, created = await self.store.create(job)
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

    async def _run(self, job_id: str) -> None:
        try:
            async with self._slots:
                job = await runner.run(self.ctx, job_id)
            if job is not None:
                self._schedule_delivery(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: processing failed; it is taken up again at the next start", job_id)

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
        except Exception:
            log.exception("job %s: webhook attempt failed; it is taken up again at the next start", job_id)
        finally:
            self._sending.pop(job_id, None)
        if job is not None:
            self._schedule_delivery(job)  # the next attempt, if one is due

    async def aclose(self) -> None:
        """Stop at once. Jobs still running stay 'running' in the store and run again at the
        next start; that is the same path as a crash, so it is the one that gets tested."""
        tasks = [*self._runs.values(), *self._sending.values(), *([self._timer] if self._timer else [])]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.ctx.deliverer.aclose()
        await self.store.aclose()
