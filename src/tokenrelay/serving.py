"""Connection-level limits for ``tokenrelay serve``, enforced before any request reaches the app.

uvicorn bounds an idle kept-alive connection (``timeout_keep_alive``) and, with h11, the size
of an unfinished request head (``h11_max_incomplete_event_size``), but nothing else: a
connection that never sends a byte, a head sent one byte a minute, a 100 MB header on
httptools (which has no size limit) or a body that never ends are all held forever, each
holding a file descriptor and memory, before the key check can run. ``GuardedHttp`` adds
those limits to uvicorn's own protocol classes (httptools or h11), as nginx's
``client_header_timeout``, ``client_body_timeout`` and ``large_client_header_buffers`` do:

- a request head must arrive within ``header_timeout`` of the connection's (or, on a
  kept-alive connection, the next request's) first byte, and be at most ``max_header_bytes``;
  else 408 or 431 and the connection is closed;
- a request body must arrive within ``body_timeout`` of its head; else 408 and close;
- at most ``max_connections`` connections or requests at once; more get a JSON 503 and close
  (uvicorn's ``limit_concurrency`` check, answering in tokenrelay's error shape).

uvicorn calls ``config.http_protocol_class(config=…, server_state=…, app_state=…)``; an
instance of the frozen ``GuardedHttp`` is such a callable, and pickles for ``--workers``.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
import logging
import resource
from dataclasses import dataclass
from typing import Any, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import HeadersTooLarge, Overloaded, RequestTimeout, TokenrelayError

log = logging.getLogger("tokenrelay.server")

FD_HEADROOM = 64
"""Files a process needs besides its client connections: logs, SQLite, Redis, listeners."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_header_bytes: int
    max_connections: int


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (allowed without privileges);
    the soft limit in force afterwards. Many systems start processes at 1024 (or 256), far
    fewer than the streams a process can hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. macOS caps it below RLIM_INFINITY
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def default_max_connections(fd_limit: int) -> int:
    """Half the open files, less headroom: a stream holds a client and an upstream socket."""
    return max(16, (fd_limit - FD_HEADROOM) // 2)


def _raw_response(exc: TokenrelayError) -> bytes:
    body = exc.body()
    reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}.get(exc.status, b"Error")
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (exc.status, reason),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
        body,
    ])


class _Admission:
    """The connection limit, in front of the app. Decided before the app runs, so it returns
    the app's coroutine rather than awaiting it: no frame of its own beside each stream."""

    __slots__ = ("app", "connections", "limit", "tasks")

    def __init__(self, app: Any, limit: int, connections: Any, tasks: Any) -> None:
        self.app, self.limit, self.connections, self.tasks = app, limit, connections, tasks

    def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        # The request's own connection and task are counted already: more than the limit.
        limit = self.limit
        if scope["type"] == "http" and (len(self.connections) > limit or len(self.tasks) > limit):
            return self._refuse(send)
        return self.app(scope, receive, send)

    async def _refuse(self, send: Any) -> None:
        log.warning("refused a request: %d connections open, at most %d (TOKENRELAY_MAX_CONNECTIONS)",
                    len(self.connections), self.limit)
        exc = Overloaded(f"the server is at its limit of {self.limit} connections; retry shortly",
                         headers={"retry-after": "1", "connection": "close"})
        await send({"type": "http.response.start", "status": exc.status,
                    "headers": [(b"content-type", b"application/json"),
                                *((k.encode(), v.encode()) for k, v in exc.headers.items())]})
        await send({"type": "http.response.body", "body": exc.body()})


_ADMISSIONS: weakref.WeakKeyDictionary[Any, _Admission] = weakref.WeakKeyDictionary()


class _GuardState:
    __slots__ = ("got_bytes", "head_bytes", "in_head", "limits", "phase", "timer")

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.head_bytes = 0
        self.got_bytes = False
        self.timer: asyncio.TimerHandle | None = None
        self.phase: Literal["head", "body"] | None = None
        self.in_head = True  # httptools: the parser is in a request's head


