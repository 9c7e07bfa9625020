"""The upstream hop both HTTP providers share: a pool of keep-alive connections per upstream.

``UpstreamClient.post_stream`` returns once the upstream answered 200. A refusal (any other
status, read and closed with the upstream's own reason) or an unreachable upstream is raised
as the matching ``UpstreamError`` — before tokenrelay has written a byte, so it can still be
an honest status code. Iterating the ``UpstreamResponse`` then yields the body as it arrives, one
piece per network read, and raises ``UpstreamTimeout`` after ``read_timeout`` seconds of
silence or ``UpstreamUnavailable`` if the upstream hangs up mid-answer.

The requests go through a ``transport.Transport``: ``http11``'s connections (the fast
path: on the relay's hot path, a general HTTP client cost more CPU per request than the rest
of tokenrelay together, docs/performance.md), or aiohttp's where the fast path cannot be
right — an upstream behind a proxy from the environment. ``make_client`` picks from the
settings. Whichever carries a request, what the providers see is the same: this module's
``UpstreamResponse`` and ``UpstreamError``s.

Silence is watched by one timer per response that re-arms only when it fires, rather than a
timer re-armed on every read — the top frame of a profile with thousands of open streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

import orjson
from yarl import URL

from ..errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from .base import error_for_status
from .http11 import IDLE_KEEP, Pool
from .transport import (
    ConnectionLost,
    RequestUnanswered,
    ConnectTimeout,
    Exchange,
    HeadTooLarge,
    InvalidHeader,
    TLSOptions,
    Transport,
    TransportError,
    WriteTimeout,
    env_proxy,
)

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger("tokenrelay.upstream")

ClientKind = Literal["auto", "fast", "aiohttp"]

# Compressed SSE would be held back by the decompressor; ask for it plain.
SSE_REQUEST_HEADERS = {
    "content-type": "application/json",
    "accept": "text/event-stream",
    "accept-encoding": "identity",
}

ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of a refusal's body read for its reason; the rest is dropped with the connection."""


