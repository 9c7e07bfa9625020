"""``Streams``: this instance's streamed answers, while they run and for a while after.

A stream is found by its id, which is a capability (128 bits from ``secrets``): with client
keys, only the key that created a stream finds it — to anyone else it does not exist (404,
never 403, which would confirm it). Each stream counts its readers: the connection that asked
and any that came back. When the last one leaves, a running answer is given ``grace``
seconds for a reader to return (a reload, a network switch) before its upstream request is
closed; a stream that nobody asked to keep (``grace`` 0) stops at once, as a plain relay does.

A finished stream stays readable for ``ttl`` seconds; all finished streams together keep at
most ``memory_bytes`` of text, the oldest given up first. A running stream is never given up
here: its own size cap (``StreamLog.max_bytes``) bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from ..errors import NotFound
from .log import Ending, StreamLog

log = logging.getLogger("tokenrelay.resume")

SWEEP_SECONDS = 15.0


def new_stream_id() -> str:
    """A stream's id: 128 bits from the system's randomness, since holding it lets one read
    and stop the answer."""
    return "st_" + secrets.token_hex(16)


class StreamRef(Protocol):
    """What a reader knows of a stream, wherever it runs: a ``LiveStream`` of this process,
    or one another instance writes into Redis (``resume.redis``). Its pieces are opaque
    strings, encoded by the wire named ``wire``."""

    @property
    def id(self) -> str: ...

    @property
    def owner(self) -> str | None: ...

    @property
    def model(self) -> str: ...

    @property
    def wire(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A stream as it is now: its pieces joined (from a byte offset), how many, and its ending."""

    text: bytes
    last_seq: int
    ending: Ending | None


@dataclass(eq=False, slots=True)
class LiveStream:
    id: str
    owner: str | None
    """The name of the client key that created it (None without client keys)."""
    model: str
    wire: str
    log: StreamLog
    grace: float
    created: float = field(default_factory=time.time)
    readers: int = 0
    stopper: Callable[[str], None] | None = None
    """Stops the running answer (its upstream request too) with an outcome; None once it ended."""
    stop_reason: str | None = None
    read_elsewhere_at: float = 0.0
    """When a reader on another instance was last seen (monotonic; Redis only)."""
    _grace_timer: asyncio.TimerHandle | None = None
    _end_waiters: list[asyncio.Future[None]] | None = None
    """Made only when someone waits for the end (a stop): most streams never need one."""

    @property
    def running(self) -> bool:
        return self.stopper is not None

    @property
    def ended(self) -> bool:
        return self.log.ending is not None

    async def wait_ended(self) -> None:
        if self.ended:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._end_waiters is None:
            self._end_waiters = []
        self._end_waiters.append(waiter)
        await waiter


