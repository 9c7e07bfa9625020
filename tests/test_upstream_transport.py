"""The upstream transport (httpx over aiohttp) reports failures as httpx's own transport
does: unreachable is ``ConnectError``, hung up mid-answer is ``ReadError``, and only real
silences are timeouts — the relay maps each to its own status and message."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest

from tokenrelay.providers.transport import UpstreamTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def fetch(url: str, *, read: float = 5.0) -> bytes:
    timeout = httpx.Timeout(connect=5.0, read=read, write=5.0, pool=5.0)
    async with httpx.AsyncClient(transport=UpstreamTransport(), timeout=timeout) as client:
        async with client.stream("POST", url, content=b"{}") as response:
            return b"".join([chunk async for chunk in response.aiter_raw()])


async def with_server(handler: Handler, *, read: float = 5.0) -> bytes:
    """Serve one connection with ``handler`` and fetch from it; the server's side of the
    connection is closed and awaited before returning, whatever the fetch raised."""
    handled: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handled.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            return await fetch(f"http://127.0.0.1:{port}/v1/chat/completions", read=read)
    finally:
        await asyncio.wait_for(asyncio.gather(*handled, return_exceptions=True), 5)


def test_refused_connection_is_a_connect_error_not_a_timeout() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        asyncio.run(fetch(f"http://127.0.0.1:{port}/v1/chat/completions"))


def test_upstream_hanging_up_mid_answer_is_a_read_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + b"6\r\ndata: \r\n")
        await writer.drain()

    with pytest.raises(httpx.ReadError):
        asyncio.run(with_server(handler))


def test_silent_upstream_is_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD)
        await writer.drain()
        await reader.read()  # until the client gives up and closes

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(with_server(handler, read=0.3))


def test_a_whole_answer_arrives_unchanged() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()

    assert asyncio.run(with_server(handler)) == b"data: [DONE]\n\n"
