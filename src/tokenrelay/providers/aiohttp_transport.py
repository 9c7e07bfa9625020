"""The maintained client behind the transport interface: aiohttp.

Used where the fast path (``http11``) cannot be right — an upstream the environment sends
through a proxy (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``, with credentials from the
proxy URL or ``~/.netrc``) — or wherever the operator asks for it
(``TOKENRELAY_UPSTREAM_CLIENT=aiohttp``). It costs more CPU per request (docs/performance.md
§2), which is why it is not the default for everything.

The proxy is looked up as aiohttp's ``trust_env`` looks it up (its own
``get_env_proxy_for_url``), but once per upstream URL rather than with ``trust_env`` itself,
which reads the environment and ``~/.netrc`` in a worker thread on every request (two thread
hops, most of aiohttp's CPU per request here) and would add ``~/.netrc`` credentials for the
upstream's host beside tokenrelay's own ``Authorization`` — which aiohttp refuses.

aiohttp already does what the seam asks of a transport: 1xx responses skipped, Happy
Eyeballs, a POST never sent twice, idle connections closed, flow control on a body read
slowly. Decompression is left to ``transport.decoder_for``, as on the fast path, so both
decode the same encodings and present the same headers.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Mapping

import aiohttp
from aiohttp import http_exceptions
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from .http11 import HAPPY_EYEBALLS_DELAY, IDLE_KEEP
from .transport import (
    BadResponse,
    ConnectionLost,
    RequestUnanswered,
    ConnectTimeout,
    Decoder,
    HeadTooLarge,
    MAX_RESPONSE_FIELD,
    MAX_RESPONSE_HEADERS,
    check_header,
    decoder_for,
    join_header,
)


class AiohttpTransport:
    name = "aiohttp"

    def __init__(self, *, size: int, connect_timeout: float, idle_keep: float = IDLE_KEEP,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.size = size
        self.connect_timeout = connect_timeout
        self.idle_keep = idle_keep
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[URL, URL | None] = {}

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: aiohttp wants its session made inside the event loop it runs in.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.size, keepalive_timeout=self.idle_keep, ssl=self._ssl_context or True,
                happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, ttl_dns_cache=10)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                # Only the connect phase here; the first byte and the silences are
                # bounded above the transport, alike for both transports.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                # Ask for no encoding unless the caller does, as the fast path sends it.
                skip_auto_headers=("Accept-Encoding",),
                # aiohttp bounds a head by lines and their length, not bytes: the same order
                # of bound as the fast path's MAX_RESPONSE_HEAD (its default allows 32,768 lines).
                max_headers=MAX_RESPONSE_HEADERS, max_field_size=MAX_RESPONSE_FIELD,
                max_line_size=MAX_RESPONSE_FIELD)
        return self._session

    async def request(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None) -> AiohttpExchange:
        for name, value in headers.items():
            check_header(name, value)
        try:
            proxy = self._proxies[url]
        except KeyError:
            proxy = await asyncio.to_thread(_env_proxy, url)  # may read ~/.netrc
            if len(self._proxies) > 256:  # URLs come from the settings; a bound all the same
                self._proxies.clear()
            self._proxies[url] = proxy
        try:
            response = await self._client().request(method, url, data=body, headers=dict(headers),
                                                    allow_redirects=False, proxy=proxy)
        except aiohttp.ConnectionTimeoutError:
            raise ConnectTimeout(f"no connection to {url.host} port {url.port} within "
                                 f"{self.connect_timeout:g} s") from None
        except aiohttp.ClientHttpProxyError as exc:
            raise ConnectionLost(f"the proxy refused the connection: {exc.status} {exc.message}") from None
        except aiohttp.ServerDisconnectedError:
            raise RequestUnanswered("the upstream closed the connection") from None
        except aiohttp.ClientResponseError as exc:  # what aiohttp's parser could not read
            if _head_too_large(exc):
                raise HeadTooLarge(f"the upstream's response headers are larger than tokenrelay reads "
                                   f"({MAX_RESPONSE_HEADERS} lines of {MAX_RESPONSE_FIELD} bytes): {exc.message}"
                                   ) from None
            raise BadResponse(f"not an HTTP/1.1 response: {exc.message}") from None
        except aiohttp.ClientError as exc:
            raise ConnectionLost(str(exc) or type(exc).__name__) from None
        return AiohttpExchange(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _head_too_large(exc: BaseException) -> bool:
    """Whether aiohttp refused a response for one of the head's bounds (the parser's own
    exception is the cause of the one the client raises)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, http_exceptions.LineTooLong) or "Too many headers" in str(seen):
            return True
        seen = seen.__cause__
    return False


def _env_proxy(url: URL) -> URL | None:
    """The proxy for ``url``, if any, with its credentials in it: aiohttp sends those as
    ``Proxy-Authorization`` both to a tunnel's CONNECT and on a plain-http request (its
    ``proxy_headers`` reach only the CONNECT, and its ``proxy_auth`` is deprecated)."""
    try:
        proxy, auth = get_env_proxy_for_url(url)
    except LookupError:  # no proxy for this URL
        return None
    return proxy if auth is None else proxy.with_user(auth.login).with_password(auth.password)


class AiohttpExchange:
    """An aiohttp response as the transport interface's ``Exchange``."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        headers: dict[str, str] = {}
        for name, value in response.raw_headers:
            join_header(headers, name.decode("latin-1").lower(), value.decode("latin-1"))
        self._decoder: Decoder | None = None
        encoding = headers.get("content-encoding")
        if encoding is not None:
            self._decoder = decoder_for(encoding)
            if self._decoder is not None:
                del headers["content-encoding"]
                headers.pop("content-length", None)
        self.headers = headers
        self._error: BaseException | None = None

    @property
    def complete(self) -> bool:
        return self._response.content.is_eof()

    async def read(self) -> bytes:
        while True:
            if self._error is not None:
                raise self._error
            try:
                # Everything buffered at once (as the fast path): the next call then waits
                # for the network, which gives the event loop its turn.
                data = await self._response.content.readany()
            except aiohttp.ClientPayloadError as exc:
                raise ConnectionLost(f"the upstream closed the connection: {exc}") from None
            except aiohttp.ClientError as exc:
                raise ConnectionLost(str(exc) or type(exc).__name__) from None
            decoder = self._decoder
            if decoder is None:
                return data
            try:
                if not data:  # the end: what the decoder still holds
                    self._decoder = None
                    return decoder.flush()
                decoded = decoder.decompress(data)
            except zlib.error as exc:
                self.abort(BadResponse(f"the upstream's compressed body is corrupt: {exc}"))
                continue
            if decoded:
                return decoded

    def abort(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        # Wakes a read waiting for the network with ``exc``.
        self._response.content.set_exception(exc)
        self._response.close()

    def release(self) -> None:
        if self._error is None and self.complete:
            self._response.release()
        else:
            self._response.close()
