"""The simulator: a stand-in model that answers offline, deterministically.

It implements the same Provider protocol as the OpenAI-compatible provider, so
``tokenrelay serve`` with no upstream runs on it in-process, and ``tokenrelay sim`` serves it
over HTTP for tests, demos and the benchmark.

Per-request options ride in the model name (``sim:echo,tps=10``; ``options`` lists them), so
they pass through any client and relay.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson

from ..errors import UpstreamError, UpstreamProtocolError
from ..providers.base import Delta, OpenAIRequest, ToolCallDelta, Usage, error_for_status
from ..schemas import ChatRequest, chat_from_openai
from .options import MODELS, SimOptions

# Sentences of an ordinary answer, with 2-, 3- and 4-byte UTF-8 characters among them so
# every client on the path meets characters that a chunk boundary could split.
_SENTENCES = (
    "Streaming sends each token the moment the model writes it.",
    "A proxy that buffers holds the whole answer back until the end.",
    "The browser decodes UTF-8 with care: café, naïve, façade, straße.",
    "Characters such as 日本語の文字 take three bytes each.",
    "Emoji like 😀 and 🚀, and the clef 𝄞, take four bytes.",
    "A heartbeat keeps an idle connection open — every 15 s by default.",
    "When the reader leaves, the relay closes the upstream request at once.",
    "Errors after the first byte must stay visible, never a short answer.",
    "The price is €0 for the simulator; a real model costs tokens.",
    "Ω, ✓ and déjà vu are here to test the decoder too.",
)
_WORDS = re.compile(r"\s*\S+|\s+")


def answer_tokens(request: ChatRequest, options: SimOptions) -> list[str]:
    """The answer's tokens: deterministic for a seed and a question."""
    return list(iter_tokens(request, options))


def answer_length(request: ChatRequest, options: SimOptions) -> int:
    if options.echo:
        return len(_WORDS.findall(_last_user(request))) or 1
    return options.tokens if request.max_tokens is None else min(options.tokens, request.max_tokens)


def iter_tokens(request: ChatRequest, options: SimOptions) -> Iterator[str]:
    """The answer's tokens one sentence at a time: a long answer is never held whole."""
    last_user = _last_user(request)
    if options.echo:
        yield from _WORDS.findall(last_user) or [""]
        return
    left = answer_length(request, options)
    rng = random.Random(options.seed * 1_000_003 + zlib.crc32(last_user.encode()))
    first = True
    while left > 0:
        sentence = _WORDS.findall(rng.choice(_SENTENCES))
        if not first:
            sentence = [" " + sentence[0], *sentence[1:]]
        first = False
        yield from sentence[:left]
        left -= len(sentence)


def _last_user(request: ChatRequest) -> str:
    return next((m.content for m in reversed(request.messages) if m.role == "user"), "")


_DEFAULT_TOOL = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}
_FRAGMENT = 7  # characters of JSON arguments per streamed fragment


def tool_calls(request: ChatRequest, options: SimOptions) -> list[tuple[str, str]]:
    """The (name, JSON arguments) of the calls to make, or none."""
    functions = [t["function"] for t in request.tools or () if isinstance(t.get("function"), dict)]
    count = options.tools or (1 if functions else 0)
    last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    words = " ".join(last_user.split()[:3]) or "Paris"
    calls = []
    for i, function in zip(range(count), itertools.cycle(functions or [_DEFAULT_TOOL])):
        params = function.get("parameters") or {}
        args = {name: _sample(spec, words, i) for name, spec in (params.get("properties") or {}).items()}
        calls.append((str(function.get("name") or "tool"), orjson.dumps(args).decode()))
    return calls


def _sample(spec: Any, words: str, i: int) -> Any:
    # A JSON Schema from the request: any of its keywords may hold any JSON value.
    spec = spec if isinstance(spec, dict) else {}
    enum = spec.get("enum")
    if isinstance(enum, list) and enum:
        return enum[i % len(enum)]
    kind = spec.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        kind = next((k for k in kind if isinstance(k, str) and k != "null"), None)
    if kind == "integer":
        return 3 + i
    return _SAMPLES.get(kind, words) if isinstance(kind, str) else words


