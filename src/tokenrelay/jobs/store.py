"""Where jobs are kept: the ``JobStore`` protocol and its SQLite implementation.

A store keeps each job's record (``jobs.model``) and the live text of the jobs that are
running, so ``GET /api/jobs/{id}/stream`` can replay what exists and then follow.

``SQLiteJobStore`` is the default: one file under the data directory, WAL journal,
``synchronous=NORMAL`` (every commit survives the process being killed; only a power cut may
lose the last ones). All SQLite calls run on one dedicated thread, so the event loop never
waits on the disk: the same design as aiosqlite (a thread per connection), without the extra
dependency, and it serialises writers for free. The live text of a running job stays in
memory, since in this mode the process that runs a job is the one that serves it.
``RedisJobStore`` (``jobs.redis_store``) keeps both in Redis for workers on other machines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .model import Job, JobStatus, WebhookState

T = TypeVar("T")

Change = Callable[[Job], "Job | None"]
"""A change to a job: the new record, or None to leave it as it is (it is in another state)."""


ENDED_FEEDS = 256
"""Ended jobs whose pieces the SQLite store keeps, so that a follower that reconnects just
after the end (a browser's EventSource, with Last-Event-ID) is numbered as before."""
ENDED_FEED_TTL = 3600.0
"""How long an ended job's pieces are kept: as long as the Redis store keeps them."""
ENDED_FEED_CHARS = 16 << 20
"""Characters of text those ended jobs keep together at most, the oldest given up first."""


class StoreBusy(Exception):
    """Another tokenrelay process owns this data directory."""


@dataclass(frozen=True, slots=True)
class FollowEvent:
    """One thing a follower of a job sees: a piece of text, or the end."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    data: dict[str, Any] | None = None
    whole: bool = False
    """The whole text of an ended job whose pieces are no longer kept: one piece where the
    live run had many, so it cannot be numbered as they were (a resume cannot skip into it)."""


CANCELLED_EVENT = FollowEvent("error", data={"error": {"type": "job_cancelled", "message": "the job was cancelled"}})


def end_event(job: Job) -> FollowEvent:
    """How an ended job's stream ends: ``done`` with finish reason and usage, or ``error``."""
    if job.status is JobStatus.SUCCEEDED:
        result = job.result
        return FollowEvent("done", data={"finish_reason": result and result.finish_reason,
                                         "usage": result and result.usage})
    if job.status is JobStatus.CANCELLED:
        return CANCELLED_EVENT
    error = job.error
    if error is None:
        return FollowEvent("error", data={"error": {"type": "job_" + job.status,
                                                    "message": f"the job was {job.status}"}})
    return FollowEvent("error", data={"error": {"type": error.type, "message": error.message}})


async def replay(job: Job) -> AsyncIterator[FollowEvent]:
    """An ended job, followed: its whole text, then its end."""
    if job.result is not None and job.result.text:
        yield FollowEvent("text", job.result.text, whole=True)
    yield end_event(job)


class JobStore(Protocol):
    async def create(self, job: Job) -> tuple[Job, bool]:
        """Save a new job; with an idempotency key already used, the earlier job and False."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def update(self, job_id: str, change: Change) -> Job | None:
        """Apply ``change`` to the job atomically; the new record, or None when the job is
        missing or ``change`` left it as it was."""
        ...

    async def live_start(self, job_id: str) -> None:
        """A run begins: followers start from an empty text."""
        ...

    async def live_append(self, job_id: str, text: str) -> None: ...

    async def live_text(self, job_id: str) -> str:
        """What the current run has written so far."""
        ...

    async def live_end(self, job_id: str, event: FollowEvent) -> None: ...

    def follow(self, job_id: str) -> AsyncIterator[FollowEvent]:
        """What the job has written so far, then each new piece, then its end."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class _Feed:
    """The text of a job running in this process, and a signal for its followers."""

    pieces: list[str] = field(default_factory=list)
    end: FollowEvent | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class SQLiteJobStore:
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "jobs.sqlite3"
        # One process per data directory: recovery after a crash assumes that every
        # 'running' job it finds was left behind by a dead process, not run by a live one.
        self._lock_fd = os.open(data_dir / "jobs.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreBusy(f"another tokenrelay process is using {data_dir} (TOKENRELAY_DATA_DIR)") from None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenrelay-sqlite")
        self._db: sqlite3.Connection | None = None
        self._feeds: dict[str, _Feed] = {}
        self._ended: OrderedDict[str, tuple[float, _Feed, int]] = OrderedDict()
        self._ended_chars = 0
        try:
            self._thread.submit(self._open).result()
        except BaseException:
            self._thread.shutdown(wait=False)
            os.close(self._lock_fd)
            raise

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(
            "CREATE TABLE IF NOT EXISTS jobs ("
            " id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, status TEXT NOT NULL,"
            " delivery TEXT, created TEXT NOT NULL, record BLOB NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS jobs_todo ON jobs (status, delivery)")
        db.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created)")
        self._db = db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        assert db is not None, "store is closed"
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, db)

    async def create(self, job: Job) -> tuple[Job, bool]:
        def insert(db: sqlite3.Connection) -> tuple[Job, bool]:
            with db:
                db.execute("BEGIN IMMEDIATE")
                # The column holds the key within its owner's namespace (Job.idempotency_scope).
                scope = job.idempotency_scope
                if scope is not None:
                    row = db.execute("SELECT record FROM jobs WHERE idempotency_key = ?", (scope,)).fetchone()
                    if row is not None:
                        return Job.from_json(row[0]), False
                db.execute(
                    "INSERT INTO jobs (id, idempotency_key, status, delivery, created, record)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (job.id, scope, job.status, _delivery(job), job.created_at, job.to_json()),
                )
            return job, True

        return await self._run(insert)

    async def get(self, job_id: str) -> Job | None:
        def select(db: sqlite3.Connection) -> Job | None:
            row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return Job.from_json(row[0]) if row else None

        return await self._run(select)

    async def update(self, job_id: str, change: Change) -> Job | None:
        def write(db: sqlite3.Connection) -> Job | None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    return None
                job = change(Job.from_json(row[0]))
                if job is None:
                    return None
                db.execute("UPDATE jobs SET status = ?, delivery = ?, record = ? WHERE id = ?",
                           (job.status, _delivery(job), job.to_json(), job_id))
            return job

        return await self._run(write)

    async def unfinished(self) -> list[Job]:
        """Jobs that were queued or running, or had a webhook to send, when a process stopped."""
        def select(db: sqlite3.Connection) -> list[Job]:
            rows = db.execute(
                "SELECT record FROM jobs WHERE status IN (?, ?) OR delivery = ? ORDER BY created",
                (JobStatus.QUEUED, JobStatus.RUNNING, WebhookState.PENDING),
            ).fetchall()
            return [Job.from_json(row[0]) for row in rows]

        return await self._run(select)

    async def purge(self, created_before: str) -> int:
        """Delete the ended jobs created before ``created_before`` (RFC 3339, as ``created``
        is written, so text order is time order) that have no webhook left to send; how many."""
        def delete(db: sqlite3.Connection) -> int:
            with db:
                cursor = db.execute(
                    "DELETE FROM jobs WHERE created < ? AND status NOT IN (?, ?)"
                    " AND (delivery IS NULL OR delivery != ?)",
                    (created_before, JobStatus.QUEUED, JobStatus.RUNNING, WebhookState.PENDING),
                )
            return cursor.rowcount

        return await self._run(delete)

    # --- live text: in memory, since in this mode the serving process runs the job ---

    async def live_start(self, job_id: str) -> None:
        self._forget_ended(job_id)
        old = self._feeds.get(job_id)
        self._feeds[job_id] = feed = _Feed()
        if old is not None:
            old.notify()
        feed.notify()

    async def live_append(self, job_id: str, text: str) -> None:
        feed = self._feeds.get(job_id)
        if feed is not None:
            feed.pieces.append(text)
            feed.notify()

    async def live_text(self, job_id: str) -> str:
        feed = self._feeds.get(job_id)
        return "".join(feed.pieces) if feed is not None else ""

    async def live_end(self, job_id: str, event: FollowEvent) -> None:
        feed = self._feeds.pop(job_id, None)
        if feed is not None:
            feed.end = event
            feed.notify()
            self._forget_ended(job_id)
            chars = sum(map(len, feed.pieces))
            self._ended[job_id] = (time.monotonic(), feed, chars)
            self._ended_chars += chars
            while self._ended and (len(self._ended) > ENDED_FEEDS or self._ended_chars > ENDED_FEED_CHARS):
                self._forget_ended(next(iter(self._ended)))

    def _forget_ended(self, job_id: str) -> None:
        kept = self._ended.pop(job_id, None)
        if kept is not None:
            self._ended_chars -= kept[2]

    def _ended_feed(self, job_id: str) -> _Feed | None:
        kept = self._ended.get(job_id)
        if kept is None:
            return None
        if time.monotonic() - kept[0] > ENDED_FEED_TTL:
            self._forget_ended(job_id)
            return None
        return kept[1]

    def watch(self, job_id: str) -> None:
        """Make a queued job followable before it starts."""
        self._feeds.setdefault(job_id, _Feed())

    async def follow(self, job_id: str) -> AsyncIterator[FollowEvent]:
        feed = self._feeds.get(job_id) or self._ended_feed(job_id)
        if feed is None:
            job = await self.get(job_id)
            if job is None:
                return
            if job.status.active:  # queued but not watched yet: wait for it here
                self.watch(job_id)
                feed = self._feeds[job_id]
            else:
                async for event in replay(job):
                    yield event
                return
        sent = 0
        while True:
            changed = feed.changed
            while sent < len(feed.pieces):
                sent += 1
                yield FollowEvent("text", feed.pieces[sent - 1])
            if feed.end is not None:
                yield feed.end
                return
            if self._feeds.get(job_id) is not feed:
                # A new run replaced this one (the job restarted): follow that one instead.
                replacement = self._feeds.get(job_id)
                if replacement is None:
                    continue
                if sent:
                    yield FollowEvent("error", data={"error": {
                        "type": "job_restarted", "message": "the job restarted; follow it again"}})
                    return
                feed = replacement
                continue
            await changed.wait()

    async def aclose(self) -> None:
        def close(db: sqlite3.Connection) -> None:
            db.close()

        if self._db is not None:
            await self._run(close)
            self._db = None
        self._thread.shutdown(wait=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def _delivery(job: Job) -> str | None:
    return job.webhook.state if job.webhook else None
