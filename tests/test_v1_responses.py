"""``/v1/responses`` with the official ``openai`` Python SDK, through a real ``tokenrelay
serve`` on loopback, on every path an answer can take:

* ``simulator``: the built-in simulator, translated (deltas → Responses events);
* ``chat-only``: ``tokenrelay sim --chat-only`` as an OpenAI-compatible upstream without
  ``/v1/responses`` — tokenrelay learns that from its 404 and translates to chat completions;
* ``anthropic``: the simulator's Messages API behind an ``anthropic`` route, translated;
* ``passthrough``: the standalone simulator, which serves ``/v1/responses`` itself: its
  events are relayed as they are.

Resume, background and cancel are tokenrelay's own (its stream log), so they are tested on
the translated paths; the Node SDK runs ``tests/node/responses.mjs`` against two of them."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from sdk import client, close_clients, events_until  # noqa: F401  (the fixture closes the clients)
from servers import RelayServer, SimServer, wait_until
from test_v1_node import NODE_DIR, node_sdk  # noqa: F401  (the fixture installs the Node SDK)

FAST = "ttft=0,tps=0"
INPUT = 'Weather in "Zürich" ✓ today?'
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]},
}
TRANSLATED = ["simulator", "chat-only", "anthropic"]


@pytest.fixture(scope="module")
def chat_only_sim(log_dir: Path) -> Iterator[SimServer]:
    server = SimServer(log_dir=log_dir, args=["--chat-only"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def relays(start_relay: Callable[..., RelayServer], relay_server: RelayServer, sim_server: SimServer,
           chat_only_sim: SimServer) -> dict[str, RelayServer]:
    routes = [{"name": "anthropic", "pattern": "claude-*", "kind": "anthropic", "url": sim_server.url + "/v1",
               "key_env": "TEST_ANTHROPIC_KEY"},
              {"name": "sim", "pattern": "sim*", "kind": "simulator"}]
    return {
        "simulator": start_relay(upstream=None),
        "chat-only": start_relay(upstream=chat_only_sim.url + "/v1"),
        "anthropic": start_relay(upstream=None, TOKENRELAY_ROUTES=json.dumps(routes),
                                 TEST_ANTHROPIC_KEY="sk-ant-test"),
        "passthrough": relay_server,
    }


def model(path: str, options: str) -> str:
    return ("claude-sim:" if path == "anthropic" else "sim:") + options


def api(relays: dict[str, RelayServer], path: str) -> openai.OpenAI:
    return client(relays[path])


def sequence_numbers(events: list[openai.types.responses.ResponseStreamEvent]) -> list[int]:
    return [e.sequence_number for e in events]


@pytest.mark.parametrize("path", [*TRANSLATED, "passthrough"])
def test_text_streamed_and_whole(relays: dict[str, RelayServer], path: str) -> None:
    events = list(api(relays, path).responses.create(model=model(path, f"{FAST},tokens=12"), input=INPUT,
                                                     stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert sequence_numbers(events) == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 12
    text = "".join(e.delta for e in deltas)
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == text and done.response.status == "completed"
    assert done.response.usage is not None and done.response.usage.output_tokens == 12
    assert done.response.usage.total_tokens == done.response.usage.input_tokens + 12
    assert {e.item_id for e in deltas} == {done.response.output[0].id}

    whole = api(relays, path).responses.create(model=model(path, f"{FAST},tokens=12"), input=INPUT)
    assert whole.object == "response" and whole.status == "completed"
    assert whole.output_text == text
    assert whole.usage is not None and whole.usage.output_tokens == 12


@pytest.mark.parametrize("path", [*TRANSLATED, "passthrough"])
def test_input_items_and_instructions(relays: dict[str, RelayServer], path: str) -> None:
    """Items and instructions become chat messages: the echo model repeats the last user message."""
    answer = api(relays, path).responses.create(
        model=model(path, f"echo,{FAST}"), instructions="Answer briefly.",
        input=[{"role": "user", "content": "first question"},
               {"role": "assistant", "content": [{"type": "output_text", "text": "an answer"}]},
               {"role": "user", "content": [{"type": "input_text", "text": INPUT}]}])
    assert answer.output_text == INPUT
    assert answer.instructions == "Answer briefly."


@pytest.mark.parametrize("path", [*TRANSLATED, "passthrough"])
def test_tool_call_arguments_streamed(relays: dict[str, RelayServer], path: str) -> None:
    with api(relays, path).responses.stream(model=model(path, FAST), input=INPUT, tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    fragments = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(fragments) > 3
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    call = final.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.arguments == done.arguments == "".join(e.delta for e in fragments)
    assert json.loads(call.arguments) == {"city": 'Weather in "Zürich"', "days": 3}
    assert final.usage is not None and final.usage.output_tokens > 0

    # The call's result goes back as items, as the Agents SDK sends it.
    again = api(relays, path).responses.create(
        model=model(path, f"echo,{FAST}"), tools=[WEATHER],
        input=[{"role": "user", "content": INPUT},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert again.status == "completed"


@pytest.mark.parametrize("path", [*TRANSLATED, "passthrough"])
def test_failure_midway_is_raised(relays: dict[str, RelayServer], path: str) -> None:
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="simulated upstream failure"):
        for event in api(relays, path).responses.create(model=model(path, f"{FAST},tokens=20,fault=error-mid"),
                                                        input=INPUT, stream=True):
            seen.append(event.type)
    assert "response.output_text.delta" in seen
    assert seen[-1] == "response.failed"


@pytest.mark.parametrize("path", [*TRANSLATED, "passthrough"])
def test_refusal_before_the_first_byte(relays: dict[str, RelayServer], path: str) -> None:
    with pytest.raises(openai.RateLimitError):
        list(api(relays, path).responses.create(model=model(path, "fault=http-429"), input=INPUT, stream=True))
    if path in ("simulator", "anthropic"):  # the others send every model to their upstream
        with pytest.raises(openai.NotFoundError):
            api(relays, path).responses.create(model="no-such-model", input=INPUT)


@pytest.mark.parametrize("path", TRANSLATED)
@pytest.mark.parametrize(("fields", "param"), [
    ({"previous_response_id": "resp_abc"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"max_output_tokens": "5"}, "max_output_tokens"),
])
def test_unsupported_fields_are_a_400_naming_them(relays: dict[str, RelayServer], path: str,
                                                   fields: dict[str, object], param: str) -> None:
    body = {"model": model(path, FAST), "input": INPUT, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        api(relays, path).responses.create(**body)  # type: ignore[call-overload]
    assert caught.value.body["param"] == param  # type: ignore[index]
    assert param.split("[")[0].split(".")[0] in caught.value.message


@pytest.mark.parametrize("path", ["simulator", "chat-only"])
def test_resume_after_a_cut_connection(relays: dict[str, RelayServer], path: str) -> None:
    """A background response's stream is cut after sequence_number 6; the SDK's
    ``retrieve(stream=True, starting_after=6)`` gives exactly the events it missed."""
    sdk = api(relays, path)
    first = events_until(sdk.responses.create(model=model(path, "ttft=0,tps=60,tokens=40"), input=INPUT,
                                              stream=True, background=True), 6)
    created = first[0]
    assert created.type == "response.created" and created.response.status == "queued"
    rest = list(sdk.responses.retrieve(created.response.id, stream=True, starting_after=6))
    assert sequence_numbers(rest)[0] == 7
    assert rest[-1].type == "response.completed"
    whole = list(sdk.responses.retrieve(created.response.id, stream=True))
    assert [e.model_dump() for e in first + rest] == [e.model_dump() for e in whole]
    assert sequence_numbers(whole) == list(range(len(whole)))
    text = "".join(e.delta for e in whole if e.type == "response.output_text.delta")
    assert sdk.responses.retrieve(created.response.id).output_text == text


@pytest.mark.parametrize("path", ["simulator", "chat-only"])
def test_background_runs_with_nobody_attached(relays: dict[str, RelayServer], path: str) -> None:
    sdk = api(relays, path)
    queued = sdk.responses.create(model=model(path, "ttft=0,tps=200,tokens=30"), input=INPUT, background=True)
    assert queued.status in ("queued", "in_progress") and queued.background
    done = wait_until(lambda: (r := sdk.responses.retrieve(queued.id)).status == "completed" and r, timeout=10)
    assert done.usage.output_tokens == 30
    assert done.output_text


def test_cancel_stops_the_model(relays: dict[str, RelayServer], chat_only_sim: SimServer) -> None:
    sdk = api(relays, "chat-only")
    before = chat_only_sim.stats()["cancelled_streams"]
    queued = sdk.responses.create(model="sim:ttft=0,tps=10,tokens=500", input=INPUT, background=True)
    wait_until(lambda: sdk.responses.retrieve(queued.id).output_text)
    cancelled = sdk.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert sdk.responses.retrieve(queued.id).status == "cancelled"
    assert chat_only_sim.wait_idle()["cancelled_streams"] == before + 1  # the upstream request was closed
    events = list(sdk.responses.retrieve(queued.id, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"


def test_a_client_that_leaves_stops_the_model(relays: dict[str, RelayServer], chat_only_sim: SimServer) -> None:
    before = chat_only_sim.stats()["cancelled_streams"]
    stream = api(relays, "chat-only").responses.create(model="sim:ttft=0,tps=20,tokens=500", input=INPUT,
                                                       stream=True)
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    stream.close()
    assert chat_only_sim.wait_idle(timeout=5)["cancelled_streams"] == before + 1


def test_a_response_is_its_owners_alone(start_relay: Callable[..., RelayServer]) -> None:
    """The response id is a capability: another key, or a made-up id, finds nothing (404)."""
    relay = start_relay(upstream=None, TOKENRELAY_API_KEYS="sk-alice-0123456789,sk-bob-0123456789")
    alice = openai.OpenAI(base_url=relay.url + "/v1", api_key="sk-alice-0123456789", max_retries=0, timeout=30)
    bob = openai.OpenAI(base_url=relay.url + "/v1", api_key="sk-bob-0123456789", max_retries=0, timeout=30)
    with alice, bob:
        answer = alice.responses.create(model=f"sim:{FAST}", input=INPUT)
        assert answer.id.startswith("resp_") and len(answer.id) == len("resp_") + 32
        assert alice.responses.retrieve(answer.id).output_text == answer.output_text
        for call in (lambda: bob.responses.retrieve(answer.id), lambda: bob.responses.cancel(answer.id),
                     lambda: alice.responses.retrieve("resp_" + "0" * 32)):
            with pytest.raises(openai.NotFoundError):
                call()


def test_bad_cursor_is_a_400(relays: dict[str, RelayServer]) -> None:
    sdk = api(relays, "simulator")
    answer = sdk.responses.create(model=f"sim:{FAST}", input=INPUT)
    reply = httpx.get(relays["simulator"].url + f"/v1/responses/{answer.id}",
                      params={"stream": "true", "starting_after": "x"}, timeout=10)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "starting_after"


@pytest.mark.parametrize("path", ["simulator", "chat-only"])
def test_node_sdk(node_sdk: Path, relays: dict[str, RelayServer], path: str) -> None:  # noqa: F811
    run = subprocess.run([str(node_sdk), "responses.mjs"], cwd=NODE_DIR, capture_output=True, text=True,
                         timeout=120, env={"PATH": str(node_sdk.parent), "TOKENRELAY_V1": relays[path].url + "/v1"})
    assert run.returncode == 0, run.stderr + run.stdout
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary == {"streamed": 15, "usage": 15, "tool_fragments": summary["tool_fragments"],
                       "failure": "raised", "resumed": "exact", "cancelled": "cancelled"}
    assert summary["tool_fragments"] > 3
