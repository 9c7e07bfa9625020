"""``POST /api/get-response`` through a real ``tokenrelay serve`` in front of the real
standalone simulator, over loopback sockets."""

from __future__ import annotations

import httpx
import pytest

from servers import RelayServer, SimServer
from tokenrelay.sim.provider import SimOptions, answer_tokens
from tokenrelay.schemas import ChatRequest
from streams import chat, event_data, read_stream


def test_text_streams_each_delta_as_it_is_written(relay_server: RelayServer) -> None:
    # 20 tokens at 20 tokens/s: about a second from the first token to the last.
    result = read_stream(relay_server.url, chat(model="sim:ttft=0,tps=20,tokens=20"))
    assert result.status == 200
    assert result.error is None
    assert result.headers["content-type"] == "text/plain; charset=utf-8"
    assert result.headers["cache-control"] == "no-cache, no-transform"
    assert result.headers["x-accel-buffering"] == "no"
    assert result.headers["x-request-id"]
    assert result.headers["x-stream-id"].startswith("st_")
    assert result.headers["transfer-encoding"] == "chunked"
    # Pieces arrive over the answer's whole span, not in one lump at the end.
    assert len(result.chunks) >= 10
    assert result.spread > 0.5
    text = result.body.decode()
    whole = httpx.post(relay_server.url + "/api/get-response",
                       json=chat(model="sim:ttft=0,tps=0,tokens=20", stream=False)).json()["text"]
    assert text == whole


def test_answer_has_multibyte_characters(relay_server: RelayServer) -> None:
    text = read_stream(relay_server.url, chat(model="sim:tps=0,ttft=0,tokens=400")).body.decode()
    widths = {len(ch.encode()) for ch in text}
    assert {1, 2, 3, 4} <= widths


def test_request_id_is_taken_from_the_client(relay_server: RelayServer) -> None:
    response = httpx.post(relay_server.url + "/api/get-response", json=chat(model="sim:tps=0,ttft=0,tokens=2"),
                          headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_sse_events(relay_server: RelayServer) -> None:
    result = read_stream(relay_server.url, chat("say it", model="sim:echo,ttft=0,tps=50"), sse=True)
    assert result.status == 200
    assert result.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = result.events()
    assert events[0].event == "start"
    assert event_data(events[0]) == {"stream_id": result.headers["x-stream-id"], "model": "sim:echo,ttft=0,tps=50"}
    deltas = [e for e in events if e.event == "message"]
    assert [event_data(e)["text"] for e in deltas] == ["say", " it"]
    assert [e.id for e in deltas] == ["1", "2"]
    assert events[-1].event == "done"
    assert event_data(events[-1]) == {
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def test_sse_pings_while_the_model_is_silent(start_relay, sim_server: SimServer) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_HEARTBEAT_INTERVAL="0.3")
    result = read_stream(relay.url, chat(model="sim:ttft=1.2,tps=0,tokens=3"), sse=True)
    assert b": ping\n\n" in result.body
    events = result.events()
    assert events[0].event == "start" and events[-1].event == "done"
    # the pings came before the first token, while the model was silent
    assert result.body.index(b": ping") < result.body.index(b"id: 1\n")


def test_one_shot_json(relay_server: RelayServer) -> None:
    response = httpx.post(relay_server.url + "/api/get-response",
                          json=chat("one shot", model="sim:echo,tps=0", stream=False))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "text": "one shot",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "model": "sim:echo,tps=0",
    }


# --- errors before the first byte ---------------------------------------------------


def post_raw(url: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(url + "/api/get-response", content=content, headers={"content-type": content_type})


def assert_error(response: httpx.Response, status: int, kind: str, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == kind
    for word in words:
        assert word in error["message"]


def test_malformed_json_is_400(relay_server: RelayServer) -> None:
    assert_error(post_raw(relay_server.url, b'{"messages": ['), 400, "invalid_json", "not valid JSON")


def test_wrong_content_type_is_415(relay_server: RelayServer) -> None:
    response = post_raw(relay_server.url, b'{"messages": []}', "application/x-www-form-urlencoded")
    assert_error(response, 415, "unsupported_media_type", "application/json")


def test_fetch_default_content_type_is_accepted(relay_server: RelayServer) -> None:
    # fetch(url, {method: "POST", body: JSON.stringify(payload)}) sends text/plain;charset=UTF-8
    body = b'{"messages":[{"role":"user","content":"hi"}],"model":"sim:echo,tps=0"}'
    response = post_raw(relay_server.url, body, "text/plain;charset=UTF-8")
    assert response.status_code == 200
    assert response.text == "hi"


def test_body_over_the_limit_is_413(relay_server: RelayServer) -> None:
    big = b'{"messages":[{"role":"user","content":"' + b"x" * (1024 * 1024) + b'"}]}'
    assert_error(post_raw(relay_server.url, big), 413, "payload_too_large", "1048576")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, "max_tokens"),
        ([1, 2], "body"),
    ],
)
def test_schema_errors_are_422_and_name_the_field(relay_server: RelayServer, body: object, field: str) -> None:
    response = httpx.post(relay_server.url + "/api/get-response", json=body)
    assert_error(response, 422, "validation_error", field)


