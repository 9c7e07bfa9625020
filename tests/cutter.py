"""A real TCP proxy on loopback that cuts connections after N bytes of their answer.

It stands for a network that drops a stream midway (a phone switching networks, a proxy
restarting): the client gets exactly ``cut_after`` bytes of the first answer, then the
connection is closed under it; the relay sees its client leave. Every later connection
passes untouched, so a client that reconnects gets through::

    with Cutter(relay.url, cut_after=300) as cutter:
        ask(cutter.url, ...)

``cut_after`` may be a list: the n-th connection is cut after its n-th number of bytes (0:
closed before any answer), those beyond the list pass. ``reroute`` sends every connection
after the first to another server, as a load balancer may send a reconnect elsewhere.
``stall``: a cut connection is not closed but goes silent (a dead network path, a frozen
proxy), until the cutter closes. ``switch_to(url)`` sends every new connection to another
server and closes the open ones under their clients, as a network switch or a failover to
another instance does.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from types import TracebackType
from urllib.parse import urlsplit


class Cutter:
    def __init__(self, upstream_url: str, *, cut_after: int | list[int], reroute: str | None = None,
                 stall: bool = False) -> None:
        self.upstream = _address(upstream_url)
        self.reroute = _address(reroute) if reroute else self.upstream
        self.limits = list(cut_after) if isinstance(cut_after, list) else [cut_after]
        self.stall = stall
        self._closing = threading.Event()
        self.cut_count = 0
        self.connections = 0
        self._target: tuple[str, int] | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        cutter = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                cutter._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            index = self.connections
            self.connections += 1
            target = self._target or (self.upstream if index == 0 else self.reroute)
            self._open.add(client)
        limit = self.limits[index] if index < len(self.limits) else None
        try:
            upstream = socket.create_connection(target, timeout=30)
        except OSError:  # nothing listens there: the client sees its connection closed
            client.close()
            return
        try:
            upward = threading.Thread(target=_pump, args=(client, upstream, None), daemon=True)
            upward.start()
            sent = _pump(upstream, client, limit)
            if limit is not None and sent >= limit:
                with self._lock:
                    self.cut_count += 1
                if self.stall:  # the connection stays open, silent: only a read timeout notices
                    self._closing.wait()
        finally:
            with self._lock:
                self._open.discard(client)
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def switch_to(self, url: str) -> None:
        with self._lock:
            self._target = _address(url)
            cut = list(self._open)
        for sock in cut:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Cutter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


def _pump(source: socket.socket, sink: socket.socket, limit: int | None) -> int:
    """Copy ``source`` to ``sink`` until either side closes, or after ``limit`` bytes; how
    many bytes it copied."""
    sent = 0
    try:
        while limit is None or sent < limit:
            data = source.recv(65536 if limit is None else min(65536, limit - sent))
            if not data:
                break
            sink.sendall(data)
            sent += len(data)
    except OSError:
        pass
    if limit is None:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return sent
