"""``/v1/chat/completions`` streams are resumable (docs/resume.md, docs/openai-relay.md): a
cut connection loses nothing and repeats nothing, a resume comes back as OpenAI chunks ending
in ``data: [DONE]`` (readable by the official SDK), a stop reaches a connected SDK as an
error, and leaving still stops the model at once unless the request asked for a grace.

Both paths run for real: passthrough (the relay in front of the standalone simulator as an
OpenAI-compatible upstream) and encode (a relay whose built-in simulator answers). The
simulator's answers are deterministic, so an uninterrupted run is the reference."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionChunk

from scripted import HEAD, chunked, in_thread, read_request, serving
from sdk import client
from servers import RelayServer, SimServer, wait_until
from streams import chat
from test_resume import dechunk, read_until, stream_id_of

from tokenrelay.streaming.openai_relay import EventNumbers

MODEL = "sim:ttft=0,tps=40,tokens=60"
Event = tuple[str, str]  # (id, data)


@pytest.fixture(scope="module")
def encoding_relay(start_relay: Callable[..., RelayServer]) -> RelayServer:
    """A relay with no upstream: its built-in simulator's deltas are encoded as chunks."""
    return start_relay(upstream=None)


@pytest.fixture(params=["passthrough", "encode"])
def relay(request: pytest.FixtureRequest, relay_server: RelayServer, encoding_relay: RelayServer) -> RelayServer:
    return relay_server if request.param == "passthrough" else encoding_relay


