"""``RedisJobStore``: job records and live text in Redis, shared by ``tokenrelay serve``
processes and ``tokenrelay worker`` processes on any machine.

Every key tokenrelay's jobs use is below (the queue's own keys are saq's, ``saq:…``).
The live text of a run is a Redis stream: a follower reads it from the start, then blocks
for more, so replay and follow are one ``XREAD`` loop, from any process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import WatchError

from .model import Job
from .store import Change, FollowEvent, replay

JOB = "tokenrelay:job:"
"""JOB + id → the job's record (JSON)."""
JOB_KEY = "tokenrelay:job-key:"
"""JOB_KEY + Idempotency-Key → the id of the job it created."""
JOB_TEXT = "tokenrelay:job-text:"
"""JOB_TEXT + id → stream of the current run: {run} first, {t: text} per piece, {end: JSON}."""

TEXT_TTL = 3600
"""Seconds an ended job's stream is kept; afterwards followers replay from the record."""
RECORD_TTL = 7 * 24 * 3600
"""Seconds a job's record is kept after it is created, unless TOKENRELAY_JOB_RETENTION says
otherwise (jobs are answers, not an archive)."""

# ARGV[4] '0': kept until deleted (TOKENRELAY_JOB_RETENTION=0).
_CREATE = """
if ARGV[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return existing end
  if ARGV[4] == '0' then redis.call('SET', KEYS[2], ARGV[3]) else redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4]) end
end
if ARGV[4] == '0' then redis.call('SET', KEYS[1], ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4]) end
return false
"""


def connect(url: str, *, timeout: float) -> aioredis.Redis:
    """A client for the jobs' Redis whose every call ends within ``timeout`` seconds.

    redis-py's default retries a timed-out or refused call three times with a backoff of up
    to 10 s, so a frozen Redis held a request for 40 s; here a call fails once, at once,
    and the caller decides (a 503 with Retry-After, a worker waiting with its own backoff)."""
    return aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                   retry=Retry(NoBackoff(), 0))


class RedisJobStore:
    def __init__(self, url: str, *, timeout: float = 3.0, record_ttl: int = RECORD_TTL) -> None:
        self.redis: aioredis.Redis = connect(url, timeout=timeout)
        # A follower's blocking XREAD must come back before the client's own timeout fires.
        self.block_ms = max(1, min(1000, int(timeout * 1000 / 2)))
        self.record_ttl = record_ttl
        self._create = self.redis.register_script(_CREATE)

    async def create(self, job: Job) -> tuple[Job, bool]:
        key = job.idempotency_scope or ""
        existing = await self._create(
            keys=[JOB + job.id, JOB_KEY + key],
            args=[job.to_json(), "1" if key else "", job.id, self.record_ttl],
        )
        if existing:
            earlier = await self.get(existing.decode())
            if earlier is not None:
                return earlier, False
        return job, True

    async def get(self, job_id: str) -> Job | None:
        raw = await self.redis.get(JOB + job_id)
        return Job.from_json(raw) if raw else None

    async def update(self, job_id: str, change: Change) -> Job | None:
        key = JOB + job_id
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return None
                    job = change(Job.from_json(raw))
                    if job is None:
                        return None
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, job.to_json(), keepttl=True)
                    await pipe.execute()
                    return job
                except WatchError:
                    continue  # changed meanwhile (a cancel, a heartbeat of another writer): again

    async def live_start(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(JOB_TEXT + job_id)
            pipe.xadd(JOB_TEXT + job_id, {"run": "1"})
            pipe.expire(JOB_TEXT + job_id, self.record_ttl or RECORD_TTL)
            await pipe.execute()

    async def live_append(self, job_id: str, text: str) -> None:
        await self.redis.xadd(JOB_TEXT + job_id, {"t": text})

    async def live_text(self, job_id: str) -> str:
        entries = await self.redis.xrange(JOB_TEXT + job_id)
        return "".join(fields[b"t"].decode() for _, fields in entries if b"t" in fields)

    async def live_end(self, job_id: str, event: FollowEvent) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(JOB_TEXT + job_id, {"end": json.dumps({"kind": event.kind, "data": event.data})})
            pipe.expire(JOB_TEXT + job_id, TEXT_TTL)
            await pipe.execute()

    async def follow(self, job_id: str) -> AsyncIterator[FollowEvent]:
        stream = JOB_TEXT + job_id
        last = "0-0"
        sent = False
        while True:
            if not await self.redis.exists(stream):
                job = await self.get(job_id)
                if job is None:
                    return
                if not job.status.active:  # ended, its stream expired (or never began)
                    if not sent:
                        async for event in replay(job):
                            yield event
                    return
            reply = await self.redis.xread({stream: last}, count=512, block=self.block_ms)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if b"t" in fields:
                        sent = True
                        yield FollowEvent("text", fields[b"t"].decode())
                    elif b"end" in fields:
                        end = json.loads(fields[b"end"])
                        yield FollowEvent(end["kind"], data=end["data"])
                        return
                    elif b"run" in fields and sent:
                        yield FollowEvent("error", data={"error": {
                            "type": "job_restarted",
                            "message": "the job's worker stopped and another runs it again; follow it again"}})
                        return

    async def aclose(self) -> None:
        await self.redis.aclose()
