"""``/v1/chat/completions`` with the official ``openai`` Python SDK, through a real
``tokenrelay serve`` on loopback. Each test runs on both paths: ``passthrough`` (the
standalone simulator as an OpenAI-compatible upstream: its bytes are relayed as they are)
and ``encoded`` (the built-in simulator: tokenrelay writes the chunks itself)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import openai
import pytest

from sdk import client, close_clients  # noqa: F401  (the fixture closes the clients)
from servers import RelayServer

FAST = "ttft=0,tps=0"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
USER = [{"role": "user", "content": 'Weather in "Zürich" ✓ today?'}]


@pytest.fixture(scope="module")
def builtin_relay(start_relay: Callable[..., RelayServer]) -> RelayServer:
    return start_relay(upstream=None)


@pytest.fixture(params=["passthrough", "encoded"])
def relay(request: pytest.FixtureRequest, relay_server: RelayServer) -> RelayServer:
    if request.param == "passthrough":
        return relay_server
    return request.getfixturevalue("builtin_relay")



def async_client(relay: RelayServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_non_streaming(relay: RelayServer) -> None:
    answer = client(relay).chat.completions.create(model=f"sim:echo,{FAST}", messages=USER)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == USER[0]["content"]
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 5


def test_streaming_sync(relay: RelayServer) -> None:
    stream = client(relay).chat.completions.create(model="sim:ttft=0,tps=200,tokens=30", messages=USER, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client(relay).chat.completions.create(model="sim:ttft=0,tps=0,tokens=30", messages=USER)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 30
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # not asked for


def test_streaming_async_with_usage(relay: RelayServer) -> None:
    async def run() -> list[openai.types.chat.ChatCompletionChunk]:
        async with async_client(relay) as api:
            stream = await api.chat.completions.create(
                model=f"sim:{FAST},tokens=12", messages=USER, stream=True, stream_options={"include_usage": True})
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.completion_tokens, last.usage.total_tokens) == (12, last.usage.prompt_tokens + 12)
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_stream_helper(relay: RelayServer) -> None:
    with client(relay).chat.completions.stream(model=f"sim:echo,{FAST}", messages=USER) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "content.delta" in kinds and "content.done" in kinds
    assert final.choices[0].message.content == USER[0]["content"]


def test_tool_calls_stream(relay: RelayServer) -> None:
    stream = client(relay).chat.completions.create(
        model="sim:ttft=0,tps=500", messages=USER, tools=[WEATHER_TOOL], stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    fragments = 0
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for call in choice.delta.tool_calls or ():
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            entry["name"] += (call.function.name if call.function else None) or ""
            entry["arguments"] += (call.function.arguments if call.function else None) or ""
            fragments += 1
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert fragments > 3  # the arguments came in pieces
    assert json.loads(calls[0]["arguments"]) == {"city": 'Weather in "Zürich"', "days": 3, "unit": "celsius"}


def test_tool_calls_helper_and_non_streaming(relay: RelayServer) -> None:
    api = client(relay)
    with api.chat.completions.stream(model=f"sim:tools=2,{FAST}", messages=USER, tools=[WEATHER_TOOL]) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [e.index for e in done] == [0, 1]
    assert [json.loads(e.arguments)["unit"] for e in done] == ["celsius", "fahrenheit"]
    streamed = [c.function.arguments for c in final.choices[0].message.tool_calls or ()]
    whole = api.chat.completions.create(model=f"sim:tools=2,{FAST}", messages=USER, tools=[WEATHER_TOOL])
    assert whole.choices[0].finish_reason == "tool_calls"
    assert [c.function.arguments for c in whole.choices[0].message.tool_calls or ()] == streamed


def test_rate_limit_raises_rate_limit_error(relay: RelayServer) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client(relay).chat.completions.create(model="sim:fault=http-429", messages=USER, stream=True)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.type == "rate_limit_error"
    assert "simulated rate limit" in caught.value.message


def test_upstream_failure_raises_status_error(relay: RelayServer) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client(relay).chat.completions.create(model="sim:fault=http-500", messages=USER)
    assert caught.value.status_code == 502
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.body == {"message": "upstream answered 500: simulated upstream failure",
                                 "type": "server_error", "param": None, "code": "upstream_error"}


def test_bad_request_raises_bad_request_error(relay: RelayServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(relay).chat.completions.create(model="sim", messages=[])
    assert caught.value.param == "messages"  # type: ignore[attr-defined]
    assert caught.value.type == "invalid_request_error"


@pytest.mark.parametrize("fault", ["error-mid", "error-before"])
def test_error_mid_stream_raises_api_error(relay: RelayServer, fault: str) -> None:
    stream = client(relay).chat.completions.create(
        model=f"sim:{FAST},tokens=20,fault={fault}", messages=USER, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="simulated upstream") as caught:
        for chunk in stream:
            received.append(chunk)
    assert not isinstance(caught.value, openai.APIStatusError)  # raised from the stream, status 200
    if fault == "error-mid":
        assert sum(1 for c in received if c.choices and c.choices[0].delta.content) == 10


def test_async_error_mid_stream(relay: RelayServer) -> None:
    async def run() -> int:
        count = 0
        async with async_client(relay) as api:
            stream = await api.chat.completions.create(model=f"sim:{FAST},fault=error-mid", messages=USER,
                                                       stream=True)
            async for _ in stream:
                count += 1
        return count

    with pytest.raises(openai.APIError):
        asyncio.run(run())


def test_models_lists_the_simulator(relay: RelayServer) -> None:
    ids = [m.id for m in client(relay).models.list()]
    assert "sim" in ids and "sim:echo" in ids
