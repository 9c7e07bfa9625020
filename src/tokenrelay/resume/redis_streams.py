"""``RedisStreams``: the streams of every tokenrelay instance, in one Redis, so a resume or a
stop that reaches any instance works (docs/resume.md, "Where the log lives").

Per stream, all keys share the hash tag ``{id}`` (one slot, so Redis Cluster runs it):

* ``…:meta``  hash: owner, model, wire, the owner's fencing ``epoch``, ``last`` seq written,
  ``stop`` (a durable stop request) and ``ending`` (JSON ``{"kind", "data"}``);
* ``…:log``   Redis Stream, one entry per piece, its entry id ``<seq>-0``, so a cursor is a range;
* ``…:lease`` the owner's lease (``LEASE`` s, renewed every ``RENEW`` s): gone = the owner died;
* ``…:readers`` touched by every instance with a reader of the stream (grace across instances).

The owner's hot path never waits for Redis: the asking connection gets each piece from the
producer, and a per-stream ``_Writer`` sends whatever accumulated since its last call as ONE
script call (``_APPEND``), which checks the epoch and the next seq (a retried batch skips what
was written; a fenced owner cannot write), publishes one doorbell with the last seq and
answers the stop flag; at most every ``RENEW`` s the same call also renews the lease and the
keys' expiry and asks whether anyone reads elsewhere, and the first call registers the stream
— so a batch runs a handful of Redis commands, a short answer is one call in all, and a stop
is noticed on the next append, or on the lease renewal of a silent upstream, or at once from
the stop channel.

Readers cost Redis connections per instance, not per reader: one ``_Hub`` per stream per
instance reads new entries on the shared pool when the one doorbell subscription rings (or on
a slow poll), and fans them out; a reader behind the hub's window reads its backlog first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from ..errors import NotFound, ServiceUnavailable
from .log import Ending
from .registry import LiveStream, Snapshot, StreamRef, Streams, log

LEASE = 4.0
"""Seconds an owner's lease outlives its last renewal: how soon a dead instance is noticed."""
RENEW = 0.5
"""Seconds between an idle stream's lease renewals, which also bring its stop flag."""
LOST_CONFIRM = 2.0
"""Seconds a lease must stay missing before a reader declares the stream lost: an owner
back from a Redis outage renews within ``RENEW`` first, so a blip is not a death."""
POLL = 1.0
"""Seconds between a hub's reads when no doorbell rang (a missed message costs this, no more)."""
READERS_TTL = 3.0
TOUCH = 1.0
"""Seconds between a hub's touches of its stream's ``readers`` key."""
PACE = 0.02
"""Least seconds between two writes of one stream (or two reads of one hub): pieces that come
faster go together, so a fast stream costs at most 1/PACE calls a second, and the asking
client, which never waits for Redis, does not notice."""
WINDOW = 512
"""Pieces a hub keeps for its readers; one further behind reads its backlog from Redis."""
WINDOW_BYTES = 1 << 20
"""…and at most about this many bytes of them: pieces of other wires can be large."""
BATCH = 1000
"""Entries one XRANGE returns at most, so a large answer is read in bounded steps…"""
BATCH_BYTES = 1 << 20
"""…of about this many bytes, judged by the pieces read so far."""
POOL_SIZE = 16
"""Redis connections of one instance's streams (plus one subscription), however many readers."""
PENDING_STOP_TTL = 60_000
"""Milliseconds a stop for a stream not yet registered waits for it."""
BACKLOG_BYTES = 2 << 20
"""Bytes of pieces a stream's writer holds while Redis works but lags (an upstream faster
than Redis) before the producer waits for it; while Redis fails, the stream's own size cap
bounds the backlog instead, and nobody waits."""
GIVE_UP_AFTER = 600.0
"""Seconds a writer keeps retrying an unreachable Redis before it drops its backlog."""
READER_PATIENCE = 10.0
"""Seconds of Redis trouble a reader waits through before its resume fails (503-like)."""

BELL = "tokenrelay:streams:bell"
STOPS = "tokenrelay:streams:stop"


def _keys(stream_id: str) -> tuple[str, str, str, str]:
    tag = f"tokenrelay:stream:{{{stream_id}}}"
    return f"{tag}:meta", f"{tag}:log", f"{tag}:lease", f"{tag}:readers"


