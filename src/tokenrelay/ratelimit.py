"""Per-client limits: requests per minute, and requests open at once.

Requests per minute use the ``limits`` library's moving window (every request of the last
60 s counts, no burst at a window's edge), stored in memory or, with
``TOKENRELAY_REDIS_URL``, in Redis so that several tokenrelay processes share one count.

Open requests are slots: one is taken before the route runs and given back once when its
response has ended — completed, failed, or abandoned by the client — so a stream holds its
slot for as long as it streams. ``limits`` counts events in time windows, not things that
are open, so slots are counted here: a dict in memory, or in Redis a sorted set per client
whose members are the open slots, each scored with the time its lease runs out. A process
renews the leases of its own slots every ``SLOT_LEASE / 3`` seconds; if it dies, its slots
lapse after ``SLOT_LEASE`` instead of blocking the client forever.

Redis trouble does not take the API down: a limit that cannot be checked lets the request
through, and says so in the log (at most every 30 s). A hung Redis is trouble too: every
command has a deadline (``TOKENRELAY_REDIS_TIMEOUT``), and after a failure the limits are
not asked of Redis for ``DEGRADED_FOR`` seconds, so a stopped Redis costs one request the
deadline, not every request. ``status()`` says so for ``/readyz``. See docs/auth-and-limits.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import redis
import redis.asyncio
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from .errors import RateLimited

_STORAGE_ERRORS = (StorageError, redis.RedisError, OSError)

log = logging.getLogger("tokenrelay.limits")

# Redis key prefixes, together in one place.
REDIS_RATE_PREFIX = "tokenrelay:rate"
REDIS_SLOTS_PREFIX = "tokenrelay:slots:"

SLOT_LEASE = 60.0
"""Seconds a slot outlives a process that died holding it."""
DEGRADED_FOR = 5.0
"""Seconds the limits are let through without asking Redis after it failed or timed out."""
BUSY_RETRY_AFTER = 1
"""``Retry-After`` for a client at its limit of open requests: nobody knows when one ends."""
SLOT_GRACE = 0.5
"""Seconds a request at the limit of open requests waits for a slot before it is refused.

A slot is given back when the route has returned, a moment after the client read the last
byte; a client that sends its next request at once (one at a time, as most do) would
otherwise now and then be refused by its own previous, finished request. Only requests at
the limit wait; the others pay nothing."""

# Take a slot if fewer than ARGV[1] are open; leases that ran out are dropped first.
# Redis's clock, not the processes', decides what ran out.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
return 1
"""

