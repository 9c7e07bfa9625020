"""``StreamLog``: one answer as it is written — its pieces of text, numbered from 1, and how
it ended — for the connection that asked and for any reader that comes back for it.

The text is kept as UTF-8 in one ``bytearray`` with the end offset of each piece beside it
(4 bytes a piece), not as a list of strings: an open stream costs a few hundred bytes of
log, and a piece is found again by its number without keeping an object per piece. Pieces
end on character boundaries (each was a whole string), so a piece decodes on its own, and a
plain-text reader can resume from any byte offset it counted.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import TokenrelayError

EndKind = Literal["done", "error", "stopped"]


@dataclass(frozen=True, slots=True)
class Ending:
    """How an answer ended: ``done`` (its finish reason and usage), ``error`` (what failed:
    ``{"error": {"type", "message"}}``) or ``stopped`` (why, and the usage so far)."""

    kind: EndKind
    data: dict[str, Any]

    @property
    def status(self) -> str:
        return {"done": "completed", "error": "failed", "stopped": "stopped"}[self.kind]


class StreamTooLarge(TokenrelayError):
    status = 502
    type = "stream_too_large"


class StreamLog:
    __slots__ = ("_count", "_ends", "_size", "_text", "_waiters", "backlog", "ending", "finished_at", "max_bytes",
                 "tee")

    def __init__(self, *, max_bytes: int, tee: Callable[[int, str], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.tee = tee
        """Where the pieces are kept instead (Redis, ``resume.redis``): the log then only counts
        them, so the process holds no copy of an answer the shared store already has."""
        self.backlog: Callable[[], Awaitable[None] | None] | None = None
        """With ``tee``: something to wait for before the next piece while the store is far
        behind but working (an upstream faster than Redis), so the backlog stays bounded."""
        self._text = bytearray()
        self._ends = array("I")
        self._count = 0
        self._size = 0
        self._waiters: list[asyncio.Future[None]] = []
        self.ending: Ending | None = None
        self.finished_at: float | None = None

    @property
    def last_seq(self) -> int:
        return self._count

    @property
    def size(self) -> int:
        return self._size

    def append(self, text: str) -> int:
        """Add the next piece; its number. Past ``max_bytes`` the answer is refused, so one
        runaway stream cannot take the memory every other stream shares."""
        data = text.encode()
        if self._size + len(data) > self.max_bytes:
            raise StreamTooLarge(f"the answer grew past {self.max_bytes} bytes, the most a stream keeps "
                                 "(TOKENRELAY_STREAM_MAX_BYTES)")
        self._size += len(data)
        self._count += 1
        if self.tee is not None:
            self.tee(self._count, text)
            return self._count
        self._text += data
        self._ends.append(self._size)
        if self._waiters:
            self._wake()
        return self._count

    def end(self, ending: Ending) -> None:
        """The answer's last event; only the first ending counts."""
        if self.ending is None:
            self.ending = ending
            self.finished_at = time.monotonic()
            self._wake()

    def piece(self, seq: int) -> str:
        start = self._ends[seq - 2] if seq > 1 else 0
        return self._text[start:self._ends[seq - 1]].decode()

    def text(self, offset: int = 0) -> bytes:
        """The answer so far as UTF-8, from byte ``offset``."""
        return bytes(self._text[offset:])

    async def follow(self, after: int = 0) -> AsyncIterator[tuple[int, str] | Ending]:
        """Every piece after ``after``, as it comes, then the ending."""
        seq = after
        while True:
            while seq < self._count:
                seq += 1
                yield seq, self.piece(seq)
            if self.ending is not None:
                yield self.ending
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