# KEYS meta log lease readers; ARGV epoch first n ending lease_ms keep_ms done_ms id bell
# register owner model wire created pieces...
# register 1: the writer's first call registers the stream too (owner, model, wire, created;
# a stop that came before, by its owner, stays). A retry whose first try did register (its
# answer lost) finds its own epoch: registered already.
# lease_ms 0: no renewal in this call — the lease, the keys' expiry and the readers' check are
# renewed every RENEW, not with every batch, so a batch costs HMGET, its XADDs, HSET, PUBLISH.
_APPEND = """
if ARGV[10] == '1' then
  local reg = redis.call('HMGET', KEYS[1], 'epoch', 'stop', 'stop_by')
  if reg[1] ~= ARGV[1] then
    if reg[1] then return redis.error_reply('stream id taken') end
    if reg[2] and reg[3] ~= ARGV[11] then redis.call('HDEL', KEYS[1], 'stop') end
    redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'owner', ARGV[11], 'model', ARGV[12], 'wire', ARGV[13],
               'created', ARGV[14], 'last', 0)
  end
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'stop', 'last', 'ending')
local epoch, stop = meta[1], meta[2] or ''
if not epoch then return {-1, '', 0} end
if epoch ~= ARGV[1] then return {-2, stop, 0} end
local before = tonumber(meta[3])
local last = before
local first = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
if n > 0 and first > last + 1 then return redis.error_reply('gap: ' .. last .. ' then ' .. first) end
for i = 1, n do
  local seq = first + i - 1
  if seq > last then
    redis.call('XADD', KEYS[2], seq .. '-0', 'p', ARGV[14 + i])
    last = seq
  end
end
local readers = 0
if ARGV[4] ~= '' then
  if meta[4] then redis.call('HSET', KEYS[1], 'last', last)
  else redis.call('HSET', KEYS[1], 'last', last, 'ending', ARGV[4]) end
  redis.call('DEL', KEYS[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  redis.call('PUBLISH', ARGV[9], ARGV[8] .. ' end')
  return {last, stop, readers}
end
if last > before then redis.call('HSET', KEYS[1], 'last', last) end
if ARGV[5] ~= '0' then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
  readers = redis.call('EXISTS', KEYS[4])
elseif before == 0 and last > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[6])  -- the log was just made: a dead owner's still expires
end
if last > before then redis.call('PUBLISH', ARGV[9], ARGV[8] .. ' ' .. last) end
return {last, stop, readers}
"""

# KEYS meta; ARGV owner reason pending_ms id stops. {status, ending}: 'ended', 'pending',
# 'unregistered' (the stop waits for the stream), or 'not_found' (someone else's).
_STOP = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return {'not_found', ''} end
local ending = redis.call('HGET', KEYS[1], 'ending')
if ending then return {'ended', ending} end
if redis.call('HEXISTS', KEYS[1], 'stop') == 0 then
  redis.call('HSET', KEYS[1], 'stop', ARGV[2], 'stop_by', ARGV[1])