def body(model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return chat("resume me ✓", model=model, stream=True, stream_options={"include_usage": True}, **extra)


def events(raw: bytes) -> list[Event]:
    """Each event's own ``id:`` ("" for none: a decoder would carry the last one on) and data."""
    out = []
    for block in raw.decode().split("\n\n"):
        lines = block.split("\n")
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if data:
            out.append((next((line[4:] for line in lines if line.startswith("id: ")), ""), "\n".join(data)))
    return out


def comparable(data: str) -> Any:
    """A chunk without what differs between two requests (its completion's id and time)."""
    if data == "[DONE]":
        return data
    chunk = orjson.loads(data)
    chunk.pop("id", None)
    chunk.pop("created", None)
    return chunk


def post(relay: RelayServer, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(relay.url + "/v1/chat/completions", json=payload, timeout=30)


def open_v1(relay: RelayServer, payload: dict[str, Any], *, grace: float | None) -> socket.socket:
    data = orjson.dumps(payload)
    sock = socket.create_connection(("127.0.0.1", relay.port))
    extra = f"X-Resume-Grace: {grace:g}\r\n" if grace is not None else ""
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"{extra}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def resume(relay: RelayServer, stream_id: str, after: int | None) -> httpx.Response:
    headers = {"accept": "text/event-stream"}
    if after is not None:
        headers["last-event-id"] = str(after)
    return httpx.get(f"{relay.url}/api/streams/{stream_id}", headers=headers, timeout=30)


@pytest.mark.parametrize("cut", ["early", "as it ends"])
def test_a_cut_v1_stream_resumes_with_no_gap_and_no_duplicate(relay: RelayServer, cut: str) -> None:
    whole = post(relay, body())
    assert whole.status_code == 200 and whole.headers["x-stream-id"].startswith("st_")
    reference = events(whole.content)
    assert [eid for eid, _ in reference] == [str(i) for i in range(1, len(reference))] + [""]  # [DONE]: no id

    sock = open_v1(relay, body(), grace=30)
    raw = read_until(sock, b"id: 4\n" if cut == "early" else b"data: [DONE]\n\n")
    sock.close()
    first = [e for e in events(dechunk(raw)) if e[1] != "[DONE]"]
    if cut == "early":
        first = first[:3]
    resumed = resume(relay, stream_id_of(raw), int(first[-1][0]))
    assert resumed.status_code == 200
    assert resumed.headers["content-type"].startswith("text/event-stream")
    assert resumed.content.endswith(b"data: [DONE]\n\n")

    joined = first + events(resumed.content)
    assert [eid for eid, _ in joined] == [eid for eid, _ in reference]
    assert [comparable(data) for _, data in joined] == [comparable(data) for _, data in reference]


def test_a_replay_after_the_end_is_the_first_connections_bytes(relay: RelayServer) -> None:
    first = post(relay, body(model="sim:ttft=0,tps=0,tokens=30"))
    stream_id = first.headers["x-stream-id"]
    assert resume(relay, stream_id, None).content == first.content
    assert resume(relay, stream_id, 0).content == first.content
    last = int(events(first.content)[-2][0])
    assert resume(relay, stream_id, last).content == b"data: [DONE]\n\n"  # the ending, always sent


def test_the_status_of_a_v1_stream_is_its_text(relay: RelayServer) -> None:
    first = post(relay, body(model="sim:ttft=0,tps=0,tokens=30"))
    text = "".join(c.choices[0].delta.content or "" for c in _chunks(first.content) if c.choices)
    status = httpx.get(f"{relay.url}/api/streams/{first.headers['x-stream-id']}", timeout=10).json()
    assert status["status"] == "completed" and status["text"] == text and text
    assert status["ending"]["finish_reason"] == "stop"
    assert status["ending"]["usage"]["completion_tokens"] == 30
    plain = httpx.get(f"{relay.url}/api/streams/{first.headers['x-stream-id']}", headers={"accept": "text/plain"})
    assert plain.status_code == 406 and plain.json()["error"]["type"] == "not_acceptable"


def _chunks(raw: bytes) -> list[ChatCompletionChunk]:
    return [ChatCompletionChunk.model_validate_json(data) for _, data in events(raw) if data != "[DONE]"]


def test_the_official_sdk_reads_a_resumed_stream_to_done(relay: RelayServer) -> None:
    first = post(relay, body())
    reference = _chunks(first.content)
    stream_id = first.headers["x-stream-id"]
    with openai.OpenAI(base_url=relay.url, api_key="unused", max_retries=0, timeout=30) as sdk:
        resumed = sdk.get(f"/api/streams/{stream_id}", cast_to=ChatCompletionChunk, stream=True,
                          stream_cls=openai.Stream[ChatCompletionChunk],
                          options={"headers": {"Last-Event-ID": "3"}})  # the SDK's own Accept is JSON
        chunks = list(resumed)  # the SDK's Stream stops at data: [DONE]
    assert [c.model_dump(exclude={"id", "created"}) for c in chunks] == \
        [c.model_dump(exclude={"id", "created"}) for c in reference[3:]]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 60


def test_leaving_with_a_grace_does_not_stop_the_model(relay_server: RelayServer, sim_server: SimServer) -> None:
    reference = post(relay_server, body(model="sim:ttft=0,tps=0,tokens=50"))
    sim_server.wait_idle()
    before = sim_server.stats()
    sock = open_v1(relay_server, body(model="sim:ttft=0,tps=50,tokens=50"), grace=30)
    raw = read_until(sock, b"id: 2\n")
    sock.close()
    url = f"{relay_server.url}/api/streams/{stream_id_of(raw)}"
    wait_until(lambda: httpx.get(url).json()["status"] != "running", timeout=10)
    assert httpx.get(url).json()["text"] == httpx.get(
        f"{relay_server.url}/api/streams/{reference.headers['x-stream-id']}").json()["text"]
    after = sim_server.wait_idle()
    assert after["completed_streams"] == before["completed_streams"] + 1
    assert after["cancelled_streams"] == before["cancelled_streams"]


def test_leaving_without_a_grace_stops_the_model_at_once(relay_server: RelayServer, sim_server: SimServer) -> None:
    """OpenAI's semantics stay the default: the log says how the answer ended."""
    sim_server.wait_idle()
    before = sim_server.stats()["cancelled_streams"]
    sock = open_v1(relay_server, body(model="sim:ttft=0,tps=10,tokens=200"), grace=None)
    raw = read_until(sock, b"id: 2\n")
    sock.close()
    wait_until(lambda: sim_server.stats()["cancelled_streams"] > before, timeout=1.0, interval=0.01)
    status = httpx.get(f"{relay_server.url}/api/streams/{stream_id_of(raw)}").json()
    assert status["status"] == "stopped" and status["ending"]["reason"] == "client_cancelled"
    replay = resume(relay_server, stream_id_of(raw), None)
    last = orjson.loads(events(replay.content)[-1][1])
    assert last["error"]["code"] == "stream_stopped" and "its client left" in last["error"]["message"]


def test_delete_stops_a_v1_stream_and_the_connected_sdk_raises(relay: RelayServer, relay_server: RelayServer,
                                                                sim_server: SimServer) -> None:
    sim_server.wait_idle()
    cancelled = sim_server.stats()["cancelled_streams"]
    raw = client(relay).chat.completions.with_raw_response.create(
        model="sim:ttft=0,tps=10,tokens=400", messages=[{"role": "user", "content": "stop me"}], stream=True)
    stream_id = raw.headers["x-stream-id"]
    texts: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in raw.parse():
            texts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if len(texts) == 3:
                stopped = httpx.delete(f"{relay.url}/api/streams/{stream_id}", timeout=10)
                assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
                if relay is relay_server:  # the upstream request was closed before DELETE answered
                    assert sim_server.stats()["cancelled_streams"] == cancelled + 1
    # Never a short answer that looks whole: the SDK raises, with a code that says why.
    assert caught.value.code == "stream_stopped"
    assert "DELETE" in caught.value.message
    assert not isinstance(caught.value, openai.APIStatusError)  # in-band: the status was already 200
    status = httpx.get(f"{relay.url}/api/streams/{stream_id}").json()
    assert status["status"] == "stopped" and status["ending"]["reason"] == "stopped"
    assert status["text"].startswith("".join(texts))
    # A replay ends as the connected client's stream did.
    replay = events(resume(relay, stream_id, None).content)
    assert orjson.loads(replay[-1][1])["error"]["code"] == "stream_stopped"


def test_an_upstream_failure_midway_replays_as_the_same_error_chunk(relay: RelayServer) -> None:
    first = post(relay, body(model="sim:ttft=0,tps=0,tokens=10,fault=error-mid"))
    assert first.status_code == 200
    last = orjson.loads(events(first.content)[-1][1])
    assert "error" in last and b"[DONE]" not in first.content
    replay = resume(relay, first.headers["x-stream-id"], None)
    assert events(replay.content)[-1] == events(first.content)[-1]
    status = httpx.get(f"{relay.url}/api/streams/{first.headers['x-stream-id']}").json()
    assert status["status"] == "failed"


def test_an_upstream_cut_off_replays_as_the_same_error_chunk(relay_server: RelayServer) -> None:
    first = post(relay_server, body(model="sim:ttft=0,tps=0,tokens=10,fault=malformed"))
    replay = resume(relay_server, first.headers["x-stream-id"], None)
    assert replay.content == first.content
    assert orjson.loads(events(first.content)[-1][1])["error"]["code"] == "upstream_protocol_error"


def test_a_one_shot_v1_answer_is_not_logged(relay_server: RelayServer) -> None:
    response = post(relay_server, chat(model="sim:ttft=0,tps=0,tokens=5", stream=False))
    assert response.status_code == 200 and "x-stream-id" not in response.headers


def test_a_bad_resume_grace_on_v1_is_a_400_in_openais_shape(relay_server: RelayServer) -> None:
    response = httpx.post(relay_server.url + "/v1/chat/completions", json=body(), headers={"x-resume-grace": "soon"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "validation_error")
    assert "X-Resume-Grace" in error["message"]


# --- numbering an upstream's events (no I/O) ---

def _numbered(pieces: list[bytes]) -> tuple[bytes, list[str]]:
    logged: list[str] = []

    def append(text: str) -> int:
        logged.append(text)
        return len(logged)

    numbers = EventNumbers(append)
    return b"".join(numbers.feed(p) for p in pieces), logged


@pytest.mark.parametrize("nl", [b"\n", b"\r\n"])
def test_upstream_events_get_ids_and_nothing_else_changes(nl: bytes) -> None:
    stream = nl.join([b": keep-alive", b"", b'data: {"a":1}', b"", b"data: {\"b\":", b"data: 2}", b"",
                      b'data:{"c":3}', b"", b'data: {"d":4}', b"", b'data: {"error":{"message":"x"}}', b"",
                      b"data: [DONE]", b"", b""])
    events = [b'data: {"a"', b'data: {"b"', b'data:{"c"', b'data: {"d"']
    splits = [[stream]] + [[stream[:cut], stream[cut:]] for cut in range(1, len(stream))]
    for reads in splits:  # one read, and every split of the bytes into two
        out, logged = _numbered(reads)
        assert logged == ['{"a":1}', '{"b":\n2}', '{"c":3}', '{"d":4}']
        for seq, event in enumerate(events, 1):
            assert out.index(b"id: %d%b" % (seq, nl)) + len(b"id: 1") + len(nl) == out.index(event)
            out = out.replace(b"id: %d%b" % (seq, nl), b"", 1)
        assert out == stream  # nothing else changed


@pytest.mark.parametrize("reads", [1, 2])  # the ending in the same read as the chunks, or in its own
def test_one_data_line_events_in_one_read_are_numbered_in_order(reads: int) -> None:
    chunks = b"".join(b'data: {"n":%d}\n\n' % n for n in range(5))
    out, logged = _numbered([chunks + b"data: [DONE]\n\n"] if reads == 1 else [chunks, b"data: [DONE]\n\n"])
    assert logged == ['{"n":%d}' % n for n in range(5)]
    assert out == b"".join(b'id: %d\ndata: {"n":%d}\n\n' % (n + 1, n) for n in range(5)) + b"data: [DONE]\n\n"


def test_a_v1_stream_id_is_its_keys_alone(start_relay: Callable[..., RelayServer], sim_server: SimServer) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_API_KEYS="key-one-123456,key-two-654321")
    one = {"authorization": "Bearer key-one-123456"}
    two = {"authorization": "Bearer key-two-654321"}
    first = httpx.post(relay.url + "/v1/chat/completions", json=body(model="sim:ttft=0,tps=0,tokens=5"),
                       headers=one, timeout=30)
    url = f"{relay.url}/api/streams/{first.headers['x-stream-id']}"
    assert httpx.get(url, headers={**one, "accept": "text/event-stream"}).content == first.content
    assert httpx.get(url, headers={**two, "accept": "text/event-stream"}).status_code == 404
    assert httpx.delete(url, headers=two).status_code == 404


def test_the_status_of_a_stream_with_a_chunk_not_in_openais_shape_is_the_rest_of_its_text(
        start_relay: Callable[..., RelayServer]) -> None:
    """A passthrough stream's chunks are logged as the upstream sent them. One whose
    ``choices`` is not a list adds nothing to the status's text, and is not a 500."""
    chunks = [b'{"choices":5}', b'{"choices":[{"index":0,"delta":{"content":"ok"}}]}', b"[DONE]"]

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + b"".join(chunked(b"data: %s\n\n" % c) for c in chunks) + b"0\r\n\r\n")
        await writer.drain()

    with in_thread(lambda: serving(upstream, path="/v1")) as (url, _):
        relay = start_relay(upstream=str(url))
        first = post(relay, body(model="sim:ttft=0,tokens=1"))
        assert first.status_code == 200 and b'"choices":5' in first.content
        status = httpx.get(f"{relay.url}/api/streams/{first.headers['x-stream-id']}", timeout=10)
        relay.stop()  # its kept connections end, and with them the upstream's handlers
    assert status.status_code == 200 and status.json()["text"] == "ok"
