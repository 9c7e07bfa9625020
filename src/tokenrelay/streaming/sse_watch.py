"""Watch an OpenAI chat completions stream pass by without decoding it. Pure bytes, no I/O.

On ``/v1`` the upstream's bytes go to the client as they arrive; tokenrelay only needs to
know a few things about them: did the stream end with ``data: [DONE]``, did an ``error``
event pass, what were the ``usage`` and ``finish_reason``, how many events. Decoding every
event (SSE parse + JSON) would cost more than relaying it, so ``StreamWatch`` looks for
those few byte patterns in each chunk (``bytes.find``/``count`` run in C) and parses JSON
only on the rare lines that contain one — the last two or three events of a stream.

Only complete lines are searched: the incomplete tail of a chunk is kept and joined to the
next, so a pattern split across chunks is still seen. Upstreams send whole events per chunk
almost always, so that join rarely copies anything.
"""

from __future__ import annotations

from typing import Any

import orjson

# Patterns on the lines worth a JSON parse. Compact and spaced JSON both occur upstream.
_MARKERS = (b"[DONE]", b'"error"', b'"usage":{', b'"usage": {', b'"finish_reason":"', b'"finish_reason": "')
_MAX_LINE = 1 << 20  # an incomplete line this long is not an SSE stream worth watching


class StreamWatch:
    __slots__ = ("events", "done", "error", "usage", "finish_reason", "_partial", "_after_newline")

    def __init__(self) -> None:
        self.events = 0
        self.done = False
        self.error: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self._partial = b""
        self._after_newline = False  # the last complete line ended a chunk: "\n" + "\n…" is a blank line

    @property
    def pending(self) -> bool:
        """An incomplete line is waiting for the rest of its bytes (the stream broke midway)."""
        return bool(self._partial)

    def feed(self, chunk: bytes) -> None:
        end = chunk.rfind(b"\n") + 1
        if not end:
            self._partial = (self._partial + chunk)[-_MAX_LINE:]
            return
        complete = self._partial + chunk[:end] if self._partial else (chunk if end == len(chunk) else chunk[:end])
        self._partial = chunk[end:]
        self.events += complete.count(b"\n\n") + (self._after_newline and complete[:1] == b"\n")
        self._after_newline = not self._partial
        for marker in _MARKERS:
            if marker in complete:
                self._inspect(complete)
                return

    def _inspect(self, lines: bytes) -> None:
        """Parse the lines that hold a marker, in stream order, and only those: a chunk can
        hold a whole answer (a relay that fell behind reads more at a time), and going
        through each of its lines in Python would make falling behind cost more per token."""
        starts: set[int] = set()
        for marker in _MARKERS:
            at = lines.find(marker)
            while at != -1:
                start = lines.rfind(b"\n", 0, at) + 1
                starts.add(start)
                # The next one on a later line; none once this line is the last.
                at = lines.find(marker, lines.find(b"\n", at) + 1 or len(lines))
        for start in sorted(starts):
            end = lines.find(b"\n", start)
            self._line(lines[start:] if end == -1 else lines[start:end])

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        if not any(m in data for m in _MARKERS[1:]):
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        if event.get("error"):
            error = event["error"]
            self.error = error if isinstance(error, dict) else {"message": str(error)}
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        for choice in event.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
