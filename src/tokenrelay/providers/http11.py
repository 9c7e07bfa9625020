"""A small HTTP/1.1 client for the upstream hop: keep-alive connections on asyncio, with
llhttp (through ``httptools``, the parser uvicorn serves tokenrelay with) parsing responses.

Written for one job — send a request, read a streamed answer piece by piece, keep the
connection for the next request — because on the relay's hot path the general clients cost
more than everything else tokenrelay does per request: aiohttp 188 µs of CPU per request,
this 103 µs (docs/performance.md). What it leaves out on purpose: redirects,
cookies, proxies (``make_client`` gives an upstream behind one to aiohttp), HTTP/2 and
``Expect``. Interim 1xx responses are skipped; a gzip or deflate body, sent although
``identity`` was asked for, is decoded.

``Pool`` is a ``transport.Transport``: ``Pool.request`` returns a ``Connection`` (an
``Exchange``) whose response headers have arrived; the caller reads the body with ``read``
and hands the connection back with ``release``, which keeps it for reuse if the answer was
read to its end, and closes it otherwise — closing is how an upstream learns that nobody is
waiting for the rest. Idle connections are closed after ``idle_keep`` seconds.

The pool keeps one spare connection ready per host (``spare``, as Envoy's "preconnect"):
a request that takes the last idle connection, or finds none, has another opened in the
background, so the next one starts without waiting for the TCP (and TLS) handshake — a
burst of new streams would otherwise pay it on each one's time to first token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
import zlib
from collections.abc import Mapping
from typing import Any, cast

import aiohappyeyeballs
import httptools
from yarl import URL

from .transport import (
    CHECKED_NAMES,
    BadResponse,
    ConnectionLost,
    RequestUnanswered,
    ConnectTimeout,
    Decoder,
    HeadTooLarge,
    InvalidHeader,
    MAX_RESPONSE_HEAD,
    WriteTimeout,
    check_header,
    decoder_for,
)

log = logging.getLogger("tokenrelay.upstream")

Key = tuple[str, str, int]
"""Where a connection goes: scheme, host, port."""

READ_HIGH_WATER = 64 * 1024
"""Body bytes buffered unread before the socket stops being read: a slow client then slows
the upstream down through TCP, instead of tokenrelay buffering the whole answer."""
READ_LOW_WATER = 16 * 1024
IDLE_KEEP = 15.0
"""Seconds an idle connection is kept for reuse."""
HAPPY_EYEBALLS_DELAY = 0.25
"""Seconds before the next address of a host is tried while one is still connecting (RFC
8305's recommended value): an IPv6 address that swallows packets costs a quarter of a
second, not the whole connect timeout."""
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE"))

__all__ = ["BadResponse", "Connection", "ConnectionLost", "InvalidHeader", "Pool"]


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, pool: Pool, key: Key) -> None:
        self._pool = pool
        self.key = key
        self.in_use = False
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._paused = False  # reading paused while too much body waits unread
        self.closed = False
        self.idle_since = 0.0
        self._write_timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        """Ready for the next request. Body bytes still unread (an answer that arrived whole
        but whose reader left) are dropped, and reading resumes if they had paused it, or
        the next answer would never be read."""
        self._resume_reading()
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.complete = False
        self._interim = False  # parsing a 1xx response, which precedes the real one
        self._decoder: Decoder | None = None
        self.received = False  # any byte of this request's response
        self._head_size = 0  # bytes fed to the parser while the headers had not all arrived
        self._keep_alive = False
        self._stray = False  # bytes after the answer, which nobody asked for
        self._until_close = False
        self._error: BaseException | None = None
        self._body: list[bytes] = []  # a list, not a deque: 56 bytes empty, not 624, on every connection
        self._buffered = 0
        self._headers_arrived: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"not an HTTP/1.1 response: {exc}"))
            self.close()
            return
        if not self.status and not self.closed:
            # Still in the head: the parser keeps it until it ends, so it is bounded here
            # (to the cap plus one read), not when it ends — if it ever does.
            self._head_size += len(data)
            if self._head_size > MAX_RESPONSE_HEAD:
                self.abort(HeadTooLarge(f"the upstream's response headers are larger than {MAX_RESPONSE_HEAD // 1024} KiB"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_write_timer()
        self._pool.forget(self)
        if self.status and self._until_close and exc is None and not self.complete:
            self.on_message_complete()  # a body that ends where the connection does
        elif not self.complete:
            reason = f": {exc}" if exc else ""
            self._fail(ConnectionLost(f"the upstream closed the connection{reason}"))

    def pause_writing(self) -> None:
        # A request is written whole, once; the transport keeps what the socket has not
        # taken yet. An upstream that stops taking it for ``write_timeout`` seconds is not
        # reading: the request fails then, rather than when the first-byte timeout ends.
        if self._write_timer is None and not self.status:
            self._write_timer = self._loop.call_later(self._pool.write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        self._stop_write_timer()

    def _write_stalled(self) -> None:
        self._write_timer = None
        if not self.status:
            self.abort(WriteTimeout(f"the upstream took no part of the request for {self._pool.write_timeout:g} s"))

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self.complete:
            # A second response to one request (a server's "408" after the answer): ignored,
            # and the connection is not kept, since its next bytes cannot be trusted to
            # answer the next request.
            self._stray = True
            self._keep_alive = False

    def on_status(self, status: bytes) -> None:
        if not self._stray:
            self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._stray:
            # transport.join_header, inlined: this runs for every header of every answer
            key = name.decode("latin-1").lower()
            headers = self.headers
            if key in headers:
                headers[key] += ", " + value.decode("latin-1")
            else:
                headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._stray:
            return
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:  # nothing was asked to be upgraded
                self._fail(BadResponse("the upstream answered 101 Switching Protocols"))
                self.close()
                return
            # 100 Continue, 103 Early Hints…: the answer follows on the same connection.
            self._interim = True
            self.reason = ""
            self.headers = {}
            return
        self.status = status
        headers = self.headers
        self._keep_alive = self._parser.should_keep_alive()
        self._until_close = "content-length" not in headers and "transfer-encoding" not in headers
        encoding = headers.get("content-encoding")
        if encoding is not None:
            self._decoder = decoder_for(encoding)
            if self._decoder is not None:  # the body is handed on decoded
                del headers["content-encoding"]
                headers.pop("content-length", None)
        self._wake_headers()

    def on_body(self, body: bytes) -> None:
        if self._stray:
            return
        if self._decoder is not None:
            body = self._decode(body)
            if not body:
                return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._stray:
            return
        if self._interim:
            self._interim = False
            return
        if self._decoder is not None:
            self._flush_decoder()
        self.complete = True
        self._wake_headers()
        self._wake()

    def _flush_decoder(self) -> None:
        assert self._decoder is not None
        try:
            rest = self._decoder.flush()
        except zlib.error as exc:
            self._fail(BadResponse(f"the upstream's compressed body is corrupt: {exc}"))
            return
        if rest:
            self._body.append(rest)
            self._buffered += len(rest)

    def _decode(self, body: bytes) -> bytes:
        assert self._decoder is not None
        try:
            return self._decoder.decompress(body)
        except zlib.error as exc:
            self._decoder = None
            self._fail(BadResponse(f"the upstream's compressed body is corrupt: {exc}"))
            self.close()
            return b""

    # --- used by the pool and the response ---

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._headers_arrived = self._loop.create_future()
        self.transport.write(data)

    async def response_headers(self) -> None:
        if not self.status:
            if self._error is not None:
                raise self._error
            assert self._headers_arrived is not None
            await self._headers_arrived
        if self._error is not None and not self.status:
            raise self._error

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call; ``b""`` once it has all been read.

        Everything buffered is taken at once, so bytes for the next call can only arrive
        through ``data_received``, in a turn of the event loop: a reader never takes two
        pieces without the loop having run in between, however fast the upstream writes
        (the relay relies on it, ``providers.base.Provider``)."""
        body = self._body
        while not body:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(body) == 1:
            data = body.pop()
        else:
            data = b"".join(body)
            body.clear()
        self._buffered = 0
        self._resume_reading()
        return data

    def _resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def abort(self, exc: BaseException) -> None:
        """Make the pending (or next) ``read`` raise ``exc``; the connection is not reused."""
        self._fail(exc)
        self.close()

    def release(self) -> None:
        """The caller is done: keep the connection if its answer ended cleanly, else close it."""
        if not self.in_use:
            return
        self.in_use = False
        if self.complete and self._keep_alive and self._error is None and not self.closed:
            self._reset()
            self._pool.keep(self)
        else:
            self.close()
        self._pool.slot_free()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self._stop_write_timer()
        self._pool.forget(self)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake_headers()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_headers(self) -> None:
        waiter = self._headers_arrived
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Pool:
    """Keep-alive connections to the hosts of one upstream: at most ``size`` requests at a
    time (more wait for a turn), and about as many connections open, plus one spare per
    host when ``spare`` is on (see the module docstring)."""

    name = "fast"

    def __init__(self, *, size: int, connect_timeout: float, write_timeout: float | None = None,
                 spare: bool = True, idle_keep: float = IDLE_KEEP, ssl_context: ssl.SSLContext | None = None) -> None:
        self.size = size
        self.spare = spare
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout or connect_timeout
        self.idle_keep = idle_keep
        self._reaper: asyncio.TimerHandle | None = None
        # Idle connections per host, oldest first (a dict is an ordered set that can also
        # drop a connection the upstream closed while it waited).
        self._idle: dict[Key, dict[Connection, None]] = {}
        self._open: set[Connection] = set()
        self._slots: asyncio.Semaphore | None = None  # made in the event loop, on first use
        self._ssl = ssl_context
        self._spares_opening: dict[Key, asyncio.Task[None]] = {}
        self._closed = False

    async def request(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None) -> Connection:
        """Send the request and wait for the response headers; the caller must ``release``
        the connection.

        A kept connection can be closed by the upstream just as a request goes out on it.
        One found closed before the request was written is passed over. One that drops
        after it, before any byte of answer, is replaced by a new one, once — for an
        idempotent method only: a POST may have reached the upstream and started a
        generation, which the caller must not pay for twice (what aiohttp and httpx do too)."""
        data = _head(method, url, headers, body) + (body or b"")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        await self._slots.acquire()
        key = _key(url)
        connect_timeout = self.connect_timeout
        try:
            conn, reused = await self._connection(key, connect_timeout)
            self._ready_spare(key, connect_timeout)
            try:
                await _exchange(conn, data)
            except RequestUnanswered:
                if not reused:
                    raise
                if method not in IDEMPOTENT:
                    raise RequestUnanswered("the upstream closed a kept connection as the request arrived; "
                                            "not sent again, as the upstream may have started on it") from None
                conn, _ = await self._connection(key, connect_timeout)
                await _exchange(conn, data)
        except BaseException:
            self._slots.release()
            raise
        conn.in_use = True
        return conn

    def slot_free(self) -> None:
        assert self._slots is not None
        self._slots.release()

    async def _connection(self, key: Key, connect_timeout: float) -> tuple[Connection, bool]:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn, _ = idle.popitem()  # the most recently used: the least likely to have been closed
            # Bytes that came while it sat idle (a server's "408" before it hangs up) would
            # be read as the next request's answer.
            if (not conn.closed and not conn.received and now - conn.idle_since < self.idle_keep
                    and conn.transport is not None and not conn.transport.is_closing()):
                return conn, True
            conn.close()
        if len(self._open) >= self.size:
            self._close_oldest_idle()
        return await self._connect(key, connect_timeout), False

    async def _connect(self, key: Key, connect_timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        ssl_context = self._ssl_context() if key[0] == "https" else None
        try:
            async with asyncio.timeout(connect_timeout):
                # Happy Eyeballs by aiohappyeyeballs (aiohttp's own): uvloop's
                # create_connection has no happy_eyeballs_delay.
                sock = await aiohappyeyeballs.start_connection(await _resolve(loop, key[1], key[2]),
                                                               happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                                                               interleave=1)
                try:
                    transport, conn = await loop.create_connection(
                        lambda: Connection(self, key), sock=sock, ssl=ssl_context,
                        server_hostname=key[1] if ssl_context else None)
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {key[1]} port {key[2]} within {connect_timeout:g} s") from None
        conn.transport = transport  # uvloop calls connection_made a moment later
        self._open.add(conn)
        return conn

    def _ready_spare(self, key: Key, connect_timeout: float) -> None:
        """Open a spare connection to ``key`` in the background if none is idle, one is not
        already on its way, and the pool has room. Only after a request got its connection:
        an upstream that cannot be reached is found out, and reported, by requests alone."""
        if (not self.spare or self._closed or self._idle.get(key) or key in self._spares_opening
                or len(self._open) >= self.size):
            return
        self._spares_opening[key] = asyncio.get_running_loop().create_task(self._open_spare(key, connect_timeout))

    async def _open_spare(self, key: Key, connect_timeout: float) -> None:
        try:
            conn = await self._connect(key, connect_timeout)
        except (OSError, ConnectTimeout) as exc:  # refused or unreachable; ssl.SSLError is an OSError too
            # No request waits for it; the next one that needs a connection opens its own.
            log.debug("spare connection to %s:%s not opened: %s", key[1], key[2], exc)
            return
        finally:
            del self._spares_opening[key]
        if self._closed:
            conn.close()
        else:
            self.keep(conn)

    def keep(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, {})[conn] = None
        if self._reaper is None and not self._closed:
            self._reaper = asyncio.get_running_loop().call_later(self.idle_keep, self._reap)

    def _reap(self) -> None:
        """Close the connections idle for ``idle_keep`` seconds: an upstream (or a NAT on the
        way) forgets a silent connection sooner or later, and an idle one holds a socket on
        both ends. One timer per pool, armed while any connection is idle."""
        self._reaper = None
        now = time.monotonic()
        oldest = now
        for idle in list(self._idle.values()):
            for conn in list(idle):
                if now - conn.idle_since >= self.idle_keep:
                    conn.close()
                else:
                    oldest = min(oldest, conn.idle_since)
        if any(self._idle.values()) and not self._closed:
            self._reaper = asyncio.get_running_loop().call_later(max(oldest + self.idle_keep - now, 0.01), self._reap)

    def forget(self, conn: Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle:
            idle.pop(conn, None)

    def _close_oldest_idle(self) -> None:
        oldest = [next(iter(idle)) for idle in self._idle.values() if idle]
        if oldest:
            min(oldest, key=lambda conn: conn.idle_since).close()

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for task in self._spares_opening.values():
            task.cancel()
        for conn in list(self._open):
            conn.close()
        self._idle.clear()


def _key(url: URL) -> Key:
    return url.scheme, url.raw_host or "", url.port or (443 if url.scheme == "https" else 80)


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[AddrInfo]:
    """The host's addresses, in the resolver's order; an address literal without a lookup."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"{host} has no address") from None
        return [(int(i[0]), int(i[1]), i[2], i[3], i[4]) for i in infos]
    if ip.version == 6:
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


async def _exchange(conn: Connection, data: bytes) -> None:
    """Send a request on ``conn`` and wait for its response headers; a connection that
    failed or was given up on meanwhile is closed."""
    try:
        conn.send(data)
        try:
            await conn.response_headers()
        except ConnectionLost as exc:
            if conn.received:
                raise
            raise RequestUnanswered(str(exc)) from None
    except BaseException:
        conn.close()
        raise


def _head(method: str, url: URL, headers: Mapping[str, str], body: bytes | None) -> bytes:
    host = url.raw_host or ""
    if ":" in host:  # an IPv6 address: "[::1]:8080", not "::1:8080"
        host = f"[{host}]"
    if url.port is not None and not url.is_default_port():
        host = f"{host}:{url.port}"
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"host: {host}"]
    for name, value in headers.items():
        # check_header's test, inlined for the common case (a known name, a clean value)
        if name not in CHECKED_NAMES or "\r" in value or "\n" in value or "\0" in value:
            check_header(name, value)
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

