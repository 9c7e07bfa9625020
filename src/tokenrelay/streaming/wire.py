"""How a logged answer looks on each of tokenrelay's own wires, for the connection that asked
and for a reader that resumes it: the same encoder for both, so the text of a first
connection joined with a resume is byte for byte the text of an uninterrupted one. Pure
bytes, no I/O.

An ending that a wire cannot say in-band (plain text after a failure, or a stop) is ``None``:
the response then breaks the body off, so the client sees an incomplete answer, never one
that looks complete.
"""

from __future__ import annotations

from typing import Protocol

from ..resume.log import Ending
from . import sse


class Wire(Protocol):
    name: str
    content_type: bytes
    ping: bytes | None

    def opening(self, stream_id: str, model: str) -> bytes: ...

    def piece(self, seq: int, text: str) -> bytes: ...

    def ending(self, ending: Ending) -> bytes | None: ...


class SSEWire:
    name = "sse"
    content_type = b"text/event-stream; charset=utf-8"
    ping: bytes | None = sse.PING

    def opening(self, stream_id: str, model: str) -> bytes:
        return sse.start(stream_id, model)

    def piece(self, seq: int, text: str) -> bytes:
        return sse.delta(seq, text)

    def ending(self, ending: Ending) -> bytes:
        return sse.event(ending.kind.encode(), ending.data)


class TextWire:
    name = "text"
    content_type = b"text/plain; charset=utf-8"
    ping: bytes | None = None

    def opening(self, stream_id: str, model: str) -> bytes:
        return b""

    def piece(self, seq: int, text: str) -> bytes:
        return text.encode()

    def ending(self, ending: Ending) -> bytes | None:
        return b"" if ending.kind == "done" else None


WIRES: dict[str, Wire] = {"sse": SSEWire(), "text": TextWire()}
