"""The request body at the wire; validation ends here.

Everything past this module works with a valid ``ChatRequest``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MalformedJSON, ValidationFailed

M = TypeVar("M", bound=BaseModel)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(strict=True)


class _Open(BaseModel):
    """A part of OpenAI's request body that tokenrelay reads or translates. Unknown fields
    are allowed — the body goes on untouched to OpenAI-compatible upstreams — but a field
    tokenrelay uses must have the type it is used as (strict: no ``"5"`` for 5)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class ContentPart(_Open):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a 'text' part needs a string 'text'")
        return self


class FunctionCall(_Open):
    name: str
    arguments: str
    """JSON, as the model wrote it (not checked: a model may write broken JSON)."""


class ToolCall(_Open):
    id: str
    type: str = "function"
    function: FunctionCall


class OpenAIMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionParameters(_Open):
    """A JSON Schema; only ``properties`` is read (the simulator makes arguments from it)."""

    properties: dict[str, Any] | None = None


class FunctionDefinition(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: FunctionParameters | None = None


class Tool(_Open):
    type: str = "function"
    function: FunctionDefinition | None = None


class FunctionName(_Open):
    name: str


class NamedToolChoice(_Open):
    type: str = "function"
    function: FunctionName | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


class OpenAIChatBody(_Open):
    """The ``/v1/chat/completions`` body, as far as tokenrelay reads or translates it."""

    model: str | None = Field(default=None, min_length=1, max_length=256)
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # OpenAI's own ranges, which the simulator and the Anthropic translation hold to as well.
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0, strict=True)
    stream: bool = Field(default=True, strict=True)
    tools: list[dict[str, Any]] | None = None
    """OpenAI-style tool definitions (``{"type":"function","function":{…}}``), passed on."""

    @field_validator("tools")
    @classmethod
    def _tools_are_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        # Checked as OpenAI's shape but kept as sent, so they reach the upstream unchanged.
        for i, tool in enumerate(tools or ()):
            try:
                Tool.model_validate(tool)
            except ValidationError as exc:
                raise ValueError(f"tool {i}: {describe_validation(exc)}") from None
        return tools


def parse_model(model: type[M], raw: bytes) -> M:
    """Decode and validate a JSON body, turning failures into the error tree."""
    data = parse_json_object(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation(exc)) from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationFailed("request body must be a JSON object")
    return data


def describe_validation(exc: ValidationError, *, limit: int = 5) -> str:
    parts = []
    errors = exc.errors()
    for err in errors[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)


def parse_openai_body(body: dict[str, Any]) -> OpenAIChatBody:
    """A ``/v1/chat/completions`` body checked; pydantic's ``ValidationError`` if it is not one."""
    return OpenAIChatBody.model_validate(body)


def chat_from_openai(body: dict[str, Any]) -> ChatRequest:
    """A ``ChatRequest`` from an OpenAI chat completions body, for upstreams that do not speak
    OpenAI (the simulator). Lenient: content parts are joined, tool messages become text."""
    try:
        parse_openai_body(body)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation(exc)) from None
    messages = []
    for m in body["messages"]:
        role = m.get("role")
        content = message_text(m.get("content"))
        if role == "tool" or role == "developer" or role == "function":
            role = "user" if role != "developer" else "system"
        messages.append({"role": role, "content": content})
    data = {k: body[k] for k in ("model", "temperature", "tools") if body.get(k) is not None}
    if body.get("tool_choice") == "none":
        data.pop("tools", None)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None:
        data["max_tokens"] = limit
    try:
        return ChatRequest.model_validate({**data, "messages": messages})
    except ValidationError as exc:
        raise ValidationFailed(describe_validation(exc)) from None


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ValidationFailed("messages: content must be a string, a list of parts or null")