end
redis.call('PUBLISH', ARGV[5], ARGV[4])
if not owner then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'unregistered', ''}
end
return {'pending', ''}
"""

# KEYS meta log lease; ARGV ending done_ms id bell. Only a registered stream with no ending
# and no lease; the epoch changes, so the owner, were it alive after all, can write no more.
_LOST = """
local ending = redis.call('HGET', KEYS[1], 'ending')
if ending then return ending end
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then return false end
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
redis.call('HSET', KEYS[1], 'ending', ARGV[1], 'epoch', 'lost')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[3] .. ' end')
return ARGV[1]
"""

_TROUBLE = (RedisError, RedisClusterException, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class RemoteStream:
    """A stream another instance (or an ended one) writes: what a reader needs of it."""

    id: str
    owner: str | None
    model: str
    wire: str


def _owner_field(owner: str | None) -> str:
    return "" if owner is None else "key:" + owner


def _ending_json(ending: Ending) -> str:
    return orjson.dumps({"kind": ending.kind, "data": ending.data}).decode()


def _ending_of(raw: str | None) -> Ending | None:
    if not raw:
        return None
    value = orjson.loads(raw)
    return Ending(value["kind"], value["data"])


def _seq(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    """Redis trouble on a reader's or a stopper's request: 503, try again shortly."""
    try:
        yield
    except _TROUBLE as exc:
        raise ServiceUnavailable(f"the stream store (Redis) is unreachable: {exc}; try again",
                                 headers={"retry-after": "2"}) from None


class _Writer:
    """Writes one stream's pieces to Redis behind the producer, in batches, and renews its
    lease. Pieces wait here until Redis has them (bounded by the stream's own size cap), so
    an outage loses nothing and a retry duplicates nothing."""

    __slots__ = ("caught_up", "epoch", "ending", "failing", "first", "hurry", "pending", "pending_bytes",
                 "registered", "renewed", "sent_ending", "store", "stream", "task", "wake")

    def __init__(self, store: RedisStreams, stream: LiveStream) -> None:
        self.store, self.stream = store, stream
        self.epoch = secrets.token_hex(8)
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.failing = False
        self.caught_up: asyncio.Future[None] | None = None
        self.first = 1
        self.ending: Ending | None = None
        self.sent_ending = False
        self.wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.registered: asyncio.Future[None] = loop.create_future()
        """Done once Redis has the stream."""
        self.hurry: asyncio.Future[None] = loop.create_future()
        """Done to register at once rather than with the first batch (``published``)."""
        self.renewed = 0.0
        """When the lease was last renewed: the next batch after RENEW renews it again."""
        self.task = loop.create_task(self.run())

    def add(self, seq: int, text: str) -> None:
        if not self.pending:
            self.first = seq
        self.pending.append(text)
        self.pending_bytes += len(text)
        self.wake.set()

    def backlog(self) -> Awaitable[None] | None:
        if self.pending_bytes <= BACKLOG_BYTES or self.failing:
            return None
        if self.caught_up is None:
            self.caught_up = asyncio.get_running_loop().create_future()
        return asyncio.shield(self.caught_up)

    def _release(self) -> None:
        if self.caught_up is not None and (self.failing or self.pending_bytes <= BACKLOG_BYTES // 2):
            if not self.caught_up.done():
                self.caught_up.set_result(None)
            self.caught_up = None

    def finish(self, ending: Ending) -> None:
        self.ending = ending
        self.wake.set()

    async def run(self) -> None:
        store, stream = self.store, self.stream
        backoff, failing_since = 0.05, 0.0
        # The stream is registered with its first batch, a PACE after it opened: a short answer
        # is then one call in all. Until then another instance does not find it (a resume or
        # a stop there waits for it); ``published`` cuts the wait short for an id handed out
        # before any piece.
        await asyncio.wait((self.hurry,), timeout=PACE)
        try:
            while True:
                try:
                    # Nothing to write and the lease still fresh: no call at all.
                    if (not self.registered.done() or self.pending or self.ending is not None
                            or time.monotonic() - self.renewed >= RENEW):
                        done = await self.flush()
                        if not self.registered.done():
                            self.registered.set_result(None)
                        if done:
                            return
                    backoff, failing_since, self.failing = 0.05, 0.0, False
                except _TROUBLE as exc:
                    self.failing = True
                    self._release()
                    now = time.monotonic()
                    if not failing_since:
                        failing_since = now
                        log.warning("%s: Redis did not take the stream's pieces (%s); the client still gets "
                                    "them, and they are kept until Redis is back", stream.id, exc)
                    elif now - failing_since > GIVE_UP_AFTER:
                        log.error("%s: Redis unreachable for %g s; its resumable copy is given up",
                                  stream.id, GIVE_UP_AFTER)
                        return
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RENEW)
                    continue
                await asyncio.sleep(PACE)
                if self.pending or (self.ending is not None and not self.sent_ending):
                    continue
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RENEW):
                        await self.wake.wait()
        finally:
            self.failing = True
            self._release()
            store.writer_done(self)

    async def flush(self) -> bool:
        """One call: the pieces waiting, the ending if it came, the lease; True when done."""
        store, stream = self.store, self.stream
        count, size = 0, 0
        for piece in self.pending:  # at most about BATCH_BYTES a call: a large answer's batches stay small
            if count and size + len(piece) > BATCH_BYTES:
                break
            count += 1
            size += len(piece)
        ending = self.ending if count == len(self.pending) else None
        now = time.monotonic()
        renew = now - self.renewed >= RENEW
        args: list[str | int] = [self.epoch, self.first, count, _ending_json(ending) if ending else "",
                                 int(LEASE * 1000) if renew else 0, store.keep_ms, store.done_ms, stream.id, BELL]
        if self.registered.done():
            args += ("0", "", "", "", "")
        else:
            args += ("1", _owner_field(stream.owner), stream.model, stream.wire, f"{stream.created:.3f}")
        args.extend(self.pending[:count])
        last, stop, readers = await store.script_append(keys=_keys(stream.id), args=args)
        if last == -1:
            log.warning("%s: its record is gone from Redis (did Redis lose its data?); it can no longer be "
                        "resumed elsewhere", stream.id)
            return True
        if last == -2:
            # Another instance declared it lost (its lease ran out): it is not ours to write.
            store.stop_local(stream, "stream_lost")
            return True
        if renew:
            self.renewed = now
        del self.pending[:count]
        self.first += count
        self.pending_bytes -= size
        self._release()
        if stop:
            store.stop_local(stream, "stopped")
        if readers:
            stream.read_elsewhere_at = time.monotonic()
        if ending is not None and not self.pending:
            self.sent_ending = True
            return True
        return False


class _Hub:
    """This instance's readers of one stream, fed by one reader of Redis."""

    __slots__ = ("bell", "count", "ending", "failing_since", "final", "first", "lease_missing_since", "readers",
                 "ready", "ref", "store", "task", "touched", "waiters", "window", "window_bytes")

    def __init__(self, store: RedisStreams, ref: StreamRef) -> None:
        self.store, self.ref = store, ref
        self.window: list[str] = []
        self.window_bytes = 0
        self.count = 64
        """Entries per read: grows to ``BATCH`` for small pieces, shrinks for large ones."""
        self.first = 1
        self.ending: Ending | None = None
        self.final = 0
        self.readers = 0
        self.bell = asyncio.Event()
        self.ready = asyncio.Event()
        self.waiters: list[asyncio.Future[None]] = []
        self.failing_since = 0.0
        self.lease_missing_since = 0.0
        self.touched = 0.0
        self.task = asyncio.get_running_loop().create_task(self.run())

    @property
    def last(self) -> int:
        return self.first + len(self.window) - 1

    async def run(self) -> None:
        meta, log_key, lease, readers = _keys(self.ref.id)
        redis = self.store.redis
        while True:
            polled = False
            try:
                if not self.ready.is_set():
                    async with redis.pipeline(transaction=False) as pipe:
                        pipe.hmget(meta, ["ending", "last"])
                        pipe.xrevrange(log_key, "+", "-", count=self.count)
                        (ending, final), tail = await pipe.execute()
                    entries = list(reversed(tail))
                    self.first = _seq(entries[0][0]) if entries else 1
                    for _, fields in entries:
                        self.window.append(fields["p"])
                        self.window_bytes += len(fields["p"])
                    self._trim(len(entries))
                    self._end(ending, final)
                    self.ready.set()
                else:
                    polled = not self.bell.is_set()
                    self.bell.clear()
                    await self.fetch(meta, log_key, lease, polled)
                now = time.monotonic()
                if now - self.touched >= TOUCH:
                    self.touched = now
                    await redis.set(readers, 1, px=int(READERS_TTL * 1000))
                self.failing_since = 0.0
            except _TROUBLE as exc:
                now = time.monotonic()
                if not self.failing_since:
                    self.failing_since = now
                    log.warning("%s: reading it from Redis failed (%s); retrying", self.ref.id, exc)
            self._wake()
            if self.ending is not None and self.last >= self.final:
                return
            if not self.bell.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL if not self.failing_since else 0.2):
                        await self.bell.wait()
            await asyncio.sleep(PACE)

    async def fetch(self, meta: str, log_key: str, lease: str, polled: bool) -> None:
        redis = self.store.redis
        while True:
            # The ending first: it is written with the last pieces, so the range read after
            # it has them all.
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hmget(meta, ["ending", "last"])
                pipe.xrange(log_key, f"{self.last + 1}-0", "+", count=self.count)
                if polled:
                    pipe.exists(lease)
                (ending, final), entries, *has_lease = await pipe.execute()
            count = self.count
            for entry_id, fields in entries:
                if _seq(entry_id) == self.last + 1:
                    self.window.append(fields["p"])
                    self.window_bytes += len(fields["p"])
            self._trim(len(entries))
            self._end(ending, final)
            if len(entries) < count:
                break
        if self.ending is None and polled:
            await self.check_owner(bool(has_lease[0]))

    async def check_owner(self, has_lease: bool) -> None:
        """A running stream whose owner's lease ran out, and stayed out: its instance died.
        The stream gets its ending here, once, atomically: ``stream_lost``."""
        now = time.monotonic()
        if has_lease:
            self.lease_missing_since = 0.0
            return
        if not self.lease_missing_since:
            self.lease_missing_since = now
            return
        if now - self.lease_missing_since < LOST_CONFIRM:
            return
        lost = Ending("error", {"error": {"type": "stream_lost", "message":
                                          "the instance writing this answer stopped; the text so far is kept"}})
        meta, log_key, lease, _ = _keys(self.ref.id)
        raw = await self.store.script_lost(keys=[meta, log_key, lease],
                                           args=[_ending_json(lost), self.store.done_ms, self.ref.id, BELL])
        if raw:
            final = await self.store.redis.hget(meta, "last")
            self._end(raw, final)

    def _trim(self, read: int) -> None:
        """Keep the window within ``WINDOW`` pieces and ``WINDOW_BYTES``; size the next read."""
        window = self.window
        drop = 0
        while len(window) - drop > 1 and (len(window) - drop > WINDOW or self.window_bytes > WINDOW_BYTES):
            self.window_bytes -= len(window[drop])
            drop += 1
        if drop:
            del window[:drop]
            self.first += drop
        if read and window:
            average = max(1, self.window_bytes // len(window))
            self.count = max(1, min(BATCH, BATCH_BYTES // average))

    def _end(self, raw: str | None, final: str | int | None) -> None:
        if raw and self.ending is None:
            self.ending = _ending_of(raw)
            self.final = int(final or 0)

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)


class RedisStreams(Streams):
    label = "redis"

    def __init__(self, url: str, *, timeout: float, grace: float, ttl: float, max_bytes: int) -> None:
        super().__init__(grace=grace, ttl=ttl, max_bytes=max_bytes, memory_bytes=0)
        self.timeout = timeout
        retry = Retry(NoBackoff(), 0)  # the writer and the hubs retry on their own terms
        # Waiting for a free connection is queueing behind this instance's own calls, not Redis
        # being slow: it may take longer than one call may (a busy instance), and still ends.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=timeout * 5, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=retry, decode_responses=True, client_name=f"tokenrelay-streams-{os.getpid()}")
        # Any: redis-py's annotations mix its sync and async returns.
        self.redis: Any = aioredis.Redis(connection_pool=pool)
        # The subscription waits for messages as long as it likes; only connecting is bounded.
        self._bell_client: Any = aioredis.Redis.from_url(url, socket_connect_timeout=timeout, decode_responses=True,
                                                    client_name=f"tokenrelay-streams-bell-{os.getpid()}")
        self._url = url
        self.cluster = False
        self._use(self.redis)
        self.keep_ms = int((ttl + LEASE) * 1000)
        """A running stream's keys outlive a dead owner by the retention time, so its lost
        ending and its text stay readable."""
        self.done_ms = int(ttl * 1000)
        self._writers: dict[str, _Writer] = {}
        self._hubs: dict[str, _Hub] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = False
        self._trouble: str | None = None

    # --- the owner's side ---

    def open(self, *, owner: str | None, model: str, wire: str, grace: float | None = None) -> LiveStream:
        stream = super().open(owner=owner, model=model, wire=wire, grace=grace)
        writer = _Writer(self, stream)
        stream.log.tee = writer.add
        stream.log.backlog = writer.backlog
        self._writers[stream.id] = writer
        return stream

    async def published(self, stream: LiveStream) -> None:
        writer = self._writers.get(stream.id)
        if writer is None or writer.registered.done():
            return
        if not writer.hurry.done():
            writer.hurry.set_result(None)
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(writer.registered)
        except TimeoutError:
            # Degraded, not failed: the stream runs and this instance serves it; another
            # instance finds it once Redis has taken its registration.
            log.warning("%s: Redis did not register the stream within %g s; other instances find it "
                        "once it has", stream.id, self.timeout)

    def finished(self, stream: LiveStream, ending: Ending) -> None:
        self._ended(stream, ending)
        writer = self._writers.get(stream.id)
        if writer is not None:
            writer.finish(ending)
        else:
            self._streams.pop(stream.id, None)

    def writer_done(self, writer: _Writer) -> None:
        stream_id = writer.stream.id
        self._writers.pop(stream_id, None)
        if writer.stream.ended:  # Redis has it all: readers find it there
            self._streams.pop(stream_id, None)

    def stop_local(self, stream: LiveStream, reason: str) -> None:
        if stream.running:
            self._stop(stream, reason)

    def _give_up(self, stream: LiveStream) -> None:
        # A reader on another instance keeps it as a local one would.
        if stream.running and time.monotonic() - stream.read_elsewhere_at < READERS_TTL + RENEW:
            stream._grace_timer = asyncio.get_running_loop().call_later(RENEW, self._give_up, stream)
            return
        super()._give_up(stream)

    # --- readers ---

    async def find(self, stream_id: str, *, owner: str | None) -> StreamRef:
        local = self._streams.get(stream_id)
        if local is not None and local.owner == owner:
            return local
        meta = _keys(stream_id)[0]
        with _unavailable():
            epoch, stored_owner, model, wire = await self.redis.hmget(meta, ["epoch", "owner", "model", "wire"])
        if epoch is None or stored_owner != _owner_field(owner):
            raise NotFound(f"no stream {stream_id!r}: unknown, or it expired (TOKENRELAY_STREAM_TTL)")
        return RemoteStream(stream_id, owner, model, wire)

    @contextlib.asynccontextmanager
    async def reading(self, stream: StreamRef) -> AsyncIterator[None]:
        local = stream if isinstance(stream, LiveStream) else None
        hub = self._hubs.get(stream.id)
        if hub is None:
            hub = self._hubs[stream.id] = _Hub(self, stream)
        hub.readers += 1
        if local is not None:
            self.attach(local)
        try:
            yield
        finally:
            if local is not None:
                self.detach(local)
            hub.readers -= 1
            if hub.readers == 0:
                hub.task.cancel()
                if self._hubs.get(stream.id) is hub:
                    del self._hubs[stream.id]

    async def follow(self, stream: StreamRef, after: int = 0) -> AsyncIterator[tuple[int, str] | Ending]:
        hub = self._hubs[stream.id]
        await hub.ready.wait()
        seq = after
        while True:
            if seq + 1 < hub.first:  # behind the hub's window: the backlog, from Redis
                with _unavailable():
                    entries = await self.redis.xrange(_keys(stream.id)[1], f"{seq + 1}-0", f"{hub.first - 1}-0",
                                                      count=hub.count)
                if not entries:
                    raise ServiceUnavailable("the stream's pieces are gone from Redis (expired?)",
                                             headers={"retry-after": "2"})
                for entry_id, fields in entries:
                    seq = _seq(entry_id)
                    yield seq, fields["p"]
                continue
            if seq < hub.last:
                seq += 1
                yield seq, hub.window[seq - hub.first]  # in the window: checked just above
                continue
            if hub.ending is not None and seq >= hub.final:
                yield hub.ending
                return
            if hub.failing_since and time.monotonic() - hub.failing_since > READER_PATIENCE:
                raise ServiceUnavailable("the stream store (Redis) is unreachable; resume again later",
                                         headers={"retry-after": "2"})
            await hub.changed()

    async def snapshot(self, stream: StreamRef, *, offset: int = 0) -> Snapshot:
        meta, log_key, _, _ = _keys(stream.id)
        with _unavailable():
            raw = await self.redis.hget(meta, "ending")
            parts: list[bytes] = []
            seq = 0
            while True:
                entries = await self.redis.xrange(log_key, f"{seq + 1}-0", "+", count=BATCH)
                for entry_id, fields in entries:
                    seq = _seq(entry_id)
                    parts.append(fields["p"].encode())
                if len(entries) < BATCH:
                    break
        ending = stream.log.ending if isinstance(stream, LiveStream) and stream.log.ending else _ending_of(raw)
        return Snapshot(b"".join(parts)[offset:], seq, ending)

    # --- stop ---

    async def stop(self, stream: StreamRef, *, timeout: float = 1.0) -> bool:
        if isinstance(stream, LiveStream) and stream.id in self._streams:
            return await super().stop(stream, timeout=timeout)
        return await self.stop_id(stream.id, owner=stream.owner, timeout=timeout)

    async def stop_id(self, stream_id: str, *, owner: str | None, timeout: float = 1.0) -> bool:
        """Stop a stream by id wherever it runs, also one whose owner has not registered it
        yet (the stop waits for it in Redis); True once it has ended. ``NotFound`` for an id
        that is someone else's, or that nobody registered within ``timeout``."""
        local = self._streams.get(stream_id)
        if local is not None and local.owner == owner:
            return await super().stop(local, timeout=timeout)
        meta = _keys(stream_id)[0]
        with _unavailable():
            status, _ = await self.script_stop(keys=[meta], args=[_owner_field(owner), "stopped",
                                                                  PENDING_STOP_TTL, stream_id, STOPS])
        if status == "not_found":
            raise NotFound(f"no stream {stream_id!r}: unknown, or it expired (TOKENRELAY_STREAM_TTL)")
        if status == "ended":
            return True
        deadline = time.monotonic() + timeout
        registered = status == "pending"
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            with _unavailable():
                ending, epoch = await self.redis.hmget(meta, ["ending", "epoch"])
            registered = registered or epoch is not None
            if ending:
                return True
        if not registered:
            raise NotFound(f"no stream {stream_id!r}: unknown, or it expired (TOKENRELAY_STREAM_TTL); a stop "
                           "for it is kept for a minute in case it starts")
        return False

    # --- the subscription: doorbells and stops ---

    def _use(self, client: Any) -> None:
        self.redis = client
        self.script_append = client.register_script(_APPEND)
        self.script_stop = client.register_script(_STOP)
        self.script_lost = client.register_script(_LOST)

    async def start(self) -> None:
        """Subscribe; and on a Redis Cluster, talk to every node (each stream's keys share
        one slot, so every script and pipeline goes to one node)."""
        try:
            async with asyncio.timeout(self.timeout):
                info = await self.redis.info("cluster")
        except _TROUBLE as exc:
            log.warning("Redis unreachable at start-up (%s): streams are written there once it is back; a Redis "
                        "Cluster is recognised only at start-up", exc)
            info = {}
        if info.get("cluster_enabled"):
            single = self.redis
            # Per node; a cluster client fails rather than waits when they are all busy.
            self._use(RedisCluster.from_url(
                self._url, max_connections=POOL_SIZE * 4, socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout, decode_responses=True,
                client_name=f"tokenrelay-streams-{os.getpid()}"))
            self.cluster = True
            await single.aclose(close_connection_pool=True)
            log.info("streams: on a Redis Cluster")
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._bell_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(BELL, STOPS)
                if self._trouble is not None:
                    log.info("stream subscription back")
                self._subscribed, self._trouble, backoff = True, None, 0.1
                # Stops sent while we were away are durable: the next append or renewal of
                # each stream answers them within RENEW.
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL)
                    if message is not None:
                        self._dispatch(message["channel"], message["data"])
            except _TROUBLE as exc:
                if self._trouble is None:
                    log.warning("stream subscription lost (%s); reconnecting", exc)
                self._subscribed, self._trouble = False, str(exc) or type(exc).__name__
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(*_TROUBLE):
                    await pubsub.aclose()

    def _dispatch(self, channel: str, data: str) -> None:
        if channel == BELL:
            stream_id, _, seq = data.partition(" ")
            hub = self._hubs.get(stream_id)
            if hub is not None and (seq == "end" or int(seq) > hub.last):
                hub.bell.set()
        elif channel == STOPS:
            stream = self._streams.get(data)
            if stream is not None:
                self.stop_local(stream, "stopped")

    async def check(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                await self.redis.ping()
        except _TROUBLE as exc:
            return {"store": self.label, "status": "degraded",
                    "reason": f"Redis unreachable ({exc or type(exc).__name__}): resuming and stopping "
                              "from another instance answer 503; streams still stream"}
        if not self._subscribed:
            return {"store": self.label, "status": "degraded",
                    "reason": f"no stream subscription ({self._trouble}); stops arrive with the lease renewal"}
        return {"store": self.label, "status": "ok", "reason": None}

    async def aclose(self) -> None:
        await super().aclose()
        writers = [writer.task for writer in self._writers.values()]
        if writers:  # their last pieces and endings, if Redis takes them in time
            await asyncio.wait(writers, timeout=self.timeout * 2)
        for task in [*writers, *(hub.task for hub in self._hubs.values()),
                     *([self._listener] if self._listener else [])]:
            task.cancel()
        for task in [*writers, *([self._listener] if self._listener else [])]:
            with contextlib.suppress(asyncio.CancelledError, *_TROUBLE):
                await task
        with contextlib.suppress(*_TROUBLE):
            await self._bell_client.aclose()
        with contextlib.suppress(*_TROUBLE):
            if self.cluster:
                await self.redis.aclose()
            else:
                await self.redis.aclose(close_connection_pool=True)  # a pool passed in is not closed by default

