"""OpenAI's Responses API streaming events, from deltas. Pure data, no I/O.

Used where the answer does not arrive as Responses events already — the simulator, an
Anthropic upstream, an OpenAI-compatible upstream that serves only chat completions — so
``/v1/responses`` speaks one format whatever answers
(https://platform.openai.com/docs/api-reference/responses-streaming). The shapes are those
the official SDKs parse into their typed models (``openai.types.responses``):

    response.created, response.in_progress (or response.queued for a background response)
    response.output_item.added            a message, or a function call
    response.content_part.added           the message's output_text part
    response.output_text.delta …          the text, as it comes
    response.output_text.done, response.content_part.done, response.output_item.done
    response.function_call_arguments.delta … / .done, response.output_item.done
    response.completed                    the whole Response, with its usage
    response.failed + error               a failure midway: the SDKs raise the ``error`` event
    response.incomplete                   stopped on request (``status: cancelled``)

Every event has a ``sequence_number`` from 0. An event is a dict, written as JSON once: the
same string goes to the client and into the stream log, which is how a resume by
``starting_after`` replays exactly the events the client missed.

``snapshot`` rebuilds the Response object from logged events, for ``GET /v1/responses/{id}``
on any instance that can read the log.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson

from ..errors import TokenrelayError
from ..providers.base import Delta, Usage

Event = dict[str, Any]

TERMINAL = ("response.completed", "response.failed", "response.incomplete")
LIFECYCLE = ("response.created", "response.queued", "response.in_progress", *TERMINAL)


def sse(event: Event) -> tuple[str, bytes]:
    """The event's JSON (what the log keeps) and its SSE frame (what the client reads)."""
    data = orjson.dumps(event)
    return data.decode(), frame(event["type"], data)


