"""OpenAI's chat completions wire format, from deltas. Pure bytes, no I/O.

Used where the answer does not already arrive in that format — the simulator, an Anthropic
upstream — so ``/v1/chat/completions`` speaks one format whatever answers. Streams are
``data: {chat.completion.chunk}`` events ending in ``data: [DONE]``
(https://platform.openai.com/docs/api-reference/chat-streaming); a failure after the first
byte is a ``data: {"error": …}`` event, which the official SDKs raise as ``APIError``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..errors import TokenrelayError, openai_dict
from ..providers.base import Delta, ToolCallDelta, Usage

DONE = b"data: [DONE]\n\n"


class ChunkEncoder:
    """Encodes one answer's deltas as ``chat.completion.chunk`` events."""

    __slots__ = ("id", "created", "model", "_head", "_json_head", "_text_prefix", "_text_json_prefix")

    _TEXT_SUFFIX = b'},"finish_reason":null}]}\n\n'
    _TEXT_JSON_SUFFIX = b'},"finish_reason":null}]}'

    def __init__(self, *, id: str, model: str, created: int | None = None) -> None:
        self.id = id
        self.model = model
        self.created = int(time.time()) if created is None else created
        head = orjson.dumps({"id": id, "object": "chat.completion.chunk", "created": self.created, "model": model})
        self._json_head = head[:-1]
        self._head = b"data: " + self._json_head
        self._text_json_prefix = self._json_head + b',"choices":[{"index":0,"delta":{"content":'
        self._text_prefix = b"data: " + self._text_json_prefix

    # --- each chunk as its JSON alone, for a relay that numbers and logs its events ---

    def role_json(self) -> bytes:
        return self._json_head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'

    def text_json(self, text: str) -> bytes:
        return self._text_json_prefix + orjson.dumps(text) + self._TEXT_JSON_SUFFIX

    def jsons(self, delta: Delta, *, include_usage: bool) -> list[bytes]:
        """The chunks of ``encode``, each as its JSON: text, tool calls, finish, usage."""
        out: list[bytes] = []
        if delta.text:
            out.append(self.text_json(delta.text))
        if delta.tool_calls:
            calls = orjson.dumps([c.to_dict() for c in delta.tool_calls])
            out.append(self._json_head + b',"choices":[{"index":0,"delta":{"tool_calls":' + calls
                       + self._TEXT_JSON_SUFFIX)
        if delta.finish_reason is not None:
            out.append(self._json_head + b',"choices":[{"index":0,"delta":{},"finish_reason":'
                       + orjson.dumps(delta.finish_reason) + b"}]}")
        if delta.usage is not None and include_usage:
            out.append(self._json_head + b',"choices":[],"usage":' + orjson.dumps(delta.usage.to_dict()) + b"}")
        return out

    # --- whole events (``data: …``), for a stream nobody resumes (the simulator's own) ---

    def role(self) -> bytes:
        return self._head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'

    def text(self, text: str) -> bytes:
        # The hot path: one orjson call per token.
        return self._text_prefix + orjson.dumps(text) + self._TEXT_SUFFIX

    def delta(self, delta: Delta) -> bytes:
        """The chunks for one delta (text, tool-call fragments, finish reason); usage apart."""
        out = b""
        if delta.text:
            out = self.text(delta.text)
        if delta.tool_calls:
            calls = orjson.dumps([c.to_dict() for c in delta.tool_calls])
            out += self._head + b',"choices":[{"index":0,"delta":{"tool_calls":' + calls + self._TEXT_SUFFIX
        if delta.finish_reason is not None:
            out += (self._head + b',"choices":[{"index":0,"delta":{},"finish_reason":'
                    + orjson.dumps(delta.finish_reason) + b"}]}\n\n")
        return out

    def encode(self, delta: Delta, *, include_usage: bool) -> bytes:
        """The chunks for one Delta: its text, tool calls or finish, then its usage when the
        client asked for usage (``stream_options.include_usage``). Empty when none apply."""
        if delta.tool_calls or delta.finish_reason is not None:
            body = self.delta(delta)
        elif delta.text:
            body = self.text(delta.text)
        else:
            body = b""
        if delta.usage is not None and include_usage:
            body += self.usage(delta.usage)
        return body

    def usage(self, usage: Usage) -> bytes:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        return self._head + b',"choices":[],"usage":' + orjson.dumps(usage.to_dict()) + b"}\n\n"


def error_event(exc: TokenrelayError) -> bytes:
    return b"data: " + orjson.dumps(openai_dict(exc)) + b"\n\n"


class Completion:
    """Deltas gathered into one ``chat.completion`` object (``"stream": false``)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def add(self, delta: Delta) -> None:
        if delta.text:
            self.parts.append(delta.text)
        for call in delta.tool_calls:
            self._add_call(call)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.usage is not None:
            self.usage = delta.usage

    def _add_call(self, call: ToolCallDelta) -> None:
        entry = self.calls.setdefault(
            call.index, {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        )
        if call.id is not None:
            entry["id"] = call.id
        if call.name is not None:
            entry["function"]["name"] = call.name
        entry["function"]["arguments"] += call.arguments

    def body(self, *, id: str, model: str, created: int | None = None) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.parts) if self.parts or not self.calls
                                   else None}
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return orjson.dumps({
            "id": id,
            "object": "chat.completion",
            "created": int(time.time()) if created is None else created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}],
            "usage": self.usage.to_dict() if self.usage else None,
        })
