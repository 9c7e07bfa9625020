"""The load generator: asyncio + aiohttp, one event loop, every stream timed.

Per stream it records the time to the response headers (first byte), to the first token,
every gap between two reads that carried tokens, the total time, the tokens and whether it
failed. Token counting is per wire format (``Wire``) and cheap — ``bytes.count`` over whole
events — so the generator spends its CPU on the sockets, not on parsing.

Every run is bounded: a number of streams per worker and a deadline, after which open
streams are cancelled (their tokens so far still count toward throughput).
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

# --- wire formats: how to ask, and how to count tokens in what comes back ---------------


@dataclass(frozen=True)
class Wire:
    """How one kind of endpoint is asked and read.

    ``openai``: ``/v1/chat/completions`` SSE (a token is a chunk with non-empty content);
    ``responses``: ``/v1/responses`` SSE (a token is a ``response.output_text.delta`` event);
    ``tr-sse``: tokenrelay's SSE (a token is an ``id:`` event with ``{"text":…}``);
    ``text``: plain text (tokens are only known at the end: the expected count when the body
    arrived whole, with the expected length)."""

    name: str
    path: str
    accept: str

    def body(self, model: str, question: str) -> bytes:
        data: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": question}]}
        if self.name == "openai":
            data["stream"] = True
        elif self.name == "responses":
            data = {"model": model, "input": question, "stream": True}
        return orjson.dumps(data)


OPENAI = Wire("openai", "/v1/chat/completions", "text/event-stream")
RESPONSES = Wire("responses", "/v1/responses", "text/event-stream")
TR_SSE = Wire("tr-sse", "/api/get-response", "text/event-stream")
TEXT = Wire("text", "/api/get-response", "*/*")


class _Events:
    """Holds back an incomplete SSE event until the read that completes it arrives."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def _complete(self, chunk: bytes) -> bytes:
        """The complete events so far (without the last blank line); b"" when none."""
        buf = self._buf + chunk if self._buf else chunk
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._buf = buf
            return b""
        self._buf = buf[cut + 2:]
        return buf[:cut]


class _TokenEvents(_Events):
    """OpenAI SSE: counts chunks with non-empty content, whatever the read boundaries.
    ``feed`` returns tokens."""

    __slots__ = ()
    counts_tokens = True

    def feed(self, chunk: bytes) -> int:
        whole = self._complete(chunk)
        if not whole:
            return 0
        # The role chunk carries "content":"" and the finish chunk no content at all.
        n = whole.count(b'"content":"')
        return n - whole.count(b'"content":""') if n else 0


class _DeltaEvents(_Events):
    """The Responses API's SSE: counts ``response.output_text.delta`` events. ``feed`` returns tokens."""

    __slots__ = ()
    counts_tokens = True

    def feed(self, chunk: bytes) -> int:
        whole = self._complete(chunk)
        return whole.count(b"event: response.output_text.delta\n") if whole else 0


class _TextEvents(_Events):
    """tokenrelay's SSE: a piece may hold several tokens, so count the answer's bytes in the
    ``data: {"text":…}`` events. ``feed`` returns bytes of answer text."""

    __slots__ = ("size",)
    counts_tokens = False

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def feed(self, chunk: bytes) -> int:
        whole = self._complete(chunk)
        if not whole:
            return 0
        got = 0
        start = whole.find(b'data: {"text":')
        while start >= 0:
            end = whole.find(b"\n", start)
            line = whole[start + 6:end if end >= 0 else len(whole)]
            got += len(orjson.loads(line)["text"].encode())
            start = whole.find(b'data: {"text":', start + 14)
        self.size += got
        return got


class _TextBytes:
    """Plain text: every byte is answer. ``feed`` returns bytes of answer text."""

    __slots__ = ("size",)
    counts_tokens = False

    def __init__(self) -> None:
        self.size = 0

    def feed(self, chunk: bytes) -> int:
        self.size += len(chunk)
        return len(chunk)


