"""The simulator speaking Anthropic's Messages API (``POST /v1/messages`` of ``tokenrelay
sim``), so tokenrelay's Anthropic upstream is tested against a real server over loopback.

Same answers, options and faults as the OpenAI-compatible face (options ride in the model
name); the stream is Anthropic's event sequence (https://docs.anthropic.com/en/api/messages-streaming):
``message_start``, per block ``content_block_start`` / ``content_block_delta``
(``text_delta`` or ``input_json_delta``) / ``content_block_stop``, ``message_delta`` with
the stop reason and usage, ``message_stop``; a failure midway is an ``error`` event. Like
the real API it refuses a request without ``x-api-key`` or ``anthropic-version``.
"""

from __future__ import annotations

from typing import Any

import anyio
import orjson

from .errors import TokenrelayError, UpstreamError, UpstreamProtocolError, ValidationFailed
from .providers.base import Delta
from .schemas import ChatRequest, chat_from_openai

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


async def stream_messages(completion: Any, send: Any) -> bool:
    """The body of ``sim_server._Completion`` for an Anthropic request: True when complete."""
    deltas = await completion._open(send)
    if deltas is None:
        return False
    from .providers.simulator import prompt_tokens

    enc = MessagesStream(id="msg_" + completion.id.removeprefix("chatcmpl-"), model=completion.model,
                         input_tokens=prompt_tokens(completion.chat))
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    await send({"type": "http.response.body", "body": enc.start(), "more_body": True})
    try:
        async for delta in deltas:
            body = enc.delta(delta)
            if body:
                await send({"type": "http.response.body", "body": body, "more_body": True})
    except UpstreamProtocolError:
        await send({"type": "http.response.body", "body": b'event: content_block_delta\ndata: {"type": \n\n'})
        return False
    except UpstreamError as exc:
        await send({"type": "http.response.body", "body": b"event: error\ndata: " + error_body(exc, 500) + b"\n\n"})
        return False
    finally:
        with anyio.CancelScope(shield=True):
            await deltas.aclose()
    await send({"type": "http.response.body", "body": b""})
    return True


async def whole_message(completion: Any, send: Any) -> bool:
    """A non-streamed Messages answer."""
    from .providers.simulator import prompt_tokens
    from .streaming.openai_chunks import Completion

    deltas = await completion._open(send)
    if deltas is None:
        return False
    answer = Completion()
    try:
        async for delta in deltas:
            answer.add(delta)
    except UpstreamError as exc:
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": error_body(exc, 500)})
        return False
    content: list[dict[str, Any]] = [{"type": "text", "text": "".join(answer.parts)}] if answer.parts else []
    for i in sorted(answer.calls):
        call = answer.calls[i]
        content.append({"type": "tool_use", "id": "toolu_" + str(call["id"]).removeprefix("call_"),
                        "name": call["function"]["name"], "input": orjson.loads(call["function"]["arguments"])})
    body = orjson.dumps({
        "id": "msg_" + completion.id.removeprefix("chatcmpl-"), "type": "message", "role": "assistant",
        "content": content, "model": completion.model,
        "stop_reason": STOP_REASONS.get(answer.finish_reason or "stop", "end_turn"), "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens(completion.chat),
                  "output_tokens": answer.usage.completion_tokens if answer.usage else 0},
    })
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
    return True
