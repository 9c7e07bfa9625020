"""No input gets a 5xx. Generated bodies — OpenAI-shaped, with any JSON value in any field
tokenrelay reads — are posted to real relays on loopback: ``/api/get-response``,
``/v1/chat/completions`` on the in-process simulator, on an OpenAI-compatible upstream (the
standalone simulator, passthrough) and on an Anthropic route (the simulator's
``/v1/messages``), and ``/api/jobs``, whose jobs must not end in ``internal_error`` either.
Bad input is a 4xx with an error body; good input an answer read to its end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from servers import RelayServer, SimServer, start_anthropic_relay, wait_until

scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def either(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The field's own shape, or any JSON value."""
    return st.one_of(valid, json_values)


# Options that answer at once; the rest are out of bounds or unknown, so refused. No faults:
# a simulated upstream failure is a 502 by design.
SIM_OPTIONS = st.sampled_from(["", ":echo", ":tools", ":tools=2", ":tokens=3", ":seed=7", ":ttft=nan",
                               ":tokens=3000000,tps=0", ":tools=1000000", ":tps=-1", ":stall=inf", ":nope",
                               ":tokens=x", ":at=99999999"])
content_part = st.fixed_dictionaries({"type": either(st.sampled_from(["text", "image_url"]))},
                                     optional={"text": either(st.text(max_size=20)),
                                               "image_url": json_values})
tool_call = st.fixed_dictionaries({
    "id": either(st.text(min_size=1, max_size=8)), "type": either(st.just("function")),
    "function": either(st.fixed_dictionaries({"name": either(st.text(min_size=1, max_size=8)),
                                              "arguments": either(st.sampled_from(["{}", '{"a":1}', "[1]", "5", "{"]))}))})
message = st.fixed_dictionaries(
    {"role": either(st.sampled_from(["user", "system", "assistant", "tool", "developer", "function", "bogus"])),
     "content": either(st.text(max_size=30) | st.none() | st.lists(either(content_part), max_size=3))},
    optional={"tool_calls": either(st.lists(tool_call, max_size=2)), "tool_call_id": either(st.text(max_size=8)),
              "name": either(st.text(max_size=8))})
schema_property = either(st.fixed_dictionaries({}, optional={
    "type": either(st.sampled_from(["string", "integer", "number", "boolean", "array", "object"])
                   | st.lists(st.sampled_from(["string", "null"]), max_size=2)),
    "enum": either(st.lists(scalars, max_size=3))}))
tool = st.fixed_dictionaries({
    "type": either(st.just("function")),
    "function": either(st.fixed_dictionaries({"name": either(st.text(min_size=1, max_size=10))}, optional={
        "description": either(st.text(max_size=10)),
        "parameters": either(st.fixed_dictionaries({"type": either(st.just("object"))}, optional={
            "properties": either(st.dictionaries(st.text(max_size=5), schema_property, max_size=3))}))}))})


def bodies(models: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"messages": either(st.lists(message, min_size=1, max_size=3))},
        optional={
            "model": either(models),
            "stream": either(st.booleans()),
            "stream_options": either(st.fixed_dictionaries({}, optional={"include_usage": either(st.booleans())})),
            "tools": either(st.lists(tool, max_size=2)),
            "tool_choice": either(st.sampled_from(["auto", "none", "required"])
                                  | st.fixed_dictionaries({"type": st.just("function"), "function": either(
                                      st.fixed_dictionaries({"name": either(st.text(max_size=8))}))})),
            "max_tokens": either(st.integers(-2, 40)),
            "max_completion_tokens": either(st.integers(-2, 40)),
            "temperature": either(st.floats(-1, 3)),
            "top_p": either(st.floats(0, 1)),
            "stop": either(st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=2)),
            "n": json_values,
        })


SIM_MODELS = st.builds(lambda base, options: base + options, st.sampled_from(["sim", "sim", "gpt-4o"]), SIM_OPTIONS)
CLAUDE_MODELS = st.builds(lambda options: "claude-sim" + options, SIM_OPTIONS)

