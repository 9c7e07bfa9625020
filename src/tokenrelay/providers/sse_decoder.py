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

from ..errors import UpstreamProtocolError

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


MAX_LINE = 4 << 20
"""Bytes of one line, and of one event's data, before the stream is refused as broken. An
event is a token or two — a few hundred bytes; a whole answer sent as one event is still far
below this. Past it, an upstream that never ends its line would have tokenrelay hold it all."""


_JOIN_BELOW = 16 << 10
"""An unfinished line shorter than this is joined with the next read and searched again; a
longer one is kept in pieces, so that a line arriving in many reads costs linear time."""


class SSELineTooLong(UpstreamProtocolError):
    pass


class NotUTF8(UpstreamProtocolError):
    pass


class SSEDecoder:
    __slots__ = ("_pending", "_pending_size", "_skip_lf", "_data", "_data_size", "_event", "_id", "_started")

    def __init__(self) -> None:
        # An incomplete line carried to the next chunk, in pieces: joined once, when its end
        # arrives, so a long line costs time linear in its length.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._skip_lf = False  # the last chunk ended in CR: a leading LF belongs to it
        self._data: list[bytes] = []
        self._data_size = 0
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
        events: list[ServerSentEvent] = []
        if not self._started:
            buf = b"".join(self._pending) + chunk
            self._pending, self._pending_size = [], 0
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._pending, self._pending_size = [buf], len(buf)
                return []
            self._started = True
            chunk = buf[3:] if buf.startswith(b"\xef\xbb\xbf") else buf
        elif self._pending_size < _JOIN_BELOW:
            # The usual case — an event split across two reads: one join is the cheapest.
            if self._pending:
                chunk = self._pending[0] + chunk if len(self._pending) == 1 else b"".join(self._pending) + chunk
                self._pending, self._pending_size = [], 0
        else:
            # A long line: only the new bytes are searched for its end, and it is joined once.
            end = _LINE_END.search(chunk)
            if end is None:
                self._hold(chunk)
                return []
            self._pending.append(chunk[:end.start()])
            line = b"".join(self._pending)
            self._pending, self._pending_size = [], 0
            if end.group() == b"\r" and end.end() == len(chunk):
                self._skip_lf = True
            chunk = chunk[end.end():]
            self._line(line, events)
        if not chunk:
            return events
        if b"\r" in chunk:
            lines = _LINE_END.split(chunk)
            if chunk.endswith(b"\r"):
                self._skip_lf = True
        else:
            lines = chunk.split(b"\n")
        tail = lines.pop()
        for line in lines:
            self._line(line, events)
        if tail:
            self._hold(tail)
        return events

    def feed_data(self, chunk: bytes) -> list[str]:
        """The data of each event the chunk completes, for a reader that needs nothing else
        (an OpenAI stream's reader). Where a read — with the unfinished line before it — is
        whole ``data: …`` events of one line each, up to an unfinished last one (nearly every
        read from a model API), those events are split with a few whole-read scans and one
        decode instead of line by line; anything else takes ``feed``'s path."""
        if (self._started and not self._data and not self._event and not self._skip_lf
                and self._pending_size < _JOIN_BELOW and b"\r" not in chunk):
            pending = self._pending
            buf = (pending[0] + chunk if len(pending) == 1 else b"".join(pending) + chunk) if pending else chunk
            cut = buf.rfind(b"\n\n") + 2
            if cut > 2 and buf.startswith(b"data: ") and cut <= MAX_LINE:
                head = buf[:cut] if cut < len(buf) else buf
                events = head.count(b"\n\n")
                # Every newline belongs to an event's end, and every event is one data line.
                if head.count(b"\n") == 2 * events and head.count(b"\n\ndata: ") == events - 1:
                    try:
                        data = head[6:-2].decode().split("\n\ndata: ")
                    except UnicodeDecodeError as exc:
                        self._pending, self._pending_size = [], 0
                        raise NotUTF8(f"upstream sent bytes that are not UTF-8 in its event stream: {exc}") from None
                    self._pending, self._pending_size = [], 0
                    if cut < len(buf):  # the next event, unfinished: its own path
                        data.extend(event.data for event in self.feed(buf[cut:]))
                    return data
        return [event.data for event in self.feed(chunk)]

    def _hold(self, piece: bytes) -> None:
        self._pending.append(piece)
        self._pending_size += len(piece)
        if self._pending_size > MAX_LINE:
            self._pending, self._pending_size = [], 0
            raise SSELineTooLong(f"upstream sent an event-stream line longer than {MAX_LINE >> 20} MiB")

    def close(self) -> bool:
        """End of stream. Per the spec an event without its terminating blank line is
        discarded; returns True when something was discarded (a truncated stream)."""
        truncated = bool(self._pending or self._data)
        self._pending, self._pending_size = [], 0
        self._data, self._data_size = [], 0
        self._event = b""
        return truncated

    def _line(self, line: bytes, events: list[ServerSentEvent]) -> None:
        if not line:
            lines, name = self._data, self._event
            self._data, self._data_size = [], 0
            self._event = b""
            if lines:
                try:
                    # Strict, not the spec's replacement characters: a token turned into
                    # U+FFFD would reach the client as an answer that looks whole.
                    data, event = b"\n".join(lines).decode(), name.decode() or "message"
                except UnicodeDecodeError as exc:
                    raise NotUTF8(f"upstream sent bytes that are not UTF-8 in its event stream: {exc}") from None
                events.append(ServerSentEvent(data=data, event=event, id=self._id))
            return
        if line[0] == 0x3A:  # ':' comment
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > MAX_LINE:
                self._data, self._data_size = [], 0
                raise SSELineTooLong(f"upstream sent an event larger than {MAX_LINE >> 20} MiB")
        elif field == b"event":
            self._event = value
        elif field == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
        # 'retry' and unknown fields are ignored
