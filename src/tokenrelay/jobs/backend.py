"""``JobBackend``: where jobs are kept and run, behind one protocol, and ``open_backend``,
which picks one from the settings.

Both backends run jobs with ``jobs.runner`` and deliver webhooks with ``jobs.webhooks``, so
a job has the same states, the same retries and the same delivery record either way; they
differ only in where records live and who schedules the next step:

- ``LocalJobs`` (``jobs.local``): SQLite in the data directory, run by this process; the
  next webhook attempt waits on the process's own timer.
- ``RemoteJobs`` (``jobs.distributed``): Redis, run by saq workers (``tokenrelay worker``,
  and this process too unless ``TOKENRELAY_JOBS_IN_SERVE=false``); the next webhook
  attempt is a saq job scheduled for its time.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Protocol

from ..config import Settings
from ..providers.base import Provider
from .model import Job
from .store import FollowEvent, StoreBusy

log = logging.getLogger("tokenrelay.jobs")


class JobBackend(Protocol):
    label: str
    """Where the jobs are, for messages: the SQLite file, or the Redis URL without password."""

    @property
    def trouble(self) -> str | None:
        """Why the store failed last, while it does (``/readyz`` shows it); None when it works."""
        ...

    async def start(self) -> None:
        """Take up the work left unfinished and begin running jobs."""
        ...

    async def submit(self, job: Job) -> tuple[Job, bool]:
        """Save and queue a new job; with an Idempotency-Key already used, the earlier job and
        False."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job, stopping its run; None when it had already ended."""
        ...

    def follow(self, job_id: str) -> AsyncIterator[FollowEvent]:
        """What the job has written so far, then each new piece, then its end."""
        ...

    async def aclose(self) -> None: ...


class JobsUnavailable(Exception):
    """This process cannot take jobs; the message says why, for the 503 of /api/jobs."""


async def open_backend(settings: Settings, provider: Provider, *, processes: int = 1) -> JobBackend:
    """The started backend for ``settings``: Redis with ``TOKENRELAY_REDIS_URL``, else
    SQLite in the data directory. ``provider`` answers the jobs run in this process (the
    router-backed one that ``serve`` uses); ``processes`` is how many serve processes share
    the settings (SQLite-kept jobs need one)."""
    if processes > 1 and not settings.redis_url:
        raise JobsUnavailable(
            f"jobs are not available: with {processes} serve processes they need TOKENRELAY_REDIS_URL "
            "(and 'tokenrelay worker'); SQLite-kept jobs need a single process"
        )
    jobs: JobBackend
    try:
        if settings.redis_url:
            # TOKENRELAY_REDIS_URL also holds the per-key limits; a serve set up for those alone
            # still runs its jobs, since it runs a queue worker itself (jobs_in_serve).
            from .distributed import RemoteJobs

            jobs = RemoteJobs(settings, provider)
            log.info("jobs: on the Redis queue at %s", jobs.label)
        else:
            from .local import LocalJobs

            jobs = LocalJobs(settings, provider)
            log.info("jobs: kept in %s", jobs.label)
        await jobs.start()
    except StoreBusy as exc:
        raise JobsUnavailable(f"jobs are not available: {exc}") from None
    except (OSError, sqlite3.Error) as exc:
        # A read-only or unusable data directory: streaming needs no disk, so the service
        # still starts, and /api/jobs and /readyz say why jobs are away.
        raise JobsUnavailable(
            f"jobs are not available: the data directory {settings.data_dir} cannot be used "
            f"({type(exc).__name__}: {exc}); set TOKENRELAY_DATA_DIR to a writable directory"
        ) from None
    return jobs