# The inputs that were 500s, always among the examples.
KNOWN = [
    {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": "yes"},
    {"model": "sim", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    {"model": "sim:ttft=nan", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "sim", "messages": [{"role": "user", "content": "hi"}],
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}}]},
    {"model": "sim", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                                              "arguments": "5"}}]}]},
    {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "stop": 5, "tool_choice": {"function": "f"}},
]


def known(model: str | None = None, **extra: Any) -> Callable[[Any], Any]:
    def add(test: Any) -> Any:
        for body in KNOWN:
            body = {**body, "model": body["model"].replace("sim", model)} if model else body
            test = example(body=body, **extra)(test)
        return test

    return add


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def quick_sim(log_dir: Any) -> Iterator[SimServer]:
    server = SimServer(log_dir=log_dir, args=["--ttft", "0", "--tps", "0", "--tokens", "12"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(start_relay: Callable[..., RelayServer]) -> RelayServer:
    return start_relay(upstream=None, TOKENRELAY_SIM_TTFT="0", TOKENRELAY_SIM_TPS="0", TOKENRELAY_SIM_TOKENS="12")


@pytest.fixture(scope="module")
def passthrough(start_relay: Callable[..., RelayServer], quick_sim: SimServer) -> RelayServer:
    return start_relay(upstream=quick_sim.url + "/v1")


@pytest.fixture(scope="module")
def claude(start_relay: Callable[..., RelayServer], quick_sim: SimServer) -> RelayServer:
    return start_anthropic_relay(start_relay, quick_sim)


def post(relay: RelayServer, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    # The whole answer is read: a body that broke off midway raises here, and fails the test.
    response = httpx.post(relay.url + path, json=body, headers=headers, timeout=30)
    assert response.status_code < 500, (body, response.status_code, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and (error.get("type") or error.get("code")), response.text
    return response


def no_crash_logged(relay: RelayServer) -> None:
    log = relay.log()
    assert "Traceback" not in log and "internal_error" not in log, log[-4000:]


@FUZZ
@known(sse=True)
@given(body=bodies(SIM_MODELS), sse=st.booleans())
def test_get_response_never_5xx(local: RelayServer, body: dict[str, Any], sse: bool) -> None:
    response = post(local, "/api/get-response", body, {"accept": "text/event-stream"} if sse else None)
    if response.status_code == 200 and sse:
        assert b"event: done" in response.content or b"event: error" in response.content


@FUZZ
@known()
@given(body=bodies(SIM_MODELS))
def test_v1_simulator_never_5xx(local: RelayServer, body: dict[str, Any]) -> None:
    response = post(local, "/v1/chat/completions", body)
    if response.status_code == 200 and body.get("stream") is True:
        assert response.content.rstrip().endswith(b"data: [DONE]"), response.content[-200:]


@FUZZ
@known()
@given(body=bodies(SIM_MODELS))
def test_v1_passthrough_never_5xx(passthrough: RelayServer, body: dict[str, Any]) -> None:
    post(passthrough, "/v1/chat/completions", body)


@FUZZ
@known(model="claude-sim")
@given(body=bodies(CLAUDE_MODELS))
def test_v1_anthropic_route_never_5xx(claude: RelayServer, body: dict[str, Any]) -> None:
    post(claude, "/v1/chat/completions", body)


@settings(FUZZ, max_examples=60)
@known()
@given(body=bodies(SIM_MODELS))
def test_jobs_never_5xx_nor_internal_error(local: RelayServer, body: dict[str, Any]) -> None:
    response = post(local, "/api/jobs", body)
    if response.status_code != 202:
        return
    job_id = response.json()["id"]
    job = wait_until(lambda: (j := httpx.get(f"{local.url}/api/jobs/{job_id}", timeout=5).json())["status"]
                     not in ("queued", "running") and j)
    assert (job["error"] or {}).get("type") != "internal_error", job


def test_fuzzed_relays_logged_no_crash(local: RelayServer, passthrough: RelayServer, claude: RelayServer) -> None:
    """Run last in this module: whatever the examples above sent, no relay logged a crash."""
    for relay in (local, passthrough, claude):
        no_crash_logged(relay)
