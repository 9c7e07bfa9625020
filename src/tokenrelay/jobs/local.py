"""Jobs inside ``tokenrelay serve``: kept in SQLite, run by the serving process itself.

At start-up every job the last process left unfinished is taken up again: queued or running
jobs run (from the start), ended jobs with a webhook pending go on with its delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..config import Settings
from ..providers.base import Provider
from .model import Job
from .runner import JobContext, cancel, process
from .store import SQLiteJobStore
from .webhooks import Deliverer

log = logging.getLogger("tokenrelay.jobs")


class LocalJobs:
    """Submit, cancel and run jobs in this process."""

    def __init__(self, settings: Settings, provider: Provider) -> None:
        self.store = SQLiteJobStore(settings.data_dir)
        self.ctx = JobContext(store=self.store, provider=provider, deliverer=Deliverer(settings, self.store))
        self._slots = asyncio.Semaphore(settings.job_concurrency)
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        todo = await self.store.unfinished()
        if todo:
            log.info("taking up %d unfinished job(s) from %s", len(todo), self.store.path)
        for job_id in todo:
            self._schedule(job_id)

    async def submit(self, job: Job) -> tuple[Job, bool]:
        job, created = await self.store.create(job)
        if created:
            self._schedule(job["id"])
        return job, created

    async def cancel(self, job_id: str) -> Job | None:
        job = await cancel(self.store, job_id)
        task = self._tasks.get(job_id)
        if job is not None and task is not None:
            task.cancel()  # unwinds the provider's iterator: the upstream request is closed
        return job

    def _schedule(self, job_id: str) -> None:
        if job_id in self._tasks:
            return
        self.store.watch(job_id)
        task = asyncio.create_task(self._process(job_id), name=f"job {job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def _process(self, job_id: str) -> None:
        try:
            await process(self.ctx, job_id, slot=self._slots)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: processing failed; it is taken up again at the next start", job_id)

    async def aclose(self) -> None:
        """Stop at once. Jobs still running stay 'running' in the store and run again at the
        next start; that is the same path as a crash, so it is the one that gets tested."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.ctx.deliverer.aclose()
        await self.store.aclose()
