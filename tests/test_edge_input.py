"""Client input that used to crash a request is refused with a clear 4xx, the simulator's
options are bounded, and a crash that still happens is logged and counted as the 500 it is.
Each case here was a 500 (or an unbounded cost) before; real relays and simulator on loopback."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
import openai
import pytest

from sdk import client, close_clients  # noqa: F401  (the fixture closes the clients)
from servers import RelayServer, SimServer
from tokenrelay.metrics import Metrics
from tokenrelay.sim.options import LIMITS
from tokenrelay.streaming.record import StreamRecord
from tokenrelay.streaming.response import StreamResponse, body_of

USER = [{"role": "user", "content": "hi"}]
BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}}


@pytest.fixture(scope="module")
def local(start_relay: Callable[..., RelayServer]) -> RelayServer:
    return start_relay(upstream=None, TOKENRELAY_SIM_TTFT="0", TOKENRELAY_SIM_TPS="0")


@pytest.fixture(scope="module")
def passthrough(relay_server: RelayServer) -> RelayServer:
    return relay_server


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    return dict(response.json()["error"])


@pytest.mark.parametrize("body, param", [
    ({"model": "sim", "messages": USER, "stream": True, "stream_options": "yes"}, "stream_options"),
    ({"model": "sim", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
    ({"model": "sim", "messages": USER, "tools": [BAD_TOOL]}, "tools"),
    ({"model": "sim", "messages": USER, "tool_choice": {"type": "function", "function": "f"}}, "tool_choice"),
    ({"model": "sim", "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": 1}]}]},
     "messages"),
])
@pytest.mark.parametrize("where", ["local", "passthrough"])
def test_v1_bad_fields_are_400_with_param(request: pytest.FixtureRequest, where: str, body: dict[str, Any],
                                          param: str) -> None:
    relay: RelayServer = request.getfixturevalue(where)
    response = httpx.post(relay.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(param), error


def test_v1_unknown_fields_still_pass_through(passthrough: RelayServer) -> None:
    answer = client(passthrough).chat.completions.create(
        model="sim:ttft=0,tps=0,tokens=3", messages=USER, extra_body={"not_yet_invented": {"x": [1]}},
        stream_options=None)
    assert answer.choices[0].message.content


@pytest.mark.parametrize("model, words", [
    ("sim:ttft=nan", "ttft is 0 to 60"),
    ("sim:tokens=3000000,tps=0", "tokens is 0 to 50,000"),
    ("sim:tools=1000000", "tools is 0 to 16"),
    ("sim:tps=inf", "tps is 0 to 1,000,000"),
])
def test_simulator_options_out_of_bounds_are_refused(local: RelayServer, model: str, words: str) -> None:
    response = httpx.post(local.url + "/api/get-response", json={"model": model, "messages": USER}, timeout=10)
    error = error_of(response)
    assert error["type"] == "validation_error" and words in error["message"], error
    assert "tokenrelay sim --help" in error["message"]


def test_standalone_simulator_refuses_them_too(sim_server: SimServer) -> None:
    response = httpx.post(sim_server.url + "/v1/chat/completions", timeout=10,
                          json={"model": "sim:tokens=3000000,tps=0", "messages": USER})
    assert response.status_code == 400 and "tokens is 0 to 50,000" in response.text


def test_sim_help_states_the_bounds() -> None:
    out = subprocess.run([sys.executable, "-m", "tokenrelay", "sim", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for key, (lo, hi) in LIMITS.items():
        assert re.search(rf"{key} {lo:,.0f}–{hi:,.0f}", " ".join(out.split())), (key, out)


def test_simulator_answers_its_own_names_only(local: RelayServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(local).chat.completions.create(model="gpt-4o", messages=USER)
    message = caught.value.response.json()["error"]["message"]
    assert caught.value.response.json()["error"]["code"] == "model_not_found"
    assert "sim, sim:echo, sim:tools, sim:*" in message
    # the sim family, with options, and the configured default (TOKENRELAY_MODEL=sim here) still answer
    assert client(local).chat.completions.create(model="sim:echo,tokens=2", messages=USER).choices
    assert httpx.post(local.url + "/api/get-response", json={"messages": USER}, timeout=10).status_code == 200


def test_configured_default_model_is_served_by_the_simulator(start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=None, TOKENRELAY_MODEL="house-model", TOKENRELAY_SIM_TTFT="0")
    response = httpx.post(relay.url + "/api/get-response", json={"messages": USER}, timeout=10)
    assert response.status_code == 200 and response.text
    assert httpx.post(relay.url + "/api/get-response", json={"model": "house-model-2", "messages": USER},
                      timeout=10).status_code == 404


def test_job_with_bad_tools_is_refused_at_submission(local: RelayServer) -> None:
    response = httpx.post(local.url + "/api/jobs", json={"model": "sim", "messages": USER, "tools": [BAD_TOOL]},
                          timeout=10)
    error = error_of(response)
    assert error["type"] == "validation_error" and "tool 0: function.parameters.properties" in error["message"]


def test_tool_schemas_of_any_shape_are_sampled(local: RelayServer) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": ["string", "null"]}, "b": {"enum": {"x": 1}}, "c": {"type": "integer"}, "d": 5}}}}
    answer = client(local).chat.completions.create(model="sim", messages=USER, tools=[tool])  # type: ignore[list-item]
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "f" and '"c":3' in call.function.arguments


# --- a crash inside a body ---

def crashing(after_first: bool) -> AsyncGenerator[bytes, None]:
    async def body() -> AsyncGenerator[bytes, None]:
        if after_first:
            yield b"a piece"
        raise KeyError("a bug")
        yield b""  # pragma: no cover  (makes this a generator)

    return body()


@pytest.mark.parametrize("after_first", [False, True])
def test_a_crash_in_a_body_is_logged_and_counted_as_500(after_first: bool, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    record = StreamRecord(request_id="req_1", stream_id="st_1", model="sim", mode="text")
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        await asyncio.Event().wait()

    response = StreamResponse(body_of(crashing(after_first)), headers=[], record=record, observer=metrics)
    with caplog.at_level(logging.INFO, logger="tokenrelay.request"), pytest.raises(KeyError):
        asyncio.run(response({"type": "http"}, receive, send))
    assert (record.status, record.outcome, record.error_type) == (500, "internal_error", "internal_error")
    assert "status=500" in caplog.text and "outcome=internal_error" in caplog.text
    sample = metrics.registry.get_sample_value
    assert sample("tokenrelay_streams_total", {"mode": "text", "outcome": "internal_error"}) == 1
    assert sample("tokenrelay_requests_total", {"route": "/api/get-response", "status": "500"}) == 1
    # The client never sees a clean end: the server turns the exception into a 500, or a cut body.
    assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)
