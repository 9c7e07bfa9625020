"""The seam under the upstream hop: one small interface, two HTTP clients behind it.

``UpstreamClient`` (``providers/http.py``) turns what a transport returns into tokenrelay's
behaviour — refusals read for their reason, silence watched, errors as ``UpstreamError``s.
A ``Transport`` only sends one request and hands back an ``Exchange``: the response whose
status and headers have arrived, with its body to be read piece by piece. Two implement it:

- ``http11.Pool``, the fast path: a narrow HTTP/1.1 client written for the relay's hot path
  (docs/performance.md §2);
- ``aiohttp_transport.AiohttpTransport``: a maintained general client, for what the fast
  path leaves out — above all proxies from ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``.

Like httpx's ``BaseTransport``, the interface is small on purpose: everything the two must
agree on (refusal handling, timeouts between pieces, the error each failure becomes) lives
above it, once, and ``tests/test_transport_conformance.py`` runs the same scripted upstreams
against both.
"""

from __future__ import annotations

import re
import ssl
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from yarl import URL


class TransportError(Exception):
    """A failure below HTTP semantics; ``UpstreamClient`` says which ``UpstreamError`` it is."""


class ConnectionLost(TransportError):
    """The connection closed (or broke) before the answer was complete."""


class RequestUnanswered(ConnectionLost):
    """The connection broke after the request went out, before any byte of answer: the
    upstream may have started on it (a generation that is billed), so it is not sent again."""


class BadResponse(TransportError):
    """The upstream's bytes are not an HTTP/1.1 response (or not one tokenrelay can read)."""


MAX_RESPONSE_HEAD = 64 * 1024
"""Bytes of a response's status line and headers: real ones are a few kilobytes. Past it the
response is refused, rather than parsed and held however large an upstream makes it."""
MAX_RESPONSE_HEADERS = 128
"""Header lines of a response (aiohttp counts lines, with ``MAX_RESPONSE_FIELD`` bytes each)."""
MAX_RESPONSE_FIELD = 8190
"""Bytes of one header line, aiohttp's own default."""


class HeadTooLarge(BadResponse):
    """The response's status line and headers are larger than tokenrelay reads."""


class ConnectTimeout(TransportError):
    """No connection to the upstream within the connect timeout."""


class WriteTimeout(TransportError):
    """The upstream stopped taking the request's bytes for longer than the write timeout."""


class InvalidHeader(ValueError):
    """A request header that cannot be sent: a name that is not an HTTP token, or a line
    break in a value (which would let a value write headers of its own)."""


class Exchange(Protocol):
    """One response whose status line and headers have arrived."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Names in lower case; a header sent more than once has its values joined by ", "
        (RFC 9110 §5.3). A body the transport decoded has no ``content-encoding`` here."""
        ...

    @property
    def complete(self) -> bool:
        """The whole body has arrived (read or not)."""
        ...

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call; ``b""`` at the end. Never two
        pieces without the event loop having run in between (``providers.base.Provider``).
        Raises ``ConnectionLost`` or ``BadResponse``, or the exception given to ``abort``."""
        ...

    def abort(self, exc: BaseException) -> None:
        """Make the pending (or next) ``read`` raise ``exc``; the connection is not reused."""
        ...

    def release(self) -> None:
        """The caller is done: the connection is kept if its answer ended cleanly, else closed."""
        ...


class Transport(Protocol):
    """Sends requests to upstreams over a pool of kept connections."""

    name: str
    """"fast" or "aiohttp": which client this is, for logs and ``doctor``."""

    async def request(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None) -> Exchange:
        """Send the request; return once the response's status and headers arrived (1xx
        interim responses skipped). The caller bounds the wait and must ``release`` the
        exchange. A request whose connection failed after it was written is never sent
        again unless its method is idempotent: a POST to a model API may have started (and
        been billed for) a generation. Raises ``TransportError``s, ``OSError`` or ``InvalidHeader``."""
        ...

    async def aclose(self) -> None:
        ...


@dataclass(frozen=True)
class TLSOptions:
    """How upstream servers are verified and how tokenrelay proves who it is to them."""

    ca_bundle: str | None = None
    """PEM file of the CAs trusted for upstreams, instead of the system's."""
    client_cert: str | None = None
    """PEM file holding a client certificate and its private key (mutual TLS)."""

    def context(self) -> ssl.SSLContext:
        # Both transports get this same context, so an upstream is verified alike by both.
        context = ssl.create_default_context(cafile=self.ca_bundle)
        if self.client_cert:
            context.load_cert_chain(self.client_cert)
        return context


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
CHECKED_NAMES: set[str] = set()
"""Names already checked: the same few are sent on every request, on the hot path."""


def check_header(name: str, value: str) -> None:
    if name not in CHECKED_NAMES:
        if not _TOKEN.fullmatch(name):
            raise InvalidHeader(f"request header name {name!r} is not an HTTP token")
        if len(CHECKED_NAMES) < 1024:
            CHECKED_NAMES.add(name)
    if "\r" in value or "\n" in value or "\0" in value:
        raise InvalidHeader(f"request header {name!r} holds a line break")


def join_header(headers: dict[str, str], name: str, value: str) -> None:
    """Add a response header, keeping every value of one sent more than once."""
    old = headers.get(name)
    headers[name] = value if old is None else f"{old}, {value}"


class Decoder(Protocol):
    def decompress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


def decoder_for(encoding: str) -> Decoder | None:
    """A decoder for a ``content-encoding`` tokenrelay can undo (gzip, deflate), or None.

    tokenrelay asks for ``identity`` — a decompressor holds back the bytes of an unfinished
    block, which a stream cannot afford — but some gateways compress anyway; their body is
    decoded rather than passed on as bytes nobody can read."""
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if encoding == "deflate":
        return _Deflate()
    return None


class _Deflate:
    """``deflate`` is meant to be zlib-wrapped, but some servers send raw deflate: the first
    bytes tell which (as browsers and aiohttp do)."""

    def __init__(self) -> None:
        self._inner: zlib._Decompress | None = None

    def decompress(self, data: bytes) -> bytes:
        if self._inner is None:
            if not data:
                return b""
            zlib_wrapped = (data[0] & 0x0F) == 8 and ((data[0] << 8) | (data[1] if len(data) > 1 else 0)) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
        return self._inner.decompress(data)

    def flush(self) -> bytes:
        return self._inner.flush() if self._inner is not None else b""


def env_proxy(url: URL) -> str | None:
    """The proxy the environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``, in either
    case) sends ``url`` through, read as aiohttp's ``trust_env`` reads it — the transport
    that then carries the request."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme)
    # proxy_bypass_environment is public in urllib but missing from typeshed
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not proxy or bypass(url.raw_host or "", proxies):
        return None
    return proxy
