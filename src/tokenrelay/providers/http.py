"""The upstream hop both HTTP providers share: one pooled aiohttp session per upstream.

``UpstreamClient.post_stream`` returns once the upstream answered 200. A refusal (any other
status, read and closed with the upstream's own reason) or an unreachable upstream is raised
as the matching ``UpstreamError`` — before tokenrelay has written a byte, so it can still be
an honest status code. Iterating the ``UpstreamResponse`` then yields the body as it arrives, one
piece per network read, and raises ``UpstreamTimeout`` after ``read_timeout`` seconds of
silence or ``UpstreamUnavailable`` if the upstream hangs up mid-answer.

aiohttp's client is used directly, without a wrapper API on top: on the relay's hot path it
costs less CPU per request and per read than httpx, alone or over aiohttp
(docs/performance.md). Silence is watched by one timer per response that re-arms only when
it fires, not by aiohttp's ``sock_read`` timeout, which re-arms a timer on every read —
the top frame of a profile with thousands of open streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

from ..errors import UpstreamTimeout, UpstreamUnavailable
from .base import error_for_status

# Compressed SSE would be held back by the decompressor; ask for it plain.
SSE_REQUEST_HEADERS = {
    "content-type": "application/json",
    "accept": "text/event-stream",
    "accept-encoding": "identity",
}

ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of a refusal's body read for its reason; the rest is dropped with the connection."""


class UpstreamClient:
    """A pool of keep-alive connections to one upstream, opened on first use (aiohttp's
    session belongs to the event loop that runs the requests)."""

    def __init__(self, *, pool_size: int, connect_timeout: float, read_timeout: float) -> None:
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout,
                                          sock_connect=self.connect_timeout, sock_read=None),
            cookie_jar=aiohttp.DummyCookieJar(),  # an API upstream sets no cookies worth keeping
            auto_decompress=False,  # bytes pass through as sent, with their content-encoding
            headers={"user-agent": "tokenrelay"},
        )
        return self._session

    async def post_stream(self, url: URL, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        """The response once its status is 200; the caller reads it and must ``close`` it."""
        response = await self._send("POST", url, headers, body, self.read_timeout)
        if response.status != 200:
            try:
                raw = await _read_some(response, ERROR_BODY_LIMIT, self.read_timeout)
            finally:
                response.close()
            raise error_for_status(response.status, upstream_reason(raw) or response.reason or "",
                                   retry_after=response.headers.get("retry-after"))
        return UpstreamResponse(response, self.read_timeout)

    async def get(self, url: URL, headers: Mapping[str, str], *, timeout: float) -> tuple[int, bytes]:
        """A short request answered as a whole (``GET /models``): its status and body."""
        response = await self._send("GET", url, headers, None, timeout)
        try:
            return response.status, await _read_some(response, 1 << 20, timeout)
        finally:
            response.close()

    async def _send(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None,
                    timeout: float) -> aiohttp.ClientResponse:
        session = self._session or self._open_session()
        try:
            async with asyncio.timeout(timeout):  # until the status line and headers
                return await session.request(method, url, data=body, headers=headers, allow_redirects=False)
        except TimeoutError:  # aiohttp's connect timeout is one too
            raise UpstreamTimeout("upstream did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"cannot reach upstream: {_describe(exc)}") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Silence(Exception):
    """Put into a response body that stayed silent for ``read_timeout`` seconds."""


class UpstreamResponse:
    """A 200 answer whose body is read as it arrives (``async for``) or whole (``read``)."""

    def __init__(self, response: aiohttp.ClientResponse, read_timeout: float) -> None:
        self._response = response
        self.headers: CIMultiDictProxy[str] = response.headers
        self._read_timeout = read_timeout
        self._waiting_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._content = response.content

    def __aiter__(self) -> UpstreamResponse:
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(self._loop.time() + self._read_timeout, self._check_silence)
        return self

    async def __anext__(self) -> bytes:
        """The next piece of the body, as one network read (or more) delivered it.

        An iterator object rather than an async generator: a generator left unfinished
        (after ``[DONE]``) would be closed later by a task the event loop creates for it."""
        # Silence counts only while waiting here: a relay held up by a slow client is not
        # an upstream gone quiet.
        self._waiting_since = self._loop.time()
        try:
            chunk = await self._content.readany()
        except _Silence:
            raise UpstreamTimeout("upstream went silent mid-stream") from None
        except aiohttp.ClientError as exc:
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
            self._content.set_exception(_Silence())
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
        if self._content.is_eof():
            return
        try:
            async with asyncio.timeout(grace):
                async for _ in self:
                    pass
        except (TimeoutError, UpstreamTimeout, UpstreamUnavailable):
            pass

    def close(self) -> None:
        """Stop reading. A body read to its end has already gone back to the pool; one cut
        short closes its connection, which is how the upstream learns to stop generating."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._response.close()


async def _read_some(response: aiohttp.ClientResponse, limit: int, timeout: float) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while size < limit:
                chunk = await response.content.readany()
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
    except (TimeoutError, aiohttp.ClientError):
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