# Renew the leases of slots still held (XX: never re-create one released meanwhile).
_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', until_, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[1]) * 1000))
end
return #KEYS
"""


class _MemorySlots:
    def __init__(self) -> None:
        self._open: dict[str, int] = {}
        self._freed: dict[str, asyncio.Event] = {}  # set when a slot of that client is given back

    async def acquire(self, who: str, limit: int) -> str | None:
        count = self._open.get(who, 0)
        if count >= limit:
            return None
        self._open[who] = count + 1
        return who

    async def wait_for(self, who: str, limit: int, seconds: float) -> str | None:
        with anyio.move_on_after(seconds):
            while True:
                await self._freed.setdefault(who, asyncio.Event()).wait()
                if (slot := await self.acquire(who, limit)) is not None:
                    return slot
        return None

    async def release(self, who: str, slot: str) -> None:
        self.give_back(who)

    def give_back(self, who: str) -> None:
        count = self._open.get(who, 0) - 1
        if count > 0:
            self._open[who] = count
        else:
            self._open.pop(who, None)
        freed = self._freed.pop(who, None)
        if freed is not None:
            freed.set()

    async def aclose(self) -> None:
        pass


class _RedisSlots:
    def __init__(self, client: Any) -> None:
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._prefix = "s" + secrets.token_hex(6) + ":"
        self._held: dict[str, str] = {}  # slot → its Redis key
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self, who: str, limit: int) -> str | None:
        key = REDIS_SLOTS_PREFIX + who
        slot = self._prefix + secrets.token_hex(6)
        if not await self._acquire(keys=[key], args=[limit, slot, SLOT_LEASE]):
            return None
        self._held[slot] = key
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return slot

    async def wait_for(self, who: str, limit: int, seconds: float) -> str | None:
        """Slots are given back by any process: ask again, at growing intervals."""
        deadline = time.monotonic() + seconds
        pause = 0.01
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(pause, left))
            if (slot := await self.acquire(who, limit)) is not None:
                return slot
            pause *= 2
        return None

    async def release(self, who: str, slot: str) -> None:
        key = self._held.pop(slot, None)
        if key is not None:
            await self._client.zrem(key, slot)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(SLOT_LEASE / 3)
            held = list(self._held.items())
            if not held:
                continue
            try:
                await self._renew(keys=[key for _, key in held], args=[SLOT_LEASE, *(slot for slot, _ in held)])
            except _STORAGE_ERRORS as exc:  # the next round tries again; the lease outlasts two misses
                log.warning("cannot renew %d stream slot(s) in Redis: %s", len(held), exc)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        held, self._held = self._held, {}
        if held:
            with anyio.move_on_after(2):
                for slot, key in held.items():
                    await self._client.zrem(key, slot)


Release = Callable[[], Awaitable[None]]


async def _nothing() -> None:
    pass


class Limiter:
    """Both limits for one process; ``admit`` is called once per API request."""

    def __init__(self, *, per_minute: int, concurrent: int, redis_url: str | None, timeout: float = 2.0) -> None:
        self.per_minute = per_minute
        self.concurrent = concurrent
        self.timeout = timeout
        if not (per_minute or concurrent):
            redis_url = None  # nothing to count
        self.shared = redis_url is not None
        self._rate = RateLimitItemPerMinute(per_minute) if per_minute else None
        self._client: Any = None
        storage: Storage
        if redis_url is not None:
            # Socket timeouts bound each command on a Redis that accepts connections but never
            # answers (stopped, swapping, a network black hole); admit() bounds the sum.
            self._client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=timeout,
                                                        socket_connect_timeout=timeout)
            storage = RedisStorage(
                "async+" + redis_url,
                implementation="redispy",
                key_prefix=REDIS_RATE_PREFIX,
                wrap_exceptions=True,
                connection_pool=self._client.connection_pool,
            )
            self._slots: _MemorySlots | _RedisSlots = _RedisSlots(self._client)
        else:
            storage = MemoryStorage()
            self._slots = _MemorySlots()
        self._window = MovingWindowRateLimiter(storage)
        self._warned = 0.0
        self._down_until = 0.0
        self._last_error: str | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.per_minute or self.concurrent)

    def describe(self) -> str:
        parts = []
        if self.per_minute:
            parts.append(f"{self.per_minute} requests/min")
        if self.concurrent:
            parts.append(f"{self.concurrent} open at once")
        where = "in Redis, shared by every process using it" if self.shared else "in this process's memory"
        return ", ".join(parts) + f" ({where})"

    async def admit(self, who: str, *, subject: str) -> Release:
        """Count one request for ``who``; raise ``RateLimited`` if it is over a limit.

        Returns the function that gives back its slot (call it once, when the response has
        ended). ``subject`` names ``who`` in the error message, e.g. "this key"."""
        if self.shared and time.monotonic() < self._down_until:
            return _nothing  # Redis failed a moment ago: do not make this request wait for it too
        slot: str | None = None
        try:
            # One deadline for every command of this request (and the wait for a slot), so a
            # hung Redis delays a request by at most this long before it is let through.
            with anyio.fail_after(self.timeout + SLOT_GRACE if self.shared else None):
                if self._rate is not None and not await self._window.hit(self._rate, who):
                    stats = await self._window.get_window_stats(self._rate, who)
                    wait = max(1, math.ceil(stats.reset_time - time.time()))
                    raise RateLimited(
                        f"too many requests for {subject}: at most {self.per_minute} per minute; retry in {wait} s",
                        headers={"retry-after": str(wait)},
                    )
                if not self.concurrent:
                    self._storage_ok()
                    return _nothing
                slot = await self._slots.acquire(who, self.concurrent)
                if slot is None:
                    slot = await self._slots.wait_for(who, self.concurrent, SLOT_GRACE)
        except TimeoutError:
            self._storage_failed(TimeoutError(f"no answer within {self.timeout:g} s"))
            if slot is not None:  # taken just before the deadline: give it back in the background
                self._release_later(who, slot)
            return _nothing
        except _STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            return _nothing
        self._storage_ok()
        if slot is None:
            raise RateLimited(
                f"too many requests open at once for {subject}: at most {self.concurrent}; "
                "retry when one of them has ended",
                headers={"retry-after": str(BUSY_RETRY_AFTER)},
            )

        if isinstance(self._slots, _MemorySlots):
            slots = self._slots

            async def release_here() -> None:  # no await inside: cancellation cannot skip it
                slots.give_back(who)

            return release_here

        async def release() -> None:
            # Shielded: a cancelled request (a client gone, a server shutting down) still
            # gives its slot back; bounded, so a dead Redis cannot hold the request open.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
                try:
                    await self._slots.release(who, slot)
                except _STORAGE_ERRORS as exc:
                    self._storage_failed(exc)

        return release

    def _release_later(self, who: str, slot: str) -> None:
        async def release() -> None:
            with contextlib.suppress(*_STORAGE_ERRORS), anyio.move_on_after(self.timeout):
                await self._slots.release(who, slot)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _storage_ok(self) -> None:
        if self._last_error is not None:
            log.warning("limits enforced again: Redis answers")
            self._last_error = None

    def _storage_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + DEGRADED_FOR
        self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if now - self._warned > 30:
            self._warned = now
            log.warning("limits not enforced: Redis failed (%s); requests are let through", exc)

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: what is counted where, and whether it is enforced right now.

        "degraded" is not "not ready": requests are served, only not limited."""
        if not self.enabled:
            return {"status": "off"}
        body: dict[str, Any] = {"status": "ok", "store": "redis" if self.shared else "memory",
                                "limits": self.describe()}
        if self._last_error is not None:
            body.update(status="degraded", reason=f"limits not enforced: Redis failed ({self._last_error}); "
                                                  "requests are let through")
        return body

    async def check(self) -> dict[str, Any]:
        """``status()`` after asking Redis (a PING within the timeout) unless it failed a moment ago."""
        if self.shared and time.monotonic() >= self._down_until:
            try:
                with anyio.fail_after(self.timeout):
                    await self._client.ping()
                self._storage_ok()
            except TimeoutError:
                self._storage_failed(TimeoutError(f"no answer within {self.timeout:g} s"))
            except _STORAGE_ERRORS as exc:
                self._storage_failed(exc)
        return self.status()

    async def aclose(self) -> None:
        await self._slots.aclose()
        if self._client is not None:
            await self._client.aclose()

