"""An OpenAI-compatible chat completions upstream (OpenAI, vLLM, Ollama, llama.cpp, LM Studio…).

One pooled ``UpstreamClient`` serves every request. ``open`` sends the request and waits
for the response headers, so refusals (401, 429, 5xx) surface before tokenrelay writes a
byte; the returned iterator decodes the SSE body into deltas (``chat_deltas``) and closes
the upstream response in ``finally`` — which is how a departed client stops the model.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import orjson
from yarl import URL

from ..errors import UpstreamError, UpstreamProtocolError
from ..schemas import ChatRequest
from .sse_decoder import SSEDecoder
from .base import Delta, OpenAIRequest, Passthrough, Usage, event_object
from .http import SSE_REQUEST_HEADERS, UpstreamClient, UpstreamResponse, answers_models, error_message
from .http import make_client as make_client  # the transport factory, where routing.py imports it from


class OpenAICompatible:
    def __init__(self, *, base_url: str, api_key: str | None, client: UpstreamClient, label: str) -> None:
        self.url = URL(base_url.rstrip("/") + "/chat/completions")
        self.models_url = URL(base_url.rstrip("/") + "/models")
        self.responses_url = URL(base_url.rstrip("/") + "/responses")
        self.serves_responses: bool | None = None
        """Whether the upstream serves the Responses API itself: unknown until a request tried
        it; False after it answered 404 (``routes.responses`` then translates to chat completions)."""
        self.label = label
        self._client = client
        self._headers = dict(SSE_REQUEST_HEADERS)
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._whole_headers = {**self._headers, "accept": "application/json"}

    def _body(self, request: ChatRequest, model: str) -> bytes:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        return orjson.dumps(body)

    async def open(self, request: ChatRequest, *, model: str) -> AsyncIterator[Delta]:
        response = await self.send(self._body(request, model))
        return self._deltas(response)

    async def open_openai(self, request: OpenAIRequest, *, model: str) -> Passthrough:
        """The client's own bytes go on unchanged, so every field it sends reaches the upstream."""
        return Passthrough(await self.send(request.raw, stream=request.stream))

    async def send(self, body: bytes, *, stream: bool = True) -> UpstreamResponse:
        """Send a chat completions body as it is; the response once its status is 200.

        The body is read by the caller (``async for``), who must close the response. Any
        other status is read, closed and raised as the matching ``UpstreamError``."""
        response = await self._client.post_stream(self.url, body, self._headers if stream else self._whole_headers)
        if stream and response.headers.get("content-type", "").partition(";")[0].strip().lower() == "text/html":
            # A login page or a proxy's notice behind a 200, not the stream asked for: said
            # now, as a status, rather than after the client was sent the stream's first bytes.
            response.close()
            raise UpstreamProtocolError("upstream answered 200 with an HTML page (text/html), not an event stream")
        return response

    async def send_responses(self, body: bytes, *, stream: bool) -> UpstreamResponse:
        """Send a ``/v1/responses`` body as it is (see ``send``)."""
        return await self._client.post_stream(self.responses_url, body, self._headers if stream else self._whole_headers)

    async def models(self) -> list[str]:
        """The upstream's own model list (``GET …/models``); empty when it has none."""
        try:
            status, raw = await self._client.get(self.models_url, self._headers, timeout=5)
            data = orjson.loads(raw).get("data") if status == 200 else None
        except (UpstreamError, orjson.JSONDecodeError, AttributeError):
            return []
        return [str(m["id"]) for m in data or () if isinstance(m, dict) and "id" in m]

    async def _deltas(self, response: UpstreamResponse) -> AsyncIterator[Delta]:
        try:
            async for delta in chat_deltas(response):
                yield delta
            await response.drain(_DRAIN_GRACE)
        finally:
            response.close()

    async def check_ready(self, *, timeout: float) -> str | None:
        headers = {k: v for k, v in self._headers.items() if k == "authorization"}
        return await answers_models(self._client, self.models_url, headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._client.aclose()


_DRAIN_GRACE = 0.5
"""Seconds an upstream may keep its stream open after ``[DONE]`` (see ``UpstreamResponse.drain``)."""


async def chat_deltas(chunks: AsyncIterable[bytes]) -> AsyncIterator[Delta]:
    """A streamed chat completion's body, however its bytes are split, as deltas; it stops
    at ``[DONE]`` and raises ``UpstreamError`` for an error event or an answer cut short."""
    decoder = SSEDecoder()
    finished = False
    async for chunk in chunks:
        # Text from one network read is one Delta: it arrived at one moment, so sending it
        # on as one piece delays nothing, and costs the relay and the client one write and
        # one read instead of one per token (docs/performance.md).
        texts: list[str] = []
        failure: UpstreamError | None = None
        done = False
        for data in decoder.feed_data(chunk):
            if data == "[DONE]":
                done = True
                break
            try:
                delta = _delta(data)
            except UpstreamError as exc:
                failure = exc
                break
            except (AttributeError, LookupError, TypeError, ValueError):
                # JSON, but not a chunk's shape (a string for an object, text that is a number)
                failure = UpstreamProtocolError(f"upstream sent an event that is not a chat completion chunk: "
                                                f"{data[:80]!r}")
                break
            if delta is None:
                continue
            if isinstance(delta, str):
                texts.append(delta)
                continue
            if texts:
                yield Delta(text="".join(texts))
                texts = []
            finished = finished or delta.finish_reason is not None
            yield delta
        if texts:
            yield Delta(text="".join(texts))
        if failure is not None:
            raise failure
        if done:
            return
    if not finished:  # some servers omit [DONE]; a finish_reason is as good an ending
        raise UpstreamProtocolError("upstream closed the stream before the answer finished")


def _delta(data: str) -> str | Delta | None:
    """One ``chat.completion.chunk`` → its text alone when that is all it carries (most
    chunks: no object made for them), a Delta when it ends the answer or counts its usage,
    None when it carries nothing."""
    chunk = event_object(data)
    if "error" in chunk:
        raise UpstreamError(f"upstream sent an error: {error_message(chunk['error'])}")
    text = ""
    finish = None
    choices = chunk.get("choices") or ()
    if choices:
        choice = choices[0]
        content = (choice.get("delta") or {}).get("content")
        if content:
            text = _str(content)
        finish = choice.get("finish_reason")
        finish = None if finish is None else _str(finish)
    usage = usage_of(chunk.get("usage"))
    if finish is None and usage is None:
        return text or None
    return Delta(text=text, finish_reason=finish, usage=usage)


def usage_of(raw: Any) -> Usage | None:
    """A chunk's ``usage`` object, as tokenrelay counts it (None when there is none)."""
    if not raw:
        return None
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    return Usage(prompt, completion, int(raw.get("total_tokens") or prompt + completion))


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value
