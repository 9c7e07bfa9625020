"""An Anthropic Messages API upstream (``POST {base}/messages``), normalized into deltas.

The request is translated from OpenAI's chat completions shape: ``system`` messages become
the top-level ``system``, tool definitions ``tools[].input_schema``, assistant tool calls
``tool_use`` blocks, ``tool`` messages ``tool_result`` blocks, and ``max_tokens`` (required
by Anthropic) defaults to ``DEFAULT_MAX_TOKENS``. The streamed events
(https://docs.anthropic.com/en/api/messages-streaming) map onto the same ``Delta``s as an
OpenAI stream: ``text_delta`` → text, ``tool_use`` block start → a tool call's id and name,
``input_json_delta`` → its argument fragments, ``message_delta`` → finish reason and usage,
``error`` → ``UpstreamError``. ``/v1`` then writes them as ``chat.completion.chunk``s and
``/api/get-response`` as text or SSE, as for any provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import orjson
from pydantic import ValidationError
from yarl import URL

from ..errors import UpstreamError, UpstreamProtocolError, ValidationFailed
from ..schemas import ChatRequest, describe_validation, message_text, parse_openai_body
from .sse_decoder import SSEDecoder
from .base import Delta, OpenAIRequest, ToolCallDelta, Usage, event_object
from .http import SSE_REQUEST_HEADERS, UpstreamClient, UpstreamResponse, answers_models

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                "pause_turn": "stop", "refusal": "content_filter"}


class Anthropic:
    def __init__(self, *, base_url: str, api_key: str | None, client: UpstreamClient, label: str) -> None:
        self.url = URL(base_url.rstrip("/") + "/messages")
        self.models_url = URL(base_url.rstrip("/") + "/models")
        self.label = label
        self._client = client
        self._headers = {**SSE_REQUEST_HEADERS, "anthropic-version": API_VERSION}
        if api_key:
            self._headers["x-api-key"] = api_key

    async def open(self, request: ChatRequest, *, model: str) -> AsyncIterator[Delta]:
        body: dict[str, Any] = {"messages": [{"role": m.role, "content": m.content} for m in request.messages]}
        if request.tools:
            body["tools"] = request.tools
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        return await self._open(body, model=model)

    async def open_openai(self, request: OpenAIRequest, *, model: str) -> AsyncIterator[Delta]:
        """Translates the whole OpenAI body, tool definitions and tool results too."""
        return await self._open(request.body, model=model)

    async def _open(self, body: dict[str, Any], *, model: str) -> AsyncIterator[Delta]:
        payload = orjson.dumps(messages_body(body, model))
        response = await self._client.post_stream(self.url, payload, self._headers)
        return self._deltas(response)

    async def _deltas(self, response: UpstreamResponse) -> AsyncIterator[Delta]:
        try:
            async for delta in message_deltas(response):
                yield delta
        finally:
            response.close()

    async def models(self) -> list[str]:
        return []  # routes name their Anthropic models (``models`` in the route)

    async def check_ready(self, *, timeout: float) -> str | None:
        headers = {k: v for k, v in self._headers.items() if k in ("x-api-key", "anthropic-version")}
        return await answers_models(self._client, self.models_url, headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._client.aclose()


async def message_deltas(chunks: AsyncIterable[bytes]) -> AsyncIterator[Delta]:
    """A streamed Messages body, however its bytes are split, as deltas; it stops at
    ``message_stop`` and raises ``UpstreamError`` for an error event or a stream cut short."""
    decoder = SSEDecoder()
    events = EventMapper()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            try:
                delta = events.map(event.data)
            except (AttributeError, LookupError, TypeError, ValueError):
                # JSON, but not an event's shape (a string for an object, text that is a number)
                raise UpstreamProtocolError(f"upstream sent an event that is not a Messages event: "
                                            f"{event.data[:80]!r}") from None
            if delta is not None:
                yield delta
            if events.stopped:
                return
    raise UpstreamProtocolError("upstream closed the stream before message_stop")


class EventMapper:
    """Anthropic stream events (their JSON data) → deltas, one event at a time."""

    def __init__(self) -> None:
        self.stopped = False
        self._tools: dict[int, int] = {}  # content block index → tool call index
        self._input_tokens = 0
        self._output_tokens = 0
        self._finish: str | None = None

    def map(self, data: str) -> Delta | None:
        event = event_object(data)
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                text = delta.get("text")
                if text is not None and not isinstance(text, str):
                    raise TypeError("text_delta text is not a string")
                return Delta(text=text) if text else None
            if delta.get("type") == "input_json_delta" and event.get("index") in self._tools:
                fragment = str(delta.get("partial_json") or "")
                return Delta(tool_calls=(ToolCallDelta(self._tools[event["index"]], fragment),)) if fragment else None
            return None  # thinking, citations: not part of an OpenAI answer
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tools[event.get("index", 0)] = len(self._tools)
                return Delta(tool_calls=(ToolCallDelta(index, "", id=str(block.get("id")),
                                                       name=str(block.get("name"))),))
            if block.get("type") == "text" and block.get("text"):
                return Delta(text=str(block["text"]))
            return None
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            self._input_tokens = int(usage.get("input_tokens") or 0)
            self._output_tokens = int(usage.get("output_tokens") or 0)
            return None
        if kind == "message_delta":
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason:
                self._finish = STOP_REASONS.get(reason, "stop")
            usage = event.get("usage") or {}
            self._output_tokens = int(usage.get("output_tokens") or self._output_tokens)
            self._input_tokens = int(usage.get("input_tokens") or self._input_tokens)
            return None
        if kind == "message_stop":
            self.stopped = True
            prompt, completion = self._input_tokens, self._output_tokens
            return Delta(finish_reason=self._finish or "stop", usage=Usage(prompt, completion, prompt + completion))
        if kind == "error":
            error = event.get("error") or {}
            raise UpstreamError(f"upstream sent an error: {error.get('message') or error.get('type') or error}")
        return None  # ping, content_block_stop, and events added later


def messages_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI chat completions body as an Anthropic Messages body (always streamed).

    The body is checked first (``schemas.OpenAIChatBody``: ``/v1`` has done so already, a
    ``ChatRequest`` from ``/api`` or a job is a subset), so every field read here has its type."""
    try:
        parse_openai_body(body)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation(exc)) from None
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if messages and messages[-1]["role"] == role:  # Anthropic wants roles to alternate
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in body.get("messages") or ():
        role = m.get("role")
        text = message_text(m.get("content"))
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            add("user", [{"type": "text", "text": text}])
        elif role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            for call in m.get("tool_calls") or ():
                function = call.get("function") or {}
                try:
                    arguments = orjson.loads(function.get("arguments") or "{}")
                except orjson.JSONDecodeError:
                    raise ValidationFailed("messages: tool call arguments must be JSON") from None
                if not isinstance(arguments, dict):
                    raise ValidationFailed("messages: tool call arguments must be a JSON object")
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                               "input": arguments})
            if blocks:
                add("assistant", blocks)
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id"), "content": text}])
        else:
            raise ValidationFailed(f"messages: role {role!r} cannot be sent to an Anthropic upstream")
    out: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS,
        "stream": True,
    }
    if system:
        out["system"] = "\n\n".join(system)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = [t["function"] for t in body.get("tools") or () if isinstance(t, dict) and t.get("function")]
    if tools:
        out["tools"] = [{"name": f.get("name"), "description": f.get("description") or "",
                         "input_schema": f.get("parameters") or {"type": "object", "properties": {}}} for f in tools]
        choice = body.get("tool_choice")
        if choice == "required":
            out["tool_choice"] = {"type": "any"}
        elif isinstance(choice, dict) and (choice.get("function") or {}).get("name"):
            out["tool_choice"] = {"type": "tool", "name": choice["function"]["name"]}
        elif choice == "none":
            out["tool_choice"] = {"type": "none"}
    return out


