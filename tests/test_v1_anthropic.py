"""An Anthropic Messages upstream behind tokenrelay's OpenAI-compatible face: the standalone
simulator's ``POST /v1/messages`` speaks Anthropic's streaming format, a route of kind
``anthropic`` points at it, and the official ``openai`` SDK talks to tokenrelay."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import openai
import orjson
import pytest

from sdk import client, close_clients  # noqa: F401  (the fixture closes the clients)
from servers import RelayServer, SimServer, start_anthropic_relay
from streams import chat
from tokenrelay.providers.anthropic import messages_body
from tokenrelay.providers.sse_decoder import SSEDecoder

ANTHROPIC_HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
USER = [{"role": "user", "content": 'Weather in "Zürich" ✓ today?'}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def claude(start_relay: Callable[..., RelayServer], sim_server: SimServer) -> RelayServer:
    return start_anthropic_relay(start_relay, sim_server)



def messages_events(sim: SimServer, body: dict, headers: dict[str, str] = ANTHROPIC_HEADERS) -> list[tuple[str, dict]]:
    response = httpx.post(sim.url + "/v1/messages", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return [(e.event, orjson.loads(e.data)) for e in SSEDecoder().feed(response.content)]


def test_simulator_speaks_anthropic_streaming(sim_server: SimServer) -> None:
    events = messages_events(sim_server, {"model": "claude-sim:echo,ttft=0,tps=0", "max_tokens": 100,
                                          "stream": True, "messages": [{"role": "user", "content": "one two"}]})
    names = [name for name, _ in events]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 5
    assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["one", " two"]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-2][1]["usage"] == {"output_tokens": 2}


def test_simulator_streams_tool_use_as_input_json_deltas(sim_server: SimServer) -> None:
    tools = [{"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}]  # type: ignore[index]
    events = messages_events(sim_server, {"model": "claude-sim:ttft=0,tps=0", "max_tokens": 100, "stream": True,
                                          "tools": tools, "messages": [{"role": "user", "content": "Oslo"}]})
    start = next(d for n, d in events if n == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "get_weather"
    fragments = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    assert len(fragments) > 2
    assert json.loads("".join(fragments)) == {"city": "Oslo", "days": 3}
    assert next(d for n, d in events if n == "message_delta")["delta"]["stop_reason"] == "tool_use"


def test_simulator_wants_anthropic_headers(sim_server: SimServer) -> None:
    body = {"model": "claude-sim", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(sim_server.url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 401
    assert response.json() == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "x-api-key header is required"}}


def test_openai_sdk_streams_from_anthropic(claude: RelayServer, sim_server: SimServer) -> None:
    stream = client(claude).chat.completions.create(model="claude-sim:ttft=0,tps=0,tokens=20", messages=USER,
                                                    stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The same simulated answer the OpenAI-compatible face gives for the same question.
    same = httpx.post(sim_server.url + "/v1/chat/completions",
                      json={"model": "claude-sim:ttft=0,tps=0,tokens=20", "messages": USER}).json()
    assert text == same["choices"][0]["message"]["content"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    whole = client(claude).chat.completions.create(model="claude-sim:ttft=0,tps=0,tokens=20", messages=USER)
    assert whole.choices[0].message.content == text


def test_openai_sdk_tool_calls_from_anthropic(claude: RelayServer) -> None:
    api = client(claude)
    with api.chat.completions.stream(model="claude-sim:ttft=0,tps=0", messages=USER,
                                     tools=[WEATHER_TOOL]) as stream:  # type: ignore[list-item]
        final = stream.get_final_completion()
    call = (final.choices[0].message.tool_calls or [])[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and call.id.startswith("toolu_")
    assert json.loads(call.function.arguments) == {"city": 'Weather in "Zürich"', "days": 3}
    # The tool's result goes back; the conversation converts to Anthropic's blocks.
    follow_up = api.chat.completions.create(model="claude-sim:echo,ttft=0,tps=0", messages=[
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 °C"},
    ])
    assert follow_up.choices[0].message.content == "sunny, 21 °C"


def test_anthropic_errors(claude: RelayServer) -> None:
    with pytest.raises(openai.RateLimitError):
        client(claude).chat.completions.create(model="claude-sim:fault=http-429", messages=USER)
    stream = client(claude).chat.completions.create(model="claude-sim:ttft=0,tps=0,fault=error-mid",
                                                    messages=USER, stream=True)
    with pytest.raises(openai.APIError, match="simulated upstream failure"):
        list(stream)


def test_get_response_on_anthropic(claude: RelayServer) -> None:
    response = httpx.post(claude.url + "/api/get-response", json=chat("say this", model="claude-sim:echo,ttft=0"))
    assert response.status_code == 200
    assert response.text == "say this"
    listed = [m.id for m in client(claude).models.list()]
    assert listed == ["claude-sim"]


def test_messages_body_conversion() -> None:
    body = messages_body({
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [WEATHER_TOOL], "tool_choice": "required", "max_tokens": 50, "stop": "END", "temperature": 0.2,
    }, "claude-x")
    assert body == {
        "model": "claude-x", "max_tokens": 50, "stream": True, "system": "Be brief.", "temperature": 0.2,
        "stop_sequences": ["END"],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                               "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]},
        ],
        "tools": [{"name": "get_weather", "description": "",
                   "input_schema": WEATHER_TOOL["function"]["parameters"]}],  # type: ignore[index]
        "tool_choice": {"type": "any"},
    }
