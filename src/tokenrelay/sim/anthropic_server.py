"""The simulator speaking Anthropic's Messages API (``POST /v1/messages`` of ``tokenrelay
sim``, served by ``openai_server``), so tokenrelay's Anthropic upstream is tested against a real server over loopback.

Same answers, options and faults as the OpenAI-compatible face (options ride in the model
name); the stream is Anthropic's event sequence (https://docs.anthropic.com/en/api/messages-streaming):
``message_start``, per block ``content_block_start`` / ``content_block_delta``
(``text_delta`` or ``input_json_delta``) / ``content_block_stop``, ``message_delta`` with
the stop reason and usage, ``message_stop``; a failure midway is an ``error`` event. Like
the real API it refuses a request without ``x-api-key`` or ``anthropic-version``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import TokenrelayError, UpstreamError, UpstreamProtocolError, ValidationFailed
from ..providers.base import Delta
from ..schemas import ChatRequest, chat_from_openai
from ..streaming.relay import collect
from ..streaming.response import Body
from .provider import prompt_tokens

if TYPE_CHECKING:
    from .openai_server import SimAnswer

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def chat_from_messages(body: dict[str, Any]) -> ChatRequest:
    """An Anthropic Messages body as the simulator's ``ChatRequest``."""
    if not isinstance(body.get("max_tokens"), int):
        raise ValidationFailed("max_tokens: Field required")
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": _text(body["system"])})
    for m in body.get("messages") or ():
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ValidationFailed("messages: each message must have the role 'user' or 'assistant'")
        messages.append({"role": m["role"], "content": _text(m.get("content"))})
    tools = [{"type": "function", "function": {"name": t.get("name"), "parameters": t.get("input_schema")}}
             for t in body.get("tools") or () if isinstance(t, dict)]
    return chat_from_openai({"model": body.get("model"), "messages": messages, "tools": tools or None})


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or ():
        if isinstance(block, dict):
            if block.get("type") == "text":
                parts.append(str(block.get("text", "")))
            elif block.get("type") == "tool_result":
                parts.append(_text(block.get("content")))
    return "".join(parts)


def error_body(exc: TokenrelayError, status: int) -> bytes:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": getattr(exc, "reason", "") or exc.message}})


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


class MessagesStream:
    """Deltas → Anthropic stream events, keeping track of the open content block."""

    def __init__(self, *, id: str, model: str, input_tokens: int) -> None:
        self.id, self.model, self.input_tokens = id, model, input_tokens
        self.block = -1  # index of the open content block; -1: none
        self.block_kind = ""

    def start(self) -> bytes:
        return event("message_start", {"message": {
            "id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 1}}}) + event("ping", {})

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.block += 1
        self.block_kind = kind
        return out + event("content_block_start", {"index": self.block, "content_block": block})

    def _close(self) -> bytes:
        if not self.block_kind:
            return b""
        self.block_kind = ""
        return event("content_block_stop", {"index": self.block})

    def delta(self, delta: Delta) -> bytes:
        out = b""
        if delta.text:
            if self.block_kind != "text":
                out += self._open("text", {"type": "text", "text": ""})
            out += event("content_block_delta", {"index": self.block,
                                                 "delta": {"type": "text_delta", "text": delta.text}})
        for call in delta.tool_calls:
            if call.id is not None:
                out += self._open("tool_use", {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"),
                                               "name": call.name, "input": {}})
            if call.arguments:
                out += event("content_block_delta", {"index": self.block, "delta": {
                    "type": "input_json_delta", "partial_json": call.arguments}})
        if delta.finish_reason is not None:
            out += self._close()
            output = delta.usage.completion_tokens if delta.usage else 0
            out += event("message_delta", {"delta": {"stop_reason": STOP_REASONS.get(delta.finish_reason, "end_turn"),
                                                     "stop_sequence": None}, "usage": {"output_tokens": output}})
            out += event("message_stop", {})
        return out


async def stream_messages(answer: SimAnswer, deltas: AsyncIterator[Delta]) -> Body:
    """The body of a streamed Messages answer (``openai_server.SimAnswer``)."""
    enc = MessagesStream(id="msg_" + answer.id.removeprefix("chatcmpl-"), model=answer.model,
                         input_tokens=prompt_tokens(answer.chat))
    answer.headers.append((b"content-type", b"text/event-stream"))
    try:
        yield enc.start()
        async for delta in deltas:
            body = enc.delta(delta)
            if body:
                yield body
    except UpstreamProtocolError:
        yield b'event: content_block_delta\ndata: {"type": \n\n'
        return
    except UpstreamError as exc:
        yield b"event: error\ndata: " + error_body(exc, 500) + b"\n\n"
        return
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
    answer.complete = True


async def whole_message(answer: SimAnswer, deltas: AsyncIterator[Delta]) -> Body:
    """A non-streamed Messages answer."""
    whole = await collect(deltas)
    content: list[dict[str, Any]] = [{"type": "text", "text": "".join(whole.parts)}] if whole.parts else []
    for i in sorted(whole.calls):
        call = whole.calls[i]
        content.append({"type": "tool_use", "id": "toolu_" + str(call["id"]).removeprefix("call_"),
                        "name": call["function"]["name"], "input": orjson.loads(call["function"]["arguments"])})
    body = orjson.dumps({
        "id": "msg_" + answer.id.removeprefix("chatcmpl-"), "type": "message", "role": "assistant",
        "content": content, "model": answer.model,
        "stop_reason": STOP_REASONS.get(whole.finish_reason or "stop", "end_turn"), "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens(answer.chat),
                  "output_tokens": whole.usage.completion_tokens if whole.usage else 0},
    })
    answer.headers.append((b"content-type", b"application/json"))
    yield body
    answer.complete = True
