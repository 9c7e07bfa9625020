"""A real TCP proxy on loopback that cuts one connection after N bytes of its answer.

It stands for a network that drops a stream midway (a phone switching networks, a proxy
restarting): the client gets exactly ``cut_after`` bytes of the first answer, then the
connection is closed under it; the relay sees its client leave. Every later connection
passes untouched, so a client that reconnects gets through::

    with Cutter(relay.url, cut_after=300) as cutter:
        ask(cutter.url, ...)
"""

from __future__ import annotations

import socket
import socketserver
import threading
from types import TracebackType
from urllib.parse import urlsplit


class Cutter:
    def __init__(self, upstream_url: str, *, cut_after: int, cuts: int = 1) -> None:
        parts = urlsplit(upstream_url)
        assert parts.hostname and parts.port, upstream_url
        self.upstream = (parts.hostname, parts.port)
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.cut_count = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._cut_done = threading.Event()
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

    def wait_cut(self, timeout: float = 10.0) -> bool:
        return self._cut_done.wait(timeout)

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            cut = self.cuts_left > 0
            if cut:
                self.cuts_left -= 1
        upstream = socket.create_connection(self.upstream, timeout=30)
        try:
            upward = threading.Thread(target=_pump, args=(client, upstream, None), daemon=True)
            upward.start()
            _pump(upstream, client, self.cut_after if cut else None)
            if cut:
                with self._lock:
                    self.cut_count += 1
                self._cut_done.set()
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Cutter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _pump(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
    """Copy ``source`` to ``sink`` until either side closes, or after ``limit`` bytes."""
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
