"""Scripted upstreams and a forward proxy on real loopback sockets, for the upstream client's
tests: each handler plays one HTTP exchange byte by byte, however oddly a real server or
gateway may play it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from yarl import URL

T = TypeVar("T")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one request, its head and its ``content-length`` body, off the connection; the head."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length: " in lower:
        length = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    return head


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait, giving the event loop its turns, until ``condition`` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def serving(handler: Handler, *, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None,
                  path: str = "/v1/chat/completions") -> AsyncIterator[tuple[URL, list[asyncio.Task[None]]]]:
    """A scripted upstream: ``handler`` serves each connection, which is closed when it
    returns (or when the client hung up mid-request). Yields the URL and the connections'
    tasks, which are awaited on the way out, whatever the block raised."""
    handled: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handled.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, host, 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context else "http"
    name = "localhost" if ssl_context else (f"[{host}]" if ":" in host else host)
    try:
        async with server:
            yield URL(f"{scheme}://{name}:{port}{path}"), handled
    finally:
        await asyncio.wait_for(asyncio.gather(*handled, return_exceptions=True), 5)


@contextlib.contextmanager
def black_hole(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on ``host`` whose connection attempts are never answered: a listener with a
    full accept queue drops further SYNs, as a firewall that swallows packets does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family)
    queued: list[socket.socket] = []
    try:
        listener.bind((host, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):  # fill the queue
            sock = socket.socket(family)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect((host, port))
            queued.append(sock)
        yield port
    finally:
        for sock in queued:
            sock.close()
        listener.close()


@dataclass
class ForwardProxy:
    """A forward proxy on loopback: ``CONNECT host:port`` tunnels (for https URLs) and
    absolute-URI requests (for http URLs), as curl and the HTTP clients use a proxy.
    ``seen`` lists each request line it was sent."""

    url: str = ""
    seen: list[str] = field(default_factory=list)
    credentials: list[str] = field(default_factory=list)
    """The ``Proxy-Authorization`` of each request that had one."""


@contextlib.asynccontextmanager
async def forward_proxy(hosts: dict[str, str] | None = None) -> AsyncIterator[ForwardProxy]:
    """The proxy, serving until the block ends. ``hosts`` maps names only the proxy can
    resolve to addresses, as an egress proxy resolves names a private network cannot."""
    proxy = ForwardProxy()
    hosts = hosts or {}
    tasks: list[asyncio.Task[None]] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        line, _, rest = head.partition(b"\r\n")
        method, target, version = line.decode("latin-1").split(" ")
        proxy.seen.append(f"{method} {target}")
        for header in rest.split(b"\r\n"):
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "proxy-authorization":
                proxy.credentials.append(value.strip())
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            host = host.strip("[]")
            up_reader, up_writer = await asyncio.open_connection(hosts.get(host, host), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = URL(target)
            host = url.raw_host or ""
            up_reader, up_writer = await asyncio.open_connection(hosts.get(host, host), url.port)
            kept = [h for h in rest.split(b"\r\n") if not h.lower().startswith(b"proxy-")]
            up_writer.write(f"{method} {url.raw_path_qs} {version}\r\n".encode() + b"\r\n".join(kept))
        await writer.drain()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    proxy.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with server:
            yield proxy
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def in_thread(opened: Callable[[], contextlib.AbstractAsyncContextManager[T]], *, join: float = 10) -> Iterator[T]:
    """An async context manager entered on an event loop of its own thread, for tests that
    are not async: what it gives, until the block ends (then it is exited there)."""
    started = threading.Event()
    running: list[tuple[T, asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def main() -> None:
        async with opened() as value:
            stop = asyncio.Event()
            running.append((value, asyncio.get_running_loop(), stop))
            started.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10), f"{opened} did not start"
    value, loop, stop = running[0]
    try:
        yield value
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(join)


def forward_proxy_in_thread(hosts: dict[str, str] | None = None) -> contextlib.AbstractContextManager[ForwardProxy]:
    """``forward_proxy`` on an event loop of its own, for tests that are not async."""
    return in_thread(lambda: forward_proxy(hosts))


@dataclass(frozen=True)
class Certificates:
    """A CA-less self-signed server certificate for ``localhost`` and a client certificate,
    each PEM file holding the certificate and its key."""

    server: Path
    server_cert: Path
    """The server's certificate alone: the CA bundle that trusts it."""
    client: Path

    def server_context(self, *, require_client: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server)
        if require_client:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.client.with_suffix(".crt"))
        return context


def make_certificates(directory: Path) -> Certificates:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed to make the test's certificates"
    paths: list[Path] = []
    for name, subject, extra in (("server", "/CN=localhost", ["-addext", "subjectAltName=DNS:localhost"]),
                                 ("client", "/CN=tokenrelay", ["-addext", "extendedKeyUsage=clientAuth"])):
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", subject, *extra], check=True, capture_output=True)
        pem = directory / f"{name}.pem"
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
        paths += [pem, cert]
    return Certificates(server=paths[0], server_cert=paths[1], client=paths[2])


def keep_alive_upstream(close_after: int | None = None) -> tuple[Handler, list[int]]:
    """Answers "ok" to each request; ``requests_on`` lists the connection (1, 2…) each came
    on. With ``close_after``, the upstream hangs up after that many answers on a connection."""
    requests_on: list[int] = []
    accepted = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        connection = accepted
        answered = 0
        while close_after is None or answered < close_after:
            await read_request(reader)
            requests_on.append(connection)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            answered += 1

    return handler, requests_on
