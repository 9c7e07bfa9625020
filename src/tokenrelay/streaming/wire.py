"""How a logged answer looks on each of tokenrelay's own wires, for the connection that asked
and for a reader that resumes it: the same encoder for both, so the text of a first
connection joined with a resume is byte for byte the text of an uninterrupted one. Pure
bytes, no I/O.

An ending that a wire cannot say in-band (plain text after a failure, or a stop) is ``None``:
the response then breaks the body off, so the client sees an incomplete answer, never one
that looks complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import orjson

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


class OpenAIWire:
    """``/v1/chat/completions``: OpenAI's chunks. A piece is one event's data — a
    ``chat.completion.chunk`` as JSON, as the encoder or the upstream wrote it — and goes out
    as ``id: N`` + ``data: …``; the SDKs ignore the ``id:`` line, which the SSE spec allows.
    The ending has no id, as it is not a chunk: ``data: [DONE]`` when done, else one error
    event, ``{"error": {"message", "type", "param", "code"}}``, which the official SDKs raise
    as ``APIError`` — a stopped answer too (code ``stream_stopped``), so a caller never takes
    a stopped answer for a whole one."""

    name = "openai"
    content_type = b"text/event-stream; charset=utf-8"
    ping: bytes | None = sse.PING  # an SSE comment: the SDKs skip it

    def opening(self, stream_id: str, model: str) -> bytes:
        return b""

    def piece(self, seq: int, text: str) -> bytes:
        if "\n" in text:  # an upstream event of several data lines, joined by the log
            return b"id: %d\n%b\n\n" % (seq, b"\n".join(b"data: " + line for line in text.encode().split(b"\n")))
        return openai_event(seq, text.encode())

    def ending(self, ending: Ending) -> bytes:
        if ending.kind == "done":
            return OPENAI_DONE
        return b"data: " + orjson.dumps(openai_error_of(ending)) + b"\n\n"


OPENAI_DONE = b"data: [DONE]\n\n"


def openai_event(seq: int, payload: bytes) -> bytes:
    """One chunk on the ``openai`` wire; the relay's hot path calls it with the JSON it already
    has as bytes, so the first connection's bytes are the replay's by construction."""
    return b"id: %d\ndata: %b\n\n" % (seq, payload)


def openai_error_of(ending: Ending) -> dict[str, Any]:
    """The error event of an ending that is not ``done``. ``/v1`` logs its failures in
    OpenAI's shape (what its client was sent); an error logged in tokenrelay's own shape
    (``{"type", "message"}``) and a stop are put in it here."""
    if ending.kind == "stopped":
        reason = str(ending.data.get("reason") or "stopped")
        why = _STOP_REASONS.get(reason, reason)
        return {"error": {"message": f"the answer was stopped: {why}", "type": "server_error", "param": None,
                          "code": "stream_stopped", "reason": reason}}
    error = ending.data.get("error")
    if not isinstance(error, dict):
        error = {"message": str(error or "the answer failed")}
    if not set(error) <= {"type", "message"}:  # OpenAI's shape, or an upstream's own: as it was sent
        return {"error": error}
    return {"error": {"message": error.get("message", "the answer failed"), "type": "server_error", "param": None,
                      "code": error.get("type", "upstream_error")}}


_STOP_REASONS = {
    "stopped": "DELETE /api/streams/{id} asked for it",
    "abandoned": "nobody read it for its resume grace",
    "client_cancelled": "its client left",
    "shutdown": "the server shut down",
}


def _objects(pieces: list[str]) -> Iterator[dict[str, Any]]:
    """The pieces that are JSON objects, parsed; anything else is passed over."""
    for piece in pieces:
        try:
            value = orjson.loads(piece)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


WIRES: dict[str, Wire] = {"sse": SSEWire(), "text": TextWire(), "openai": OpenAIWire()}


def text_of_events(wire: str, pieces: list[str]) -> str:
    """The answer's text in a stream whose pieces are events: ``/v1`` chat chunks
    (``openai``: each chunk's first choice's ``delta.content``), or the Responses API's events
    (``responses``: its output text deltas). For a status request only, never on the relay's path."""
    parts: list[str] = []
    for event in _objects(pieces):
        if wire == "openai":
            choices = event.get("choices")
            # A passthrough logs the upstream's chunks as sent: anything not in OpenAI's shape adds nothing.
            for choice in choices if isinstance(choices, list) else ():
                delta = choice.get("delta") if isinstance(choice, dict) and choice.get("index", 0) == 0 else None
                text = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(text, str):
                    parts.append(text)
        elif event.get("type") == "response.output_text.delta" and isinstance(event.get("delta"), str):
            parts.append(event["delta"])
    return "".join(parts)