class Streams:
    """The streams of one process, in its memory; ``resume.redis.RedisStreams`` is the same
    API with the streams in Redis, for several instances."""

    label = "memory"

    def __init__(self, *, grace: float, ttl: float, max_bytes: int, memory_bytes: int,
                 other_processes: bool = False) -> None:
        self.grace = grace
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.other_processes = other_processes
        """Other serve processes hold streams this one cannot see: a miss says so."""
        self._streams: dict[str, LiveStream] = {}
        self._finished: OrderedDict[str, LiveStream] = OrderedDict()
        self._finished_bytes = 0
        self._sweeper: asyncio.Task[None] | None = None

    # --- the producer's side ---

    def open(self, *, owner: str | None, model: str, wire: str, grace: float | None = None) -> LiveStream:
        stream = LiveStream(new_stream_id(), owner, model, wire, StreamLog(max_bytes=self.max_bytes),
                            self.grace if grace is None else grace, readers=1)
        self._streams[stream.id] = stream
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return stream

    async def published(self, stream: LiveStream) -> None:
        """Return once every instance can find ``stream``: before its id is handed to a client
        that may use it elsewhere at once (a background response). In memory: already."""

    def finished(self, stream: LiveStream, ending: Ending) -> None:
        """The answer ended, however: it stays readable for ``ttl``."""
        self._ended(stream, ending)
        if stream.id in self._streams and stream.id not in self._finished:
            self._finished[stream.id] = stream
            self._finished_bytes += stream.log.size
            self._trim()

    def _ended(self, stream: LiveStream, ending: Ending) -> None:
        stream.log.end(ending)
        stream.stopper = None
        if stream._grace_timer is not None:
            stream._grace_timer.cancel()
            stream._grace_timer = None
        for waiter in stream._end_waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        stream._end_waiters = None

    # --- readers ---

    def get(self, stream_id: str, *, owner: str | None) -> LiveStream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.owner != owner:
            if self.other_processes:
                raise NotFound(f"no stream {stream_id!r} here: it is unknown, expired, or kept by another "
                               "serve process — resuming across 'serve --workers' needs TOKENRELAY_REDIS_URL")
            raise NotFound(f"no stream {stream_id!r}: unknown, or it expired (TOKENRELAY_STREAM_TTL)")
        return stream

    async def find(self, stream_id: str, *, owner: str | None) -> StreamRef:
        """The stream ``stream_id`` of ``owner``, wherever it runs; ``NotFound`` if none."""
        return self.get(stream_id, owner=owner)

    @contextlib.asynccontextmanager
    async def reading(self, stream: StreamRef) -> AsyncIterator[None]:
        """A reader is attached for the block: the answer is not given up meanwhile."""
        assert isinstance(stream, LiveStream)
        self.attach(stream)
        try:
            yield
        finally:
            self.detach(stream)

    def follow(self, stream: StreamRef, after: int = 0) -> AsyncIterator[tuple[int, str] | Ending]:
        """Every piece after ``after``, as it comes, then the ending (inside ``reading``)."""
        assert isinstance(stream, LiveStream)
        return stream.log.follow(after)

    async def snapshot(self, stream: StreamRef, *, offset: int = 0) -> Snapshot:
        assert isinstance(stream, LiveStream)
        log = stream.log
        return Snapshot(log.text(offset), log.last_seq, log.ending)

    async def pieces(self, stream: StreamRef) -> tuple[list[str], Ending | None]:
        """Every piece logged until now, without waiting for more, and the ending if there is
        one: for the wires whose pieces are events rather than text (a status rebuilt from them)."""
        now = await self.snapshot(stream)
        pieces: list[str] = []
        if now.last_seq:
            events = cast(AsyncGenerator[tuple[int, str] | Ending, None], self.follow(stream, 0))
            async with self.reading(stream), contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Ending):
                        break
                    pieces.append(event[1])
                    if event[0] >= now.last_seq:
                        break
        return pieces, now.ending

    async def start(self) -> None:
        """Ready to serve (with Redis: its subscription); nothing to do in memory."""

    async def check(self) -> dict[str, Any]:
        """How the streams are kept, for ``/readyz``."""
        return {"store": self.label, "status": "ok", "reason": None}

    def attach(self, stream: LiveStream) -> None:
        stream.readers += 1
        if stream._grace_timer is not None:
            stream._grace_timer.cancel()
            stream._grace_timer = None

    def detach(self, stream: LiveStream) -> None:
        stream.readers -= 1
        if stream.readers > 0 or not stream.running:
            return
        if stream.grace <= 0:
            self._stop(stream, "client_cancelled")
        else:
            stream._grace_timer = asyncio.get_running_loop().call_later(
                stream.grace, self._give_up, stream)

    def _give_up(self, stream: LiveStream) -> None:
        stream._grace_timer = None
        if stream.readers == 0 and stream.running:
            log.info("%s: nobody read it for %g s; its upstream request is closed", stream.id, stream.grace)
            self._stop(stream, "abandoned")

    # --- stop ---

    async def stop_id(self, stream_id: str, *, owner: str | None, timeout: float = 1.0) -> bool:
        """``stop`` by id (``NotFound`` as ``find``); True once it has ended."""
        return await self.stop(await self.find(stream_id, owner=owner), timeout=timeout)

    async def stop(self, stream: StreamRef, *, timeout: float = 1.0) -> bool:
        """Stop a running answer; True once it has ended (its upstream request closed)."""
        assert isinstance(stream, LiveStream)
        if stream.running:
            self._stop(stream, "stopped")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await stream.wait_ended()
        return stream.ended

    @staticmethod
    def _stop(stream: LiveStream, reason: str) -> None:
        if stream.stopper is not None and stream.stop_reason is None:
            stream.stop_reason = reason
            stream.stopper(reason)

    # --- retention ---

    def _trim(self) -> None:
        while self._finished_bytes > self.memory_bytes and len(self._finished) > 1:
            self._forget(next(iter(self._finished)))

    def _forget(self, stream_id: str) -> None:
        stream = self._finished.pop(stream_id, None)
        if stream is not None:
            self._finished_bytes -= stream.log.size
            self._streams.pop(stream_id, None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            cutoff = time.monotonic() - self.ttl
            for stream_id, stream in list(self._finished.items()):
                finished_at = stream.log.finished_at
                if finished_at is None or finished_at > cutoff:
                    break  # in order of finishing: the rest are younger
                self._forget(stream_id)

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for stream in list(self._streams.values()):
            self._stop(stream, "shutdown")