def _counter(wire: Wire) -> _TokenEvents | _DeltaEvents | _TextEvents | _TextBytes:
    if wire.name == "openai":
        return _TokenEvents()
    if wire.name == "responses":
        return _DeltaEvents()
    if wire.name == "tr-sse":
        return _TextEvents()
    return _TextBytes()


# --- one stream -----------------------------------------------------------------------


@dataclass(slots=True)
class StreamResult:
    ok: bool = False
    status: int = 0
    ttfb: float | None = None  # seconds from request to response headers
    ttft: float | None = None  # seconds from request to the first read carrying a token
    total: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str | None = None
    started: float = 0.0


@dataclass(frozen=True)
class Target:
    """One thing to measure: a base URL and the wire it speaks."""

    name: str
    url: str
    wire: Wire
    headers: tuple[tuple[str, str], ...] = ()
    model_prefix: str = ""  # some gateways route on a prefix ("openai/…")
    option_sep: str = ","  # LiteLLM reads "a,b" as two models: the simulator also takes "a;b"


@dataclass(frozen=True)
class Ask:
    """What each stream asks the simulator for, and what should come back."""

    model: str  # e.g. "sim:ttft=0,tps=50,tokens=200"
    question: str
    tokens: int
    text_bytes: int  # the answer's length in UTF-8, to check plain text arrived whole


async def one_stream(session: aiohttp.ClientSession, target: Target, ask: Ask, *,
                     keep_gaps: bool = True, on_tokens: Callable[[int], None] | None = None,
                     slow_read: tuple[int, float] | None = None, result: StreamResult | None = None) -> StreamResult:
    """Run one stream to its end (or until cancelled) and time it, filling ``result``
    (given, it can be watched while the stream runs).

    ``slow_read=(n, pause)`` reads at most ``n`` bytes, then pauses ``pause`` seconds — a
    client slower than the model."""
    wire = target.wire
    counter = _counter(wire)
    if result is None:
        result = StreamResult()
    headers = {"content-type": "application/json", "accept": wire.accept, **dict(target.headers)}
    body = wire.body(target.model_prefix + ask.model.replace(",", target.option_sep), ask.question)
    t0 = result.started = time.perf_counter()
    last = 0.0
    try:
        async with session.post(target.url + wire.path, data=body, headers=headers) as resp:
            result.status = resp.status
            result.ttfb = time.perf_counter() - t0
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.read())[:120]!r}"
                return result
            content = resp.content
            while True:
                if slow_read is None:
                    chunk = await content.readany()
                else:
                    chunk = await content.read(slow_read[0])
                if not chunk:
                    break
                now = time.perf_counter()
                got = counter.feed(chunk)
                if got:
                    if result.ttft is None:
                        result.ttft = now - t0
                    elif keep_gaps:
                        result.gaps.append(now - last)
                    last = now
                    if counter.counts_tokens:
                        n = got
                    else:
                        # Text has no token boundaries: count the answer's share of its
                        # known length, so throughput windows see partial answers too.
                        n = counter.size * ask.tokens // max(ask.text_bytes, 1) - result.tokens
                    result.tokens += n
                    if on_tokens is not None and n:
                        on_tokens(n)
                if slow_read is not None:
                    await asyncio.sleep(slow_read[1])
        result.total = time.perf_counter() - t0
        if not counter.counts_tokens:
            if counter.size != ask.text_bytes:  # type: ignore[union-attr]
                result.error = f"answer of {counter.size} bytes, expected {ask.text_bytes}"  # type: ignore[union-attr]
                return result
        elif result.tokens != ask.tokens:
            result.error = f"{result.tokens} tokens, expected {ask.tokens}"
            return result
        result.ok = True
    except asyncio.CancelledError:
        result.error = "cancelled at the deadline"
        raise
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# --- many streams ---------------------------------------------------------------------


