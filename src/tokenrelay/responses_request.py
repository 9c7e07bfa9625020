"""A ``POST /v1/responses`` body: checked at the wire, and translated to a chat completions
body for an upstream that does not serve the Responses API itself (the simulator, the
Anthropic route, an OpenAI-compatible server with only ``/chat/completions``).

What translates: ``input`` (a string, or items: messages with text parts,
``function_call`` and ``function_call_output``), ``instructions`` (a system message first),
function ``tools`` and ``tool_choice``, ``max_output_tokens``, ``temperature``, ``top_p``,
``parallel_tool_calls`` and ``text.format`` (to an OpenAI-compatible upstream's
``response_format``). A field whose meaning would be lost — ``previous_response_id``,
``conversation``, a prompt template, built-in tools such as ``web_search``, images and files —
is a 400 naming it (``Unsupported``), never silently dropped; the table is in
docs/openai-relay.md.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ValidationFailed
from .schemas import describe_validation

UpstreamKind = Literal["openai", "anthropic", "simulator"]


class Unsupported(ValidationFailed):
    """A field that cannot be honoured here, named in OpenAI's ``param``; 400 as OpenAI answers."""

    status = 400
    type = "unsupported_parameter"

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class _Open(BaseModel):
    # Unknown fields are allowed (passed through unchanged where the upstream serves the
    # API); a field tokenrelay reads must have the type it is read as.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class ResponsesBody(_Open):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    stream: bool | None = None
    background: bool | None = None
    store: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None


def check_body(body: dict[str, Any]) -> ResponsesBody:
    try:
        checked = ResponsesBody.model_validate(body)
    except ValidationError as exc:
        param = next((str(e["loc"][0]) for e in exc.errors() if e["loc"]), None)
        raise Unsupported(describe_validation(exc), param=param) from None
    if checked.input is None and checked.instructions is None:
        raise Unsupported("input: required (a string or a list of input items)", param="input")
    return checked


# Fields that need state or tools only OpenAI's own Responses API has.
_REFUSED = {
    "previous_response_id": "tokenrelay keeps no conversation state for a translated response; send the whole "
                            "conversation in 'input'",
    "conversation": "tokenrelay keeps no conversations; send the whole conversation in 'input'",
    "prompt": "prompt templates live on OpenAI's side",
}


def to_chat(body: dict[str, Any], *, model: str, kind: UpstreamKind) -> dict[str, Any]:
    """The chat completions body that asks the same; ``Unsupported`` for a field it cannot carry."""
    for name, why in _REFUSED.items():
        if body.get(name) is not None:
            raise Unsupported(f"{name}: not supported for model {model!r} ({kind} upstream, answered through "
                              f"chat completions): {why}", param=name)
    include = body.get("include")
    if include:
        raise Unsupported(f"include: not supported for model {model!r} ({kind} upstream): the translated answer "
                          "has only text and function calls", param="include")
    reasoning = body.get("reasoning")
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    else:
        for i, item in enumerate(given or ()):
            _add_item(messages, item, f"input[{i}]")
    if not messages:
        raise Unsupported("input: no messages to answer", param="input")
    chat: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if kind == "openai":
        chat["stream_options"] = {"include_usage": True}
    tools = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(body.get("tools") or ())]
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise Unsupported("tool_choice: only 'auto', 'none', 'required' or a function "
                              "({'type': 'function', 'name': …}) translate to chat completions", param="tool_choice")
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        chat["tool_choice"] = choice
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    text_format = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(text_format, dict) and text_format.get("type", "text") != "text":
        if kind != "openai":
            raise Unsupported(f"text.format: {text_format.get('type')!r} is not supported for model {model!r} "
                              f"({kind} upstream)", param="text.format")
        chat["response_format"] = _response_format(text_format)
    if kind == "openai":
        if body.get("parallel_tool_calls") is not None and tools:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
        if isinstance(reasoning, dict) and reasoning.get("effort"):
            chat["reasoning_effort"] = reasoning["effort"]
        if body.get("user") is not None:
            chat["user"] = body["user"]
    elif isinstance(reasoning, dict) and (reasoning.get("effort") or reasoning.get("summary")):
        raise Unsupported(f"reasoning: not supported for model {model!r} ({kind} upstream)", param="reasoning")
    return chat


def _add_item(messages: list[dict[str, Any]], item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise Unsupported(f"{where}: an input item is an object", param=where)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise Unsupported(f"{where}.role: one of user, system, developer, assistant", param=f"{where}.role")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _text(item.get("content"), f"{where}.content")})
    elif kind == "function_call":
        call = {"id": _string(item, "call_id", where), "type": "function",
                "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
            last["tool_calls"].append(call)  # parallel calls are one assistant message
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                         "content": output if isinstance(output, str) else _text(output, f"{where}.output")})
    else:
        raise Unsupported(f"{where}.type: {kind!r} items are not supported through chat completions (messages, "
                          "function_call and function_call_output are)", param=f"{where}.type")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Unsupported(f"{where}: a string or a list of text parts", param=where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise Unsupported(f"{where}[{j}]: only text parts translate to chat completions (got {kind!r})",
                              param=f"{where}[{j}]")
        parts.append(part["text"])
    return "".join(parts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise Unsupported(f"{where}.{key}: required string", param=f"{where}.{key}")
    return value


def _tool(tool: Any, where: str) -> dict[str, Any]:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise Unsupported(f"{where}.type: built-in tools ({kind!r}) run on OpenAI's side; only function tools "
                          "translate to chat completions", param=f"{where}.type")
    assert isinstance(tool, dict)
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise Unsupported(f"{where}.name: required string", param=f"{where}.name")
    function: dict[str, Any] = {"name": name}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _response_format(text_format: dict[str, Any]) -> dict[str, Any]:
    if text_format.get("type") == "json_schema":
        schema = {k: v for k, v in text_format.items() if k != "type"}
        return {"type": "json_schema", "json_schema": schema}
    return {"type": str(text_format.get("type"))}


def echo_fields(checked: ResponsesBody) -> dict[str, Any]:
    """The request's fields the Response object repeats."""
    return {
        "instructions": checked.instructions,
        "tools": checked.tools or [],
        "tool_choice": checked.tool_choice,
        "temperature": checked.temperature,
        "top_p": checked.top_p,
        "max_output_tokens": checked.max_output_tokens,
        "parallel_tool_calls": True if checked.parallel_tool_calls is None else checked.parallel_tool_calls,
        "metadata": checked.metadata,
        "background": checked.background,
    }


def dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)