def frame(kind: str, data: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def frame_of_piece(piece: str) -> bytes:
    """A logged event as the SSE frame it was sent as."""
    data = piece.encode()
    return frame(str(orjson.loads(data)["type"]), data)


def usage_dict(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


class ResponseEvents:
    """One answer's events, in order; each method returns the events it adds.

    ``echo`` holds the request's fields a Response object repeats (``instructions``,
    ``tools``, ``temperature``, ``max_output_tokens``, ``tool_choice``, …)."""

    def __init__(self, *, id: str, model: str, echo: dict[str, Any] | None = None,
                 created_at: int | None = None) -> None:
        self.id = id
        self.model = model
        self.created_at = int(time.time()) if created_at is None else created_at
        self.echo = echo or {}
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self._text: list[str] | None = None
        """The open message's text so far (None: no message open)."""
        self._message_index = -1
        self._calls: dict[int, int] = {}
        """Tool call index → output index, for the calls still open."""

    # --- the Response object ---

    def response(self, status: str, *, error: dict[str, Any] | None = None) -> dict[str, Any]:
        echo = self.echo
        tools = echo.get("tools") or []
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": bool(echo.get("background")),
            "error": error,
            "incomplete_details": None,
            "instructions": echo.get("instructions"),
            "max_output_tokens": echo.get("max_output_tokens"),
            "metadata": echo.get("metadata") or {},
            "model": self.model,
            "output": [dict(item) for item in self.output],
            "parallel_tool_calls": echo.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "temperature": echo.get("temperature"),
            "text": {"format": {"type": "text"}},
            "tool_choice": echo.get("tool_choice") or "auto",
            "tools": tools,
            "top_p": echo.get("top_p"),
            "truncation": "disabled",
            "usage": usage_dict(self.usage),
        }

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    # --- the events ---

    def start(self, *, queued: bool = False) -> list[Event]:
        if queued:
            return [self._event("response.created", response=self.response("queued")),
                    self._event("response.queued", response=self.response("queued"))]
        return [self._event("response.created", response=self.response("in_progress")),
                *self.running()]

    def running(self) -> list[Event]:
        return [self._event("response.in_progress", response=self.response("in_progress"))]

    def delta(self, delta: Delta) -> list[Event]:
        events: list[Event] = []
        if delta.text:
            if self._text is None:
                events += self._close_calls()
                events += self._open_message()
            assert self._text is not None
            self._text.append(delta.text)
            events.append(self._event("response.output_text.delta", item_id=self.output[self._message_index]["id"],
                                      output_index=self._message_index, content_index=0, delta=delta.text,
                                      logprobs=[]))
        for call in delta.tool_calls:
            if call.index not in self._calls:
                events += self._close_message()
                events += self._open_call(call.index, call.id, call.name)
            index = self._calls[call.index]
            item = self.output[index]
            if call.name and not item["name"]:
                item["name"] = call.name
            if call.arguments:
                item["arguments"] += call.arguments
                events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                          output_index=index, delta=call.arguments))
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.usage is not None:
            self.usage = delta.usage
        return events

    def complete(self) -> list[Event]:
        events = self._close_message() + self._close_calls()
        if self.finish_reason == "length":
            response = self.response("incomplete")
            response["incomplete_details"] = {"reason": "max_output_tokens"}
            return [*events, self._event("response.incomplete", response=response)]
        return [*events, self._event("response.completed", response=self.response("completed"))]

    def fail(self, exc: TokenrelayError) -> list[Event]:
        """A failure midway: ``response.failed`` (what ``GET`` reports), then an ``error``
        event that carries ``error`` too, which is what the SDKs raise as ``APIError``."""
        self._abandon_open_items()
        error = {"code": "server_error", "message": exc.message}
        return [self._event("response.failed", response=self.response("failed", error=error)),
                self._event("error", code=exc.type, message=exc.message, param=None,
                            error={"type": "server_error", "code": exc.type, "message": exc.message,
                                   "param": None})]

    def cancelled(self) -> list[Event]:
        """Stopped on request (``POST /v1/responses/{id}/cancel``) or its client left."""
        self._abandon_open_items()
        return [self._event("response.incomplete", response=self.response("cancelled"))]

    # --- items ---

    def _open_message(self) -> list[Event]:
        index = len(self.output)
        item = {"id": f"msg_{self._item_suffix()}_{index}", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        self.output.append(item)
        self._message_index = index
        self._text = []
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self._event("response.output_item.added", output_index=index, item=_copy(item)),
                self._event("response.content_part.added", item_id=item["id"], output_index=index,
                            content_index=0, part=part)]

    def _close_message(self) -> list[Event]:
        if self._text is None:
            return []
        index = self._message_index
        item = self.output[index]
        text = "".join(self._text)
        self._text = None
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item["content"] = [part]
        item["status"] = "completed"
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=dict(part)),
                self._event("response.output_item.done", output_index=index, item=_copy(item))]

    def _open_call(self, call_index: int, call_id: str | None, name: str | None) -> list[Event]:
        index = len(self.output)
        suffix = self._item_suffix()
        item = {"id": f"fc_{suffix}_{index}", "type": "function_call", "status": "in_progress",
                "call_id": call_id or f"call_{suffix}_{index}", "name": name or "", "arguments": ""}
        self.output.append(item)
        self._calls[call_index] = index
        return [self._event("response.output_item.added", output_index=index, item=_copy(item))]

    def _close_calls(self) -> list[Event]:
        events: list[Event] = []
        for index in sorted(self._calls.values()):
            item = self.output[index]
            item["status"] = "completed"
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, name=item["name"], arguments=item["arguments"]))
            events.append(self._event("response.output_item.done", output_index=index, item=_copy(item)))
        self._calls = {}
        return events

    def _abandon_open_items(self) -> None:
        """An answer cut short keeps its output so far, marked incomplete."""
        if self._text is not None:
            item = self.output[self._message_index]
            item["content"] = [{"type": "output_text", "text": "".join(self._text), "annotations": [],
                                "logprobs": []}]
            item["status"] = "incomplete"
            self._text = None
        for index in self._calls.values():
            self.output[index]["status"] = "incomplete"
        self._calls = {}

    def _item_suffix(self) -> str:
        return self.id.removeprefix("resp_")[:24]


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in item.items()}


def snapshot(pieces: Iterable[str]) -> dict[str, Any] | None:
    """The Response object as the logged events leave it: a finished response's last
    lifecycle event, or a running one's output so far (None: no event yet)."""
    response: dict[str, Any] | None = None
    output: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        event = orjson.loads(piece)
        kind = event.get("type")
        if kind in LIFECYCLE:
            response = event["response"]
            if kind in TERMINAL:
                return response
        elif kind in ("response.output_item.added", "response.output_item.done"):
            output[event["output_index"]] = event["item"]
        elif kind == "response.content_part.added":
            output[event["output_index"]].setdefault("content", []).append(event["part"])
        elif kind == "response.output_text.delta":
            part = output[event["output_index"]]["content"][event["content_index"]]
            part["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            output[event["output_index"]]["arguments"] += event["delta"]
    if response is not None:
        response = {**response, "output": [output[i] for i in sorted(output)]}
    return response
