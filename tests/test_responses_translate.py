"""The Responses API's pure parts: a request body translated to chat completions
(``responses_request``) and deltas to events, rebuilt into the Response object from the log
(``streaming.responses_events``). The SDKs' view of both is in ``test_v1_responses``."""

from __future__ import annotations

import orjson
import pytest
from openai.types.responses import Response

from tokenrelay.errors import UpstreamError
from tokenrelay.providers.base import Delta, ToolCallDelta, Usage
from tokenrelay.responses_request import Unsupported, to_chat
from tokenrelay.streaming.responses_events import ResponseEvents, snapshot


def test_items_become_chat_messages() -> None:
    body = {"instructions": "Be brief.", "tools": [{"type": "function", "name": "f", "parameters": {}}],
            "tool_choice": {"type": "function", "name": "f"}, "max_output_tokens": 50, "temperature": 0.5,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "input": [{"role": "developer", "content": "rules"},
                      {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                                   {"type": "input_text", "text": "b"}]},
                      {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                      {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"x\":1}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "one"},
                      {"type": "function_call_output", "call_id": "c2", "output": "two"}]}
    chat = to_chat(body, model="m", kind="openai")
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["max_tokens"] == 50 and chat["temperature"] == 0.5 and chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice"),
])
def test_what_the_simulator_cannot_honour_is_named(body: dict[str, object], param: str) -> None:
    with pytest.raises(Unsupported) as caught:
        to_chat(body, model="sim", kind="simulator")
    assert caught.value.param == param and caught.value.status == 400


def _pieces(events: ResponseEvents, deltas: list[Delta]) -> list[str]:
    out = [*events.start()]
    for delta in deltas:
        out += events.delta(delta)
    return [orjson.dumps(e).decode() for e in out]


def test_the_log_gives_back_the_response_so_far_and_at_the_end() -> None:
    events = ResponseEvents(id="resp_abc", model="m")
    deltas = [Delta(text="Hel"), Delta(text="lo"),
              Delta(tool_calls=(ToolCallDelta(0, "", id="call_1", name="f"),)),
              Delta(tool_calls=(ToolCallDelta(0, '{"a"'),)), Delta(tool_calls=(ToolCallDelta(0, ":1}"),))]
    pieces = _pieces(events, deltas)
    running = Response.model_validate(snapshot(pieces))
    assert running.status == "in_progress" and running.output_text == "Hello"
    assert running.output[1].type == "function_call" and running.output[1].arguments == '{"a":1}'

    pieces += [orjson.dumps(e).decode() for e in events.delta(Delta(finish_reason="tool_calls",
                                                                    usage=Usage(3, 4, 7)))]
    pieces += [orjson.dumps(e).decode() for e in events.complete()]
    done = Response.model_validate(snapshot(pieces))
    assert done.status == "completed" and done.usage is not None and done.usage.total_tokens == 7
    assert [item.status for item in done.output] == ["completed", "completed"]
    assert [orjson.loads(p)["sequence_number"] for p in pieces] == list(range(len(pieces)))


def test_a_failure_keeps_the_output_so_far() -> None:
    events = ResponseEvents(id="resp_abc", model="m")
    pieces = _pieces(events, [Delta(text="part")])
    failed, error = events.fail(UpstreamError("gone"))
    assert error["type"] == "error" and error["error"]["message"] == "gone"  # what the SDKs raise
    response = Response.model_validate(failed["response"])
    assert response.status == "failed" and response.error is not None and response.output_text == "part"
    assert response.output[0].status == "incomplete"
    assert len(pieces) + 2 == events.seq


def test_max_output_tokens_is_an_incomplete_response() -> None:
    events = ResponseEvents(id="resp_abc", model="m", echo={"max_output_tokens": 2})
    _pieces(events, [Delta(text="a b"), Delta(finish_reason="length")])
    [*_, last] = events.complete()
    assert last["type"] == "response.incomplete"
    response = Response.model_validate(last["response"])
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