def test_unknown_simulator_option_in_process_is_422(start_relay) -> None:
    relay = start_relay(upstream=None)
    response = httpx.post(relay.url + "/api/get-response", json=chat(model="sim:bogus"))
    assert_error(response, 422, "validation_error", "model", "bogus")


def test_upstream_rejecting_the_request_is_400_with_its_reason(relay_server: RelayServer) -> None:
    response = httpx.post(relay_server.url + "/api/get-response", json=chat(model="sim:bogus"))
    assert_error(response, 400, "upstream_rejected_request", "upstream answered 400", "bogus")


@pytest.mark.parametrize("status", [401, 403, 500, 503])
def test_upstream_refusal_is_502_with_its_reason(relay_server: RelayServer, status: int) -> None:
    response = httpx.post(relay_server.url + "/api/get-response", json=chat(model=f"sim:fault=http-{status}"))
    assert_error(response, 502, "upstream_error", f"upstream answered {status}", "simulated upstream failure")


def test_upstream_rate_limit_is_429_with_retry_after(relay_server: RelayServer) -> None:
    response = httpx.post(relay_server.url + "/api/get-response", json=chat(model="sim:fault=http-429"))
    assert_error(response, 429, "upstream_rate_limited", "simulated rate limit")
    assert response.headers["retry-after"] == "1"


def test_upstream_error_before_first_token_is_502(relay_server: RelayServer) -> None:
    response = httpx.post(relay_server.url + "/api/get-response", json=chat(model="sim:fault=error-before"))
    assert_error(response, 502, "upstream_error", "before the first token")


def test_upstream_unreachable_is_502(start_relay) -> None:
    from servers import free_port

    relay = start_relay(upstream=f"http://127.0.0.1:{free_port()}/v1")
    response = httpx.post(relay.url + "/api/get-response", json=chat())
    assert_error(response, 502, "upstream_unavailable", "cannot reach upstream")


def test_upstream_too_slow_is_504(start_relay, sim_server: SimServer) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_READ_TIMEOUT="0.5")
    response = httpx.post(relay.url + "/api/get-response", json=chat(model="sim:ttft=3"))
    assert_error(response, 504, "upstream_timeout")
    sim_server.wait_idle()


# --- failures after the first byte ----------------------------------------------------


@pytest.mark.parametrize("fault", ["error-mid", "malformed"])
def test_text_failure_midway_is_a_broken_body(relay_server: RelayServer, fault: str) -> None:
    result = read_stream(relay_server.url, chat(model=f"sim:fault={fault},tps=0,tokens=20"))
    assert result.status == 200
    assert result.body  # the first half arrived ...
    assert isinstance(result.error, httpx.RemoteProtocolError)  # ... and the end is visibly broken
    assert "incomplete chunked read" in str(result.error)


def test_sse_failure_midway_is_an_error_event(relay_server: RelayServer) -> None:
    result = read_stream(relay_server.url, chat(model="sim:fault=error-mid,tps=0,tokens=20"), sse=True)
    assert result.error is None
    events = result.events()
    model = "sim:fault=error-mid,tps=0,tokens=20"
    first_half = answer_tokens(ChatRequest.model_validate(chat(model=model)), SimOptions().with_model(model))[:10]
    # Tokens the relay read together may share an event; the text is the first half, exactly.
    assert "".join(event_data(e)["text"] for e in events if e.event == "message") == "".join(first_half)
    assert events[-1].event == "error"
    error = event_data(events[-1])["error"]
    assert error["type"] == "upstream_error"
    assert "mid-stream" in error["message"]


def test_sse_failure_after_start_but_before_the_first_token(relay_server: RelayServer) -> None:
    result = read_stream(relay_server.url, chat(model="sim:fault=error-before"), sse=True)
    assert result.status == 200
    assert [e.event for e in result.events()] == ["start", "error"]


def test_sse_stall_then_continue(start_relay, sim_server: SimServer) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_HEARTBEAT_INTERVAL="0.2")
    result = read_stream(relay.url, chat(model="sim:fault=stall,stall=1,at=2,tps=0,tokens=4"), sse=True)
    events = result.events()
    kinds = [e.event for e in events]
    # Two tokens before the stall and two after; tokens read together may share an event.
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"message"}
    assert 2 <= len(kinds) - 2 <= 4
    assert result.body.count(b": ping") >= 2


def test_unknown_route_is_json_404(relay_server: RelayServer) -> None:
    response = httpx.get(relay_server.url + "/api/nothing")
    assert_error(response, 404, "not_found")


def test_info_names_the_upstream_without_its_key(start_relay, sim_server: SimServer) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_UPSTREAM_KEY="sk-secret-123")
    info = httpx.get(relay.url + "/api/info").json()
    assert info["upstream"] == sim_server.url + "/v1"
    assert info["simulated"] is False
    assert "sk-secret" not in httpx.get(relay.url + "/api/info").text
    assert "sk-secret" not in httpx.get(relay.url + "/").text
    assert "sk-secret" not in relay.log()
