"""The Provider protocol: where answers come from.

A provider opens a request and returns once the upstream has accepted it (so refusals become
an HTTP status before the first byte). What it returns is one of two things:

* an async iterator of ``Delta`` — the answer normalised, for any wire the client wants
  (``open`` always returns this; ``open_openai`` does for an upstream that speaks another
  language, such as Anthropic's or the simulator);
* a ``Passthrough`` — the upstream's own response, already in the client's wire format (an
  OpenAI-compatible upstream answering ``/v1``), so every field it sends reaches the client.

Closing either (``aclose`` / ``close``) cancels the upstream request. The streaming layer
knows only this module, never a concrete provider; ``routing.Router`` builds them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from ..errors import UpstreamError, UpstreamProtocolError, UpstreamRateLimited, UpstreamRejected
from ..schemas import ChatRequest


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a tool call, as OpenAI streams it: the first fragment of call ``index``
    carries its ``id`` and ``name``, later ones only more of the JSON ``arguments``."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        function: dict[str, str] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        out["function"] = function
        return out


@dataclass(frozen=True, slots=True)
class Delta:
    """One piece of the answer: text or tool-call fragments, and on the last pieces the
    finish reason or usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """A ``/v1/chat/completions`` request as the client sent it: the bytes, passed on
    unchanged where the upstream speaks the same API, and the parsed body, for translating."""

    raw: bytes
    body: dict[str, Any]
    stream: bool


class UpstreamBody(Protocol):
    """An upstream response whose status was 200: its headers, and its body to iterate or
    read whole. The reader must ``close`` it."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Passthrough:
    """The upstream's answer in the client's own wire format, to be relayed as it is."""

    response: UpstreamBody


class Provider(Protocol):
    label: str
    """Shown to users: 'simulator' or the upstream's URL without credentials."""

    async def open_openai(self, request: OpenAIRequest, *, model: str) -> Passthrough | AsyncIterator[Delta]:
        """Start an OpenAI chat completions request: passed through where the upstream
        speaks that API, else translated and answered as deltas."""
        ...

    async def models(self) -> list[str]:
        """The models the upstream itself lists (empty when it lists none)."""
        ...

    async def check_ready(self, *, timeout: float) -> str | None:
        """None when the upstream answers, else why not (the simulator is always ready)."""
        ...

    async def open(self, request: ChatRequest, *, model: str) -> AsyncIterator[Delta]:
        """Start the request; raise ``UpstreamError`` if the upstream refuses it.

        The iterator must give the event loop a turn at least once per network read (the
        in-process simulator: every few dozen tokens), however fast the upstream writes:
        the server's ``send`` does not suspend while the socket takes the bytes, so the
        relay would otherwise hold every other stream, and its own disconnect listener,
        until this one ended (docs/performance.md, 4). HTTP upstreams get this from
        ``http11.Connection.read``."""
        ...

    async def aclose(self) -> None:
        """Release shared resources (connection pools) at shutdown."""
        ...


def error_for_status(status: int, reason: str, *, retry_after: str | None = None) -> UpstreamError:
    """The error for an upstream that answered with a non-200 status."""
    message = f"upstream answered {status}: {reason}" if reason else f"upstream answered {status}"
    if status == 429:
        headers = {"Retry-After": retry_after} if retry_after else {}
        exc: UpstreamError = UpstreamRateLimited(message, headers=headers)
    elif 400 <= status < 500 and status not in (401, 403):
        # The request itself was refused (unknown model, context too long): the caller can fix it.
        exc = UpstreamRejected(message)
    else:
        exc = UpstreamError(message)
    exc.upstream_status = status
    exc.reason = reason
    return exc


def event_object(data: str) -> dict[str, Any]:
    """The JSON object an upstream's SSE event carries; anything else breaks the stream."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"upstream sent an event that is not JSON: {data[:80]!r}") from None
    if not isinstance(event, dict):
        raise UpstreamProtocolError("upstream sent an event that is not a JSON object")
    return event
