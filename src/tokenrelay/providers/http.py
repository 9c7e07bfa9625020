"""The upstream hop both HTTP providers share: a pool of keep-alive connections per upstream.

``UpstreamClient.post_stream`` returns once the upstream answered 200. A refusal (any other
status, read and closed with the upstream's own reason) or an unreachable upstream is raised
as the matching ``UpstreamError`` — before tokenrelay has written a byte, so it can still be
an honest status code. Iterating the ``UpstreamResponse`` then yields the body as it arrives, one
piece per network read, and raises ``UpstreamTimeout`` after ``read_timeout`` seconds of
silence or ``UpstreamUnavailable`` if the upstream hangs up mid-answer.

The connections are ``http11``'s: on the relay's hot path, a general HTTP client cost more
CPU per request than the rest of tokenrelay together (docs/performance.md). Silence is
watched by one timer per response that re-arms only when it fires, rather than a timer
re-armed on every read — the top frame of a profile with thousands of open streams.
"""

from __future__ import annotations

import asyncio
import orjson
from yarl import URL

from ..errors import UpstreamTimeout, UpstreamUnavailable
from .base import error_for_status
from .http11 import BadResponse, Connection, ConnectionLost, Pool

# Compressed SSE would be held back by the decompressor; ask for it plain.
SSE_REQUEST_HEADERS = {
    "content-type": "application/json",
    "accept": "text/event-stream",
    "accept-encoding": "identity",
}

ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of a refusal's body read for its reason; the rest is dropped with the connection."""


class UpstreamClient:
    """A pool of keep-alive connections to one upstream."""

    def __init__(self, *, pool_size: int, connect_timeout: float, read_timeout: float,
                 spare_connection: bool = True) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._pool = Pool(size=pool_size, spare=spare_connection)

    async def post_stream(self, url: URL, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """The response once its status is 200; the caller reads it and must ``close`` it."""
        conn = await self._send("POST", url, headers, body, self.read_timeout)
        if conn.status != 200:
            status, reason, retry_after = conn.status, conn.reason.strip(), conn.headers.get("retry-after")
            try:
                raw = await _read_some(conn, ERROR_BODY_LIMIT, self.read_timeout)
            finally:
                if not conn.complete:  # the rest of a long refusal is not read: not reusable
                    conn.abort(ConnectionLost("refusal not read to its end"))
                conn.release()
            raise error_for_status(status, upstream_reason(raw) or reason, retry_after=retry_after)
        return UpstreamResponse(conn, self.read_timeout)

    async def get(self, url: URL, headers: dict[str, str], *, timeout: float) -> tuple[int, bytes]:
        """A short request answered as a whole (``GET /models``): its status and body."""
        conn = await self._send("GET", url, headers, None, timeout)
        status = conn.status
        try:
            return status, await _read_some(conn, 1 << 20, timeout)
        finally:
            conn.release()

    async def _send(self, method: str, url: URL, headers: dict[str, str], body: bytes | None,
                    timeout: float) -> Connection:
        try:
            async with asyncio.timeout(timeout):  # until the status line and headers
                return await self._pool.request(method, url, headers, body, connect_timeout=self.connect_timeout)
        except TimeoutError:  # the connect timeout is one too
            raise UpstreamTimeout("upstream did not answer in time") from None
        except (OSError, ConnectionLost, BadResponse) as exc:
            raise UpstreamUnavailable(f"cannot reach upstream: {_describe(exc)}") from None

    async def aclose(self) -> None:
        self._pool.close()


class _Silence(Exception):
    """Put into a response body that stayed silent for ``read_timeout`` seconds."""


class UpstreamResponse:
    """A 200 answer whose body is read as it arrives (``async for``) or whole (``read``)."""

    def __init__(self, conn: Connection, read_timeout: float) -> None:
        self._conn = conn
        self.headers = conn.headers
        """Response headers, names in lower case."""
        self._read_timeout = read_timeout
        self._waiting_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def complete(self) -> bool:
        """The whole answer has arrived (read or not)."""
        return self._conn.complete

    def __aiter__(self) -> UpstreamResponse:
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(self._loop.time() + self._read_timeout, self._check_silence)
        return self

    async def __anext__(self) -> bytes:
        """The next piece of the body: what arrived since the last piece was taken."""
        # Silence counts only while waiting here: a relay held up by a slow client is not
        # an upstream gone quiet.
        self._waiting_since = self._loop.time()
        try:
            chunk = await self._conn.read()
        except _Silence:
            raise UpstreamTimeout("upstream went silent mid-stream") from None
        except (ConnectionLost, BadResponse) as exc:
            raise UpstreamUnavailable(f"upstream connection lost mid-stream: {_describe(exc)}") from None
        finally:
            self._waiting_since = None
        if not chunk:
            raise StopAsyncIteration
        return chunk

    def _check_silence(self) -> None:
        now = self._loop.time()
        since = self._waiting_since
        if since is not None and now - since >= self._read_timeout:
            self._watchdog = None
            self._conn.abort(_Silence())
            return
        due = (since if since is not None else now) + self._read_timeout
        self._watchdog = self._loop.call_at(due, self._check_silence)

    async def read(self) -> bytes:
        """The whole body (a non-streamed answer)."""
        return b"".join([chunk async for chunk in self])

    async def drain(self, grace: float) -> None:
        """Read what follows the end of the answer (the body's terminating chunk), so the
        connection goes back to the pool instead of being closed half-read: reconnecting
        cost every request about a millisecond (docs/performance.md). An upstream that keeps
        the stream open longer than ``grace`` seconds loses its connection instead."""
        if self.complete:
            return
        try:
            async with asyncio.timeout(grace):
                async for _ in self:
                    pass
        except (TimeoutError, UpstreamTimeout, UpstreamUnavailable):
            pass

    def close(self) -> None:
        """Stop reading. A body read to its end goes back to the pool; one cut short closes
        its connection, which is how the upstream learns to stop generating."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._conn.release()


async def _read_some(conn: Connection, limit: int, timeout: float) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while size < limit:
                chunk = await conn.read()
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
    except (TimeoutError, ConnectionLost, BadResponse):
        pass
    return b"".join(parts)[:limit]


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def upstream_reason(raw: bytes) -> str:
    """The upstream's own explanation from an error body (OpenAI's and Anthropic's
    ``{"error": {"message": …}}`` alike), if it gave one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode("utf-8", "replace").strip()
    if isinstance(body, dict) and "error" in body:
        return error_message(body["error"])
    return ""


def error_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
