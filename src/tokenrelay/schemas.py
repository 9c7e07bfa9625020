"""The request body at the wire; validation ends here.

Everything past this module works with a valid ``ChatRequest``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import MalformedJSON, ValidationFailed

M = TypeVar("M", bound=BaseModel)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(strict=True)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0, strict=True)
    stream: bool = Field(default=True, strict=True)
    tools: list[dict[str, Any]] | None = None
    """OpenAI-style tool definitions (``{"type":"function","function":{…}}``), passed on."""


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


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def chat_from_openai(body: dict[str, Any]) -> ChatRequest:
    """A ``ChatRequest`` from an OpenAI chat completions body, for upstreams that do not speak
    OpenAI (the simulator). Lenient: content parts are joined, tool messages become text."""
    messages = []
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            raise ValidationFailed("messages: each message must be an object")
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
