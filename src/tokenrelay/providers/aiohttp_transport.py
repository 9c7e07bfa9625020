"""The maintained client behind the transport interface: aiohttp.

Used where the fast path (``http11``) cannot be right — an upstream the environment sends
through a proxy (``trust_env``: ``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``, with
credentials from the proxy URL or ``~/.netrc``) — or wherever the operator asks for it
(``TOKENRELAY_UPSTREAM_CLIENT=aiohttp``). It costs more CPU per request (docs/performance.md
§2), which is why it is not the default for everything.

aiohttp already does what the seam asks of a transport: 1xx responses skipped, Happy
Eyeballs, a POST never sent twice, idle connections closed, flow control on a body read
slowly. Decompression is left to ``transport.decoder_for``, as on the fast path, so both
decode the same encodings and present the same headers.
"""

from __future__ import annotations

import ssl
import zlib
from collections.abc import Mapping

import aiohttp
from yarl import URL

from .http11 import HAPPY_EYEBALLS_DELAY, IDLE_KEEP
from .transport import (
    BadResponse,
    ConnectionLost,
    ConnectTimeout,
    Decoder,
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

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: aiohttp wants its session made inside the event loop it runs in.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.size, keepalive_timeout=self.idle_keep, ssl=self._ssl_context or True,
                happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, ttl_dns_cache=10)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=True, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                # Only the connect phase here; the first byte and the silences are
                # bounded above the transport, alike for both transports.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                # Ask for no encoding unless the caller does, as the fast path sends it.
                skip_auto_headers=("Accept-Encoding",))
        return self._session

    async def request(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None) -> AiohttpExchange:
        for name, value in headers.items():
            check_header(name, value)
        try:
            response = await self._client().request(method, url, data=body, headers=dict(headers),
                                                    allow_redirects=False)
        except aiohttp.ConnectionTimeoutError:
            raise ConnectTimeout(f"no connection to {url.host} port {url.port} within "
                                 f"{self.connect_timeout:g} s") from None
        except aiohttp.ClientHttpProxyError as exc:
            raise ConnectionLost(f"the proxy refused the connection: {exc.status} {exc.message}") from None
        except aiohttp.ServerDisconnectedError:
            raise ConnectionLost("the upstream closed the connection") from None
        except aiohttp.ClientResponseError as exc:  # what aiohttp's parser could not read
            raise BadResponse(f"not an HTTP/1.1 response: {exc.message}") from None
        except aiohttp.ClientError as exc:
            raise ConnectionLost(str(exc) or type(exc).__name__) from None
        return AiohttpExchange(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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
