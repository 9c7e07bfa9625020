"""The upstream hop's transport: httpx's API over aiohttp's HTTP/1.1 client.

httpx keeps the API every module codes against, and ``MockTransport`` as the one seam for
a fake upstream in tests; aiohttp underneath parses HTTP in C, which costs the relay about a
quarter of the CPU per streamed token of httpx's own h11-based transport, and half per
request (figures in docs/performance.md). ``httpx-aiohttp`` is the bridge openai-python's
aiohttp option uses.

One correction on top: the bridge reports every aiohttp connection error as a *timeout*
(a refused connection arrives as ``httpx.ConnectTimeout``, an upstream that hangs up
mid-answer as one too). Here only real timeouts stay timeouts; the rest become
``ConnectError`` before the response and ``ReadError`` during its body, as with httpx's
own transport, so "unreachable" and "too slow" keep their own status codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


def _retyped(exc: httpx.TimeoutException, kind: type[httpx.TransportError]) -> httpx.TransportError:
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError) and not isinstance(cause, asyncio.TimeoutError):
        return kind(str(cause) or type(cause).__name__)
    return exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TimeoutException as exc:
            raise _retyped(exc, httpx.ReadError) from exc.__cause__

    async def aclose(self) -> None:
        await self._inner.aclose()


class UpstreamTransport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TimeoutException as exc:
            raise _retyped(exc, httpx.ConnectError) from exc.__cause__
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Body(response.stream)
        return response
