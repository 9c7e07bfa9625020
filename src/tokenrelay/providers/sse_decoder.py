"""Server-Sent Events decoder: bytes in, events out, no I/O.

Follows the WHATWG event-stream parsing rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in CRLF, LF or CR; lines starting with ':' are comments; ``data`` fields
accumulate with '\\n'; a blank line dispatches. Chunks may split anywhere — inside a line,
between CR and LF, inside a multi-byte UTF-8 character — because a line is decoded only
once it is complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    __slots__ = ("_pending", "_skip_lf", "_data", "_event", "_id", "_started")

    def __init__(self) -> None:
        self._pending = b""  # an incomplete line carried to the next chunk
        self._skip_lf = False  # the last chunk ended in CR: a leading LF belongs to it
        self._data: list[bytes] = []
        self._event = b""
        self._id: str | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._pending + chunk if self._pending else chunk
        if not self._started and buf:
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._pending = buf
                return []
            self._started = True
            if buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]
        if b"\r" in buf:
            lines = _LINE_END.split(buf)
            if buf.endswith(b"\r"):
                self._skip_lf = True
        else:
            lines = buf.split(b"\n")
        self._pending = lines.pop()
        events: list[ServerSentEvent] = []
        for line in lines:
            self._line(line, events)
        return events

    def close(self) -> bool:
        """End of stream. Per the spec an event without its terminating blank line is
        discarded; returns True when something was discarded (a truncated stream)."""
        truncated = bool(self._pending or self._data)
        self._pending = b""
        self._data = []
        self._event = b""
        return truncated

    def _line(self, line: bytes, events: list[ServerSentEvent]) -> None:
        if not line:
            if self._data:
                data = b"\n".join(self._data).decode("utf-8", "replace")
                event = self._event.decode("utf-8", "replace") or "message"
                events.append(ServerSentEvent(data=data, event=event, id=self._id))
            self._data = []
            self._event = b""
            return
        if line[0] == 0x3A:  # ':' comment
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value
        elif field == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
        # 'retry' and unknown fields are ignored