class _Guard:
    """The limits, mixed into a uvicorn protocol class (``_H11`` / ``_HttpTools``)."""

    _g: _GuardState

    # Provided by the uvicorn protocol this is mixed into.
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    app: Any
    connections: set[Any]
    tasks: set[Any]
    limit_concurrency: int | None
    client: tuple[str, int] | None

    # The parser's own handlers, wrapped: the mixed-in protocol class comes after _Guard in
    # the MRO, so super() reaches it.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._on_connect()

    def data_received(self, data: bytes) -> None:
        self._before_data(data)
        super().data_received(data)  # type: ignore[misc]
        self._after_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _guard(self, limits: ConnectionLimits) -> None:
        # One attribute, not one per field: uvicorn's protocol has 27, and past 30 an
        # instance's attributes no longer share their keys with the class's other instances —
        # about 1.3 KB more per open connection (docs/performance.md, memory per stream).
        self._g = _GuardState(limits)
        self.limit_concurrency = None  # checked by _admit instead, to answer in JSON
        if limits.max_connections:
            self.app = self._admit(self.app, limits.max_connections)

    def _admit(self, app: Any, limit: int) -> Any:
        # One admission per server, not a closure per connection (memory per open stream).
        admission = _ADMISSIONS.get(app)
        if admission is None or admission.connections is not self.connections or admission.limit != limit:
            admission = _ADMISSIONS[app] = _Admission(app, limit, self.connections, self.tasks)
        return admission

    # -- what the mixed-in parser says about the current request
    def _head_pending(self) -> bool:
        raise NotImplementedError

    def _body_pending(self) -> bool:
        cycle = self.cycle
        return bool(cycle is not None and cycle.more_body and not cycle.response_complete
                    and not cycle.disconnected)

    def _busy(self) -> bool:
        cycle = self.cycle
        return bool(cycle is not None and not cycle.response_complete)

    # -- timers
    def _arm(self, phase: Literal["head", "body"], seconds: float) -> None:
        self._disarm()
        g = self._g
        g.phase = phase
        g.timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        g = self._g
        if g.timer is not None:
            g.timer.cancel()
        g.timer = None
        g.phase = None

    def _expired(self) -> None:
        g = self._g
        phase, g.timer, g.phase = g.phase, None, None
        if self.transport.is_closing():
            return
        if phase == "head":
            if self._busy():  # the previous response still streams: its head is not late yet
                self._arm("head", g.limits.header_timeout)
                return
            if not g.got_bytes:  # an idle connection (a browser's preconnect): just close it
                self.transport.close()
                return
            self._refuse(RequestTimeout(f"the request head did not arrive within {g.limits.header_timeout:g} s"))
        else:
            self._refuse(RequestTimeout(f"the request body did not arrive within {g.limits.body_timeout:g} s"))

    def _refuse(self, exc: TokenrelayError) -> None:
        client = "%s:%d" % self.client if self.client else "?"
        log.info("closed the connection from %s: %s %s", client, exc.status, exc.message)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # too late for a status: the close says it
                self.transport.close()
                return
            # The app's receive() now says the client left; its own response is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(_raw_response(exc))
        self.transport.close()

    # -- hooks, called from the protocol's own methods
    def _on_connect(self) -> None:
        self._arm("head", self._g.limits.header_timeout)

    def _before_data(self, data: bytes) -> None:
        g = self._g
        g.got_bytes = g.got_bytes or bool(data)
        if g.phase is None and self._head_pending():  # the first byte of a kept-alive request
            g.head_bytes = 0
            self._arm("head", g.limits.header_timeout)

    def _after_data(self, data: bytes) -> None:
        if self.transport.is_closing():
            self._disarm()
            return
        g = self._g
        if self._head_pending():
            g.head_bytes += len(data)
            if g.head_bytes > g.limits.max_header_bytes:
                self._refuse(HeadersTooLarge(
                    f"the request head is larger than {g.limits.max_header_bytes} bytes"))
            return
        g.head_bytes = 0
        if self._body_pending():
            if g.phase != "body":
                self._arm("body", g.limits.body_timeout)
        else:
            self._disarm()


class _H11(_Guard, H11Protocol):
    def __init__(self, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._guard(limits)

    def _head_pending(self) -> bool:
        return bool(self.conn.their_state is h11.IDLE)


@functools.cache
def _httptools_class() -> type[Any]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _HttpTools(_Guard, HttpToolsProtocol):
        def __init__(self, limits: ConnectionLimits, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._guard(limits)

        def _head_pending(self) -> bool:
            return self._g.in_head

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._g.in_head = True

        def on_headers_complete(self) -> None:
            self._g.in_head = False
            super().on_headers_complete()

    return _HttpTools


@dataclass(frozen=True, slots=True)
class GuardedHttp:
    """uvicorn's ``http`` option: makes one guarded protocol per connection."""

    limits: ConnectionLimits
    parser: Literal["httptools", "h11"]

    def __call__(self, **kwargs: Any) -> asyncio.Protocol:
        cls = _httptools_class() if self.parser == "httptools" else _H11
        protocol: asyncio.Protocol = cls(self.limits, **kwargs)
        return protocol


def uvicorn_options(limits: ConnectionLimits, parser: Literal["httptools", "h11"], *,
                    keepalive_timeout: int) -> dict[str, Any]:
    """The keyword arguments for ``uvicorn.Config`` / ``uvicorn.run`` that apply the limits."""
    return {
        "http": GuardedHttp(limits, parser),
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        "timeout_keep_alive": keepalive_timeout,
    }