class UpstreamClient:
    """Requests to one upstream over a pool of keep-alive connections.

    ``client`` says which transport carries them: "fast" (``http11``), "aiohttp", or "auto"
    — the fast path, except for the upstreams the environment sends through a proxy."""

    def __init__(self, *, pool_size: int, connect_timeout: float, read_timeout: float,
                 spare_connection: bool = True, client: ClientKind = "fast", tls: TLSOptions | None = None,
                 idle_keep: float = IDLE_KEEP) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        context = tls.context() if tls is not None else None

        def fast() -> Pool:
            return Pool(size=pool_size, connect_timeout=connect_timeout, spare=spare_connection,
                        idle_keep=idle_keep, ssl_context=context)

        def maintained() -> Transport:
            from .aiohttp_transport import AiohttpTransport  # imported only where it is used

            return AiohttpTransport(size=pool_size, connect_timeout=connect_timeout, idle_keep=idle_keep,
                                    ssl_context=context)

        self.transport: Transport
        if client == "aiohttp":
            self.transport = maintained()
        elif client == "auto" and _proxies_set():
            self.transport = AutoTransport(fast(), maintained)
        else:
            if client == "fast" and _proxies_set():
                log.warning("TOKENRELAY_UPSTREAM_CLIENT=fast: the proxy settings in the environment "
                            "(HTTPS_PROXY, HTTP_PROXY) are not used for upstream requests")
            self.transport = fast()

    async def post_stream(self, url: URL, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
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

    async def get(self, url: URL, headers: Mapping[str, str], *, timeout: float) -> tuple[int, bytes]:
        """A short request answered as a whole (``GET /models``): its status and body."""
        conn = await self._send("GET", url, headers, None, timeout)
        status = conn.status
        try:
            return status, await _read_some(conn, 1 << 20, timeout)
        finally:
            conn.release()

    async def _send(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None,
                    timeout: float) -> Exchange:
        try:
            async with asyncio.timeout(timeout):  # until the status line and headers
                return await self.transport.request(method, url, headers, body)
        except TimeoutError:
            raise UpstreamTimeout("upstream did not answer in time") from None
        except ConnectTimeout as exc:
            raise UpstreamTimeout(f"cannot reach upstream: {exc}") from None
        except WriteTimeout as exc:
            raise UpstreamTimeout(f"upstream did not take the request: {exc}") from None
        except InvalidHeader as exc:  # from the settings (an API key), not from the client
            raise UpstreamError(f"cannot send the request upstream: {exc}") from None
        except RequestUnanswered as exc:
            error = UpstreamUnavailable(f"upstream connection lost before it answered: {_describe(exc)}")
            error.request_sent = True
            raise error from None
        except HeadTooLarge as exc:
            raise UpstreamProtocolError(f"upstream broke the protocol: {exc}") from None
        except (OSError, TransportError) as exc:
            raise UpstreamUnavailable(f"cannot reach upstream: {_describe(exc)}") from None

    async def aclose(self) -> None:
        await self.transport.aclose()


async def answers_models(client: UpstreamClient, url: URL, headers: Mapping[str, str], *,
                         timeout: float) -> str | None:
    """Whether an upstream answers ``GET {base}/models``: None when it does, else why not
    (a provider's ``check_ready``). Any answer but a server error or a refused key counts: a
    server that lacks the route (404) is up, and a rate limit (429) passes by itself."""
    try:
        status, _ = await client.get(url, headers, timeout=timeout)
    except UpstreamTimeout:
        return f"upstream did not answer GET /models within {timeout:g} s"
    except UpstreamUnavailable as exc:
        return exc.message
    if status >= 500 or status in (401, 403):
        return f"upstream answered GET /models with {status}"
    return None


class AutoTransport:
    """The fast path for every upstream the environment sends directly, aiohttp for those
    it sends through a proxy (``HTTPS_PROXY``/``HTTP_PROXY`` minus ``NO_PROXY``), decided
    once per URL."""

    name = "auto"

    def __init__(self, fast: Transport, maintained: Callable[[], Transport]) -> None:
        self._fast = fast
        self._make_maintained = maintained
        self._maintained: Transport | None = None
        self._chosen: dict[URL, Transport] = {}

    def for_url(self, url: URL) -> Transport:
        transport = self._chosen.get(url)
        if transport is None:
            proxy = env_proxy(url)
            if proxy is None:
                transport = self._fast
            else:
                if self._maintained is None:
                    self._maintained = self._make_maintained()
                transport = self._maintained
                log.info("upstream %s://%s goes through the proxy from the environment (client: aiohttp)",
                         url.scheme, url.host)
            if len(self._chosen) > 256:  # URLs come from the settings; a bound all the same
                self._chosen.clear()
            self._chosen[url] = transport
        return transport

    async def request(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None) -> Exchange:
        return await self.for_url(url).request(method, url, headers, body)

    async def aclose(self) -> None:
        await self._fast.aclose()
        if self._maintained is not None:
            await self._maintained.aclose()


def _proxies_set() -> bool:
    return any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"))


def make_client(settings: Settings, *, connect_timeout: float | None = None,
                read_timeout: float | None = None) -> UpstreamClient:
    """The client for one upstream, as the settings describe it: the one place tokenrelay
    builds its upstream transport."""
    tls = None
    if settings.upstream_ca_bundle is not None or settings.upstream_client_cert is not None:
        # Both files were loaded once by Settings: a bad one has stopped start-up already.
        tls = TLSOptions(ca_bundle=str(settings.upstream_ca_bundle) if settings.upstream_ca_bundle else None,
                         client_cert=str(settings.upstream_client_cert) if settings.upstream_client_cert else None)
    return UpstreamClient(pool_size=settings.pool_size,
                          connect_timeout=connect_timeout or settings.connect_timeout,
                          read_timeout=read_timeout or settings.read_timeout,
                          spare_connection=settings.spare_connection,
                          client=settings.upstream_client, tls=tls)


class _Silence(Exception):
    """Put into a response body that stayed silent for ``read_timeout`` seconds."""


class UpstreamResponse:
    """A 200 answer whose body is read as it arrives (``async for``) or whole (``read``)."""

    def __init__(self, conn: Exchange, read_timeout: float) -> None:
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
        except TransportError as exc:
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


async def _read_some(conn: Exchange, limit: int, timeout: float) -> bytes:
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
    except (TimeoutError, TransportError):
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
