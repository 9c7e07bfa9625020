"""A streamed chat completion's body as deltas with their tool calls too, for an answer that
is re-encoded in another wire (``/v1/responses`` translated for an OpenAI-compatible
upstream that serves only chat completions). Pure decoding; the caller owns the response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..errors import UpstreamError, UpstreamProtocolError
from .base import Delta, ToolCallDelta, UpstreamBody, event_object
from .http import error_message
from .openai_compat import usage_of
from .sse_decoder import SSEDecoder


async def chunk_deltas(response: UpstreamBody) -> AsyncIterator[Delta]:
    """One Delta per chunk event (text, tool-call fragments, finish reason, usage); stops at
    ``[DONE]``, raises ``UpstreamError`` for an error event or an answer cut short. Closing
    it closes the upstream response, which is how a departed client stops the model."""
    decoder = SSEDecoder()
    finished = False
    try:
        async for chunk in response:
            for event in decoder.feed(chunk):
                if event.data == "[DONE]":
                    return
                try:
                    delta = _delta(event_object(event.data))
                except (AttributeError, LookupError, TypeError, ValueError):
                    raise UpstreamProtocolError("upstream sent an event that is not a chat completion chunk: "
                                                f"{event.data[:80]!r}") from None
                if delta is not None:
                    finished = finished or delta.finish_reason is not None
                    yield delta
        if not finished:
            raise UpstreamProtocolError("upstream closed the stream before the answer finished")
    finally:
        response.close()


def _delta(chunk: dict[str, Any]) -> Delta | None:
    if "error" in chunk:
        raise UpstreamError(f"upstream sent an error: {error_message(chunk['error'])}")
    text, finish = "", None
    calls: tuple[ToolCallDelta, ...] = ()
    choices = chunk.get("choices") or ()
    if choices:
        choice = choices[0]
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content:
            text = _str(content)
        calls = tuple(_call(c) for c in delta.get("tool_calls") or ())
        finish = choice.get("finish_reason")
        finish = None if finish is None else _str(finish)
    usage = usage_of(chunk.get("usage"))
    if not text and not calls and finish is None and usage is None:
        return None
    return Delta(text=text, finish_reason=finish, usage=usage, tool_calls=calls)


def _call(raw: dict[str, Any]) -> ToolCallDelta:
    function = raw.get("function") or {}
    name = function.get("name")
    call_id = raw.get("id")
    return ToolCallDelta(index=int(raw.get("index") or 0), arguments=_str(function.get("arguments") or ""),
                         id=None if call_id is None else _str(call_id), name=None if name is None else _str(name))


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value
