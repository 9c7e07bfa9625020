"""``/v1`` on the wire: bytes relayed as the upstream sent them, a departed client stopping
the upstream, failures after the first byte, and OpenAI's error shape before it."""

from __future__ import annotations

import re
import socket

import httpx
import orjson
import pytest

from servers import RelayServer, SimServer, wait_until
from streams import chat

_VOLATILE = re.compile(rb'"id":"[^"]*","object":"chat\.completion(\.chunk)?","created":\d+')


def post_stream(url: str, body: dict) -> tuple[httpx.Response, bytes]:
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "/chat/completions", json=body) as response:
            return response, b"".join(response.iter_raw())


@pytest.mark.parametrize("extra", [
    {"stream_options": {"include_usage": True}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "q": {"type": "string"}}}}}]},
    {"stream_options": {"include_usage": True}, "logprobs": True, "response_format": {"type": "text"}},
])
def test_stream_bytes_are_the_upstreams(relay_server: RelayServer, sim_server: SimServer, extra: dict) -> None:
    body = chat("pass me through ✓", model="sim:ttft=0,tps=0,tokens=40", stream=True, **extra)
    direct, direct_bytes = post_stream(sim_server.url + "/v1", body)
    relayed, relayed_bytes = post_stream(relay_server.url + "/v1", body)
    assert relayed.status_code == direct.status_code == 200
    assert relayed.headers["content-type"] == direct.headers["content-type"]
    assert relayed.headers["x-accel-buffering"] == "no"
    # Identical but for each completion's id and creation time, and each chunk's id line
    # (dense from 1, for a resume: docs/resume.md).
    ids = re.findall(rb"^id: (\d+)\n", relayed_bytes, re.MULTILINE)
    assert ids == [str(i).encode() for i in range(1, len(ids) + 1)] and len(ids) == direct_bytes.count(b"data: {")
    assert _VOLATILE.sub(b"", re.sub(rb"^id: \d+\n", b"", relayed_bytes, flags=re.MULTILINE)) == \
        _VOLATILE.sub(b"", direct_bytes)
    assert relayed_bytes.endswith(b"data: [DONE]\n\n")
    assert relayed_bytes.count(b'"id":"chatcmpl-sim') > 5


def test_whole_answer_bytes_are_the_upstreams(relay_server: RelayServer, sim_server: SimServer) -> None:
    body = chat("whole", model="sim:ttft=0,tps=0,tokens=10", stream=False)
    direct = httpx.post(sim_server.url + "/v1/chat/completions", json=body)
    relayed = httpx.post(relay_server.url + "/v1/chat/completions", json=body)
    assert relayed.status_code == 200
    assert _VOLATILE.sub(b"", relayed.content) == _VOLATILE.sub(b"", direct.content)


def test_default_model_is_written_in(relay_server: RelayServer) -> None:
    response = httpx.post(relay_server.url + "/v1/chat/completions", json=chat("hi", stream=False))
    assert response.status_code == 200
    assert response.json()["model"] == "sim"


def test_upstream_stream_cut_off_ends_with_an_error_event(relay_server: RelayServer) -> None:
    # The simulator's 'malformed' fault cuts the stream inside an event, without [DONE].
    response, raw = post_stream(relay_server.url + "/v1", chat(model="sim:ttft=0,tps=0,tokens=10,fault=malformed",
                                                               stream=True))
    assert response.status_code == 200
    assert b"data: [DONE]\n" not in raw
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ")
    assert orjson.loads(last[6:]) == {"error": {
        "message": "upstream closed the stream before data: [DONE]", "type": "server_error", "param": None,
        "code": "upstream_protocol_error"}}
    wait_until(lambda: "outcome=failed_midway" in relay_server.log())


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    (b'{"messages": [', 400, None, "invalid_json"),
    (b'{"model": "sim"}', 400, "messages", "validation_error"),
    (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', 400, "model", "validation_error"),
    (b'{"model": "sim", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}', 400, "stream",
     "validation_error"),
    (b'{"model": "sim:bogus", "messages": [{"role": "user", "content": "x"}]}', 400, None,
     "upstream_rejected_request"),
])
def test_bad_requests_in_openai_shape(relay_server: RelayServer, body: bytes, status: int, param: str | None,
                                      code: str) -> None:
    response = httpx.post(relay_server.url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


def test_unknown_v1_path_in_openai_shape(relay_server: RelayServer) -> None:
    response = httpx.get(relay_server.url + "/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def open_v1(relay: RelayServer, body: dict) -> socket.socket:
    payload = orjson.dumps(body)
    sock = socket.create_connection(("127.0.0.1", relay.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize(("case", "model", "stream", "read_first"), [
    ("midway", "sim:ttft=0,tps=10,tokens=200", True, True),
    ("before the first token", "sim:ttft=60", True, False),
    ("non-streaming", "sim:ttft=0,tps=10,tokens=200", False, False),
])
def test_client_leaving_closes_the_upstream(relay_server: RelayServer, sim_server: SimServer, case: str,
                                            model: str, stream: bool, read_first: bool) -> None:
    sim_server.wait_idle()
    before = sim_server.stats()
    sock = open_v1(relay_server, chat(model=model, stream=stream))
    wait_until(lambda: sim_server.stats()["open_streams"] == 1)
    if read_first:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    wait_until(lambda: sim_server.stats()["cancelled_streams"] > before["cancelled_streams"], timeout=1.0,
               interval=0.01)
    after = sim_server.wait_idle()
    assert after["completed_streams"] == before["completed_streams"]