_SAMPLES: dict[str, Any] = {"number": 21.5, "boolean": True, "array": [], "object": {}}


def prompt_tokens(request: ChatRequest) -> int:
    return sum(len(_WORDS.findall(m.content)) + 3 for m in request.messages)


class Simulator:
    label = "simulator"

    def __init__(self, defaults: SimOptions | None = None) -> None:
        self.defaults = defaults or SimOptions()

    async def open(self, request: ChatRequest, *, model: str) -> AsyncIterator[Delta]:
        options = self.defaults.with_model(model)
        if options.fault and options.fault.startswith("http-"):
            status = int(options.fault[5:])
            reason = "simulated rate limit" if status == 429 else "simulated upstream failure"
            raise error_for_status(status, reason, retry_after="1" if status == 429 else None)
        return self._deltas(request, options)

    async def _deltas(self, request: ChatRequest, options: SimOptions) -> AsyncIterator[Delta]:
        calls = tool_calls(request, options)
        if calls:
            async for delta in self._tool_deltas(request, options, calls):
                yield delta
            return
        length = answer_length(request, options)
        fault_at = options.at if options.at is not None else length // 2
        loop = asyncio.get_running_loop()
        start = loop.time()
        interval = 1.0 / options.tps if options.tps > 0 else 0.0
        await asyncio.sleep(options.ttft)
        if options.fault == "error-before":
            raise UpstreamError("simulated upstream error before the first token")
        for i, token in enumerate(iter_tokens(request, options)):
            if i == fault_at:
                if options.fault == "error-mid":
                    raise UpstreamError("simulated upstream failure mid-stream")
                if options.fault == "malformed":
                    raise UpstreamProtocolError("simulated malformed stream")
                if options.fault == "stall":
                    await asyncio.sleep(options.stall)
                    start += options.stall
            # Pace against the clock, not per sleep, so the rate holds under load.
            if interval and (delay := start + options.ttft + i * interval - loop.time()) > 0:
                await asyncio.sleep(delay)
            elif i % 64 == 63:
                await asyncio.sleep(0)  # unpaced or behind the pace: let other streams run
            yield Delta(text=token)
        finish = "length" if request.max_tokens is not None and length >= request.max_tokens and not options.echo else "stop"
        completion = length
        prompt = prompt_tokens(request)
        yield Delta(finish_reason=finish, usage=Usage(prompt, completion, prompt + completion))

    async def _tool_deltas(self, request: ChatRequest, options: SimOptions,
                           calls: list[tuple[str, str]]) -> AsyncIterator[Delta]:
        """Each call's arguments streamed in small fragments, as OpenAI streams them."""
        interval = 1.0 / options.tps if options.tps > 0 else 0.0
        await asyncio.sleep(options.ttft)
        if options.fault == "error-before":
            raise UpstreamError("simulated upstream error before the first token")
        fragments = 0
        for index, (name, arguments) in enumerate(calls):
            call_id = f"call_sim{index}{zlib.crc32(arguments.encode()):08x}"
            yield Delta(tool_calls=(ToolCallDelta(index, "", id=call_id, name=name),))
            for start in range(0, len(arguments), _FRAGMENT):
                if interval:
                    await asyncio.sleep(interval)
                elif fragments % 64 == 63:
                    await asyncio.sleep(0)  # let other streams run
                fragments += 1
                if options.fault == "error-mid" and fragments == (options.at or 2):
                    raise UpstreamError("simulated upstream failure mid-stream")
                yield Delta(tool_calls=(ToolCallDelta(index, arguments[start:start + _FRAGMENT]),))
        prompt = prompt_tokens(request)
        yield Delta(finish_reason="tool_calls", usage=Usage(prompt, fragments, prompt + fragments))

    async def open_openai(self, request: OpenAIRequest, *, model: str) -> AsyncIterator[Delta]:
        return await self.open(chat_from_openai(request.body), model=model)

    async def models(self) -> list[str]:
        return list(MODELS)

    async def check_ready(self, *, timeout: float) -> str | None:
        return None  # in-process: ready whenever tokenrelay is

    async def aclose(self) -> None:
        return None