def make_session(*, timeout: float = 120.0, rcvbuf: int | None = None) -> aiohttp.ClientSession:
    extra: dict[str, Any] = {}
    if rcvbuf is not None:
        # A small receive window, so a slow reader pushes back on the server at once.
        extra["socket_factory"] = _small_rcvbuf_factory(rcvbuf)
    connector = aiohttp.TCPConnector(limit=0, family=socket.AF_INET, ttl_dns_cache=None, **extra)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=30),
        auto_decompress=False,
        read_bufsize=2**16,
    )


def _small_rcvbuf_factory(size: int) -> Callable[[Any], socket.socket]:
    def factory(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        return sock
    return factory


@dataclass
class RunResult:
    streams: list[StreamResult]
    elapsed: float  # seconds from the first start to the end (or the deadline)
    tokens: int  # every token received, from finished and cut-off streams alike

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


async def run_streams(target: Target, ask: Ask, *, concurrency: int, per_worker: int = 1,
                      starts: Sequence[float] | None = None,
                      deadline: float | None = None, keep_gaps: bool = True,
                      session: aiohttp.ClientSession | None = None,
                      slow_read: tuple[int, float] | None = None,
                      during: Callable[[], Awaitable[None]] | None = None) -> RunResult:
    """``concurrency`` workers, each running ``per_worker`` streams back to back; worker i
    starts ``starts[i]`` seconds in (all at once without ``starts``). At ``deadline`` seconds
    every open stream is cancelled. ``during`` runs alongside (e.g. sampling the relay's memory)."""
    own = session is None
    session = session or make_session()
    results: list[StreamResult] = []
    received = 0

    def count(n: int) -> None:
        nonlocal received
        received += n

    async def worker(i: int) -> None:
        if starts is not None and starts[i]:
            await asyncio.sleep(starts[i])
        for _ in range(per_worker):
            result = StreamResult()
            try:
                result = await one_stream(session, target, ask, keep_gaps=keep_gaps, on_tokens=count,
                                          slow_read=slow_read)
            finally:
                results.append(result)

    start = time.perf_counter()
    try:
        tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
        side = asyncio.ensure_future(during()) if during is not None else None
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        elapsed = time.perf_counter() - start
        tokens_at_end = received
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if side is not None:
            side.cancel()
            await asyncio.gather(side, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        if own:
            await session.close()
    return RunResult(streams=results, elapsed=elapsed, tokens=tokens_at_end)


# --- statistics -----------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def summarize(run: RunResult) -> dict[str, Any]:
    """The figures of one run, in milliseconds and tokens per second."""
    ok = [s for s in run.streams if s.ok]
    ttft = [s.ttft for s in run.streams if s.ttft is not None]
    ttfb = [s.ttfb for s in run.streams if s.ttfb is not None]
    gaps = [g for s in run.streams for g in s.gaps]
    errors = [s.error for s in run.streams if s.error and s.error != "cancelled at the deadline"]
    return {
        "streams": len(run.streams),
        "completed": len(ok),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "tokens": run.tokens,
        "elapsed_s": round(run.elapsed, 3),
        "tokens_per_s": round(run.tokens_per_s, 1),
        "ttfb_ms": {"p50": ms(percentile(ttfb, 50)), "p99": ms(percentile(ttfb, 99))},
        "ttft_ms": {"p50": ms(percentile(ttft, 50)), "p90": ms(percentile(ttft, 90)),
                    "p99": ms(percentile(ttft, 99)), "max": ms(max(ttft) if ttft else None)},
        "gap_ms": {"p50": ms(percentile(gaps, 50)), "p99": ms(percentile(gaps, 99)),
                   "max": ms(max(gaps) if gaps else None)},
        "total_s": {"p50": _r(percentile([s.total for s in ok if s.total], 50)),
                    "max": _r(max((s.total for s in ok if s.total), default=None))},
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
