"""tokenrelay's own SSE wire format (``Accept: text/event-stream``). Pure bytes, no I/O.

    event: start   data: {"stream_id","model"}
    id: <seq>      data: {"text"}              one per delta, seq from 1
    event: done    data: {"finish_reason","usage"}
    event: error   data: {"error":{"type","message"}}
    : ping                                     a comment in silences, for idle proxies
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import TokenrelayError
from ..providers.base import Usage

PING = b": ping\n\n"


def start(stream_id: str, model: str) -> bytes:
    return b"event: start\ndata: " + orjson.dumps({"stream_id": stream_id, "model": model}) + b"\n\n"


def delta(seq: int, text: str) -> bytes:
    # orjson escapes every newline inside the string, so one data line always suffices.
    return b"id: %d\ndata: {\"text\":%s}\n\n" % (seq, orjson.dumps(text))


def done(finish_reason: str | None, usage: Usage | None) -> bytes:
    return event(b"done", {"finish_reason": finish_reason, "usage": usage.to_dict() if usage else None})


def error(exc: TokenrelayError) -> bytes:
    return b"event: error\ndata: " + exc.body() + b"\n\n"


def event(name: bytes, data: dict[str, Any]) -> bytes:
    """A named event whose data is a JSON object (a job's ``done`` carries its own fields)."""
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"
