"""Resumable streams on one instance (docs/resume.md): a cut connection loses nothing and
repeats nothing, leaving is not stopping for the grace time, a stop stops the model from
another connection, and a stream id is its creator's alone. Real relay and simulator
processes on loopback; the simulator's answers are deterministic, so an uninterrupted run is
the reference."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import orjson
import pytest

from servers import RelayServer, SimServer, wait_until
from streams import chat
from test_cancel import open_request

from tokenrelay.providers.sse_decoder import SSEDecoder

MODEL = "sim:ttft=0,tps=40,tokens=60"


def sse_events(raw: bytes) -> list[tuple[str, str, str]]:
    """(event, id, data) of every event in ``raw``."""
    return [(e.event, e.id, e.data) for e in SSEDecoder().feed(raw)]


def texts(events: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    return [(eid, orjson.loads(data)["text"]) for kind, eid, data in events if kind == "message"]


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        data = sock.recv(65536)
        assert data, "the stream ended early"
        got += data
    return got


def dechunk(raw: bytes) -> bytes:
    """An HTTP/1.1 chunked body (as far as it went) without its framing."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        if not rest:
            break
        length = int(size, 16)
        if length == 0 or len(rest) < length:
            out += rest[:length]
            break
        out += rest[:length]
        body = rest[length + 2:]
    return out


def stream_id_of(raw: bytes) -> str:
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    return next(line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-stream-id"))


def cut_sse(relay: RelayServer, model: str, after: int | None) -> tuple[list[tuple[str, str]], str]:
    """An SSE answer whose connection is cut after event ``after`` (None: once its last event
    arrived): the text events the first connection kept, and the stream's id."""
    sock = open_request(relay, chat(model=model), accept="text/event-stream", grace=None)
    raw = read_until(sock, b"event: done" if after is None else b"id: %d\n" % after)
    sock.close()
    first = texts(sse_events(dechunk(raw)))
    return (first if after is None else first[:after]), stream_id_of(raw)


def joined_text(first: list[tuple[str, str]], resumed: httpx.Response) -> str:
    """The text of a cut stream's first events and its resume, checked to join with no gap and
    no duplicate: one start, one done, ids numbered on from 1."""
    assert resumed.status_code == 200
    events = sse_events(resumed.content)
    assert [kind for kind, _, _ in events if kind != "message"] == ["start", "done"]
    joined = first + texts(events)
    assert [int(eid) for eid, _ in joined] == list(range(1, len(joined) + 1))
    return "".join(text for _, text in joined)


def cut_plain_text(relay: RelayServer, model: str) -> tuple[bytes, str]:
    """A plain-text answer cut once 40 bytes of it arrived: those bytes, and the stream's id."""
    sock = open_request(relay, chat(model=model), grace=None)
    raw = read_until(sock, b"\r\n\r\n")
    while len(dechunk(raw)) < 40:
        raw += sock.recv(65536)
    sock.close()
    return dechunk(raw), stream_id_of(raw)


@pytest.mark.parametrize("cut", ["early", "as it ends"])
def test_a_cut_sse_stream_resumes_with_no_gap_and_no_duplicate(relay_server: RelayServer, cut: str) -> None:
    """Cut after the third event, or once the last one arrived: the pieces of the first
    connection and of the resume join into exactly the uninterrupted answer, numbered on."""
    whole = httpx.post(relay_server.url + "/api/get-response", json=chat(model=MODEL),
                       headers={"accept": "text/event-stream"}, timeout=30)
    reference = "".join(text for _, text in texts(sse_events(whole.content)))

    first, stream_id = cut_sse(relay_server, MODEL, 3 if cut == "early" else None)
    resumed = httpx.get(f"{relay_server.url}/api/streams/{stream_id}",
                        headers={"accept": "text/event-stream", "last-event-id": first[-1][0]}, timeout=30)
    assert joined_text(first, resumed) == reference


def test_plain_text_resumes_from_a_byte_offset(relay_server: RelayServer) -> None:
    reference = httpx.post(relay_server.url + "/api/get-response", json=chat(model=MODEL), timeout=30).content
    got, stream_id = cut_plain_text(relay_server, MODEL)
    rest = httpx.get(f"{relay_server.url}/api/streams/{stream_id}?offset={len(got)}",
                     headers={"accept": "text/plain"}, timeout=30)
    assert rest.status_code == 200
    assert got + rest.content == reference  # a cut inside a UTF-8 character joins up too


def test_leaving_is_not_stopping_within_the_grace(relay_server: RelayServer, sim_server: SimServer) -> None:
    reference = httpx.post(relay_server.url + "/api/get-response", json=chat(model="sim:ttft=0,tps=0,tokens=50"))
    sim_server.wait_idle()
    before = sim_server.stats()
    sock = open_request(relay_server, chat(model="sim:ttft=0,tps=50,tokens=50"), accept="text/event-stream",
                        grace=None)
    raw = read_until(sock, b"id: 1\n")
    sock.close()
    stream_id = stream_id_of(raw)
    url = f"{relay_server.url}/api/streams/{stream_id}"
    wait_until(lambda: httpx.get(url).json()["status"] != "running", timeout=10)
    status = httpx.get(url).json()
    assert status["status"] == "completed" and status["text"] == reference.text
    after = sim_server.wait_idle()
    assert after["completed_streams"] == before["completed_streams"] + 1
    assert after["cancelled_streams"] == before["cancelled_streams"]


def test_an_abandoned_stream_stops_after_its_grace(relay_server: RelayServer, sim_server: SimServer) -> None:
    sim_server.wait_idle()
    before = sim_server.stats()["cancelled_streams"]
    sock = open_request(relay_server, chat(model="sim:ttft=0,tps=10,tokens=400"), accept="text/event-stream",
                        grace=0.5)
    raw = read_until(sock, b"id: 1\n")
    sock.close()
    wait_until(lambda: sim_server.stats()["cancelled_streams"] > before, timeout=1.5 + 1.0)
    status = httpx.get(f"{relay_server.url}/api/streams/{stream_id_of(raw)}").json()
    assert status["status"] == "stopped" and status["ending"]["reason"] == "abandoned"
    assert status["text"]  # the partial answer stays readable


def test_delete_stops_the_model_and_every_reader_hears_it(relay_server: RelayServer, sim_server: SimServer) -> None:
    sim_server.wait_idle()
    before = sim_server.stats()["cancelled_streams"]
    sock = open_request(relay_server, chat(model="sim:ttft=0,tps=10,tokens=400"), accept="text/event-stream",
                        grace=None)
    raw = read_until(sock, b"id: 2\n")
    stream_id = stream_id_of(raw)
    with httpx.Client(timeout=10) as client, client.stream(
            "GET", f"{relay_server.url}/api/streams/{stream_id}", headers={"accept": "text/event-stream"}) as other:
        assert other.status_code == 200
        stopped = client.delete(f"{relay_server.url}/api/streams/{stream_id}")
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        assert sim_server.stats()["cancelled_streams"] == before + 1  # closed before DELETE answered
        other_events = sse_events(b"".join(other.iter_bytes()))
    assert other_events[-1][0] == "stopped"
    first = read_until(sock, b"event: stopped")
    sock.close()
    assert b"\nevent: stopped\ndata: {\"reason\":\"stopped\"" in first  # the asking connection hears it too
    # the answer stays readable, and a later DELETE changes nothing
    again = httpx.delete(f"{relay_server.url}/api/streams/{stream_id}")
    assert again.status_code == 200 and again.json()["status"] == "stopped"


def test_unknown_ids_are_404(relay_server: RelayServer) -> None:
    for method in ("GET", "DELETE"):
        response = httpx.request(method, relay_server.url + "/api/streams/st_" + "0" * 32)
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found"


def test_a_bad_cursor_or_grace_is_a_clear_400(relay_server: RelayServer) -> None:
    done = httpx.post(relay_server.url + "/api/get-response", json=chat(model="sim:ttft=0,tps=0,tokens=3"))
    url = f"{relay_server.url}/api/streams/{done.headers['x-stream-id']}"
    response = httpx.get(url, headers={"accept": "text/event-stream", "last-event-id": "soon"})
    assert response.status_code == 422 and "after" in response.json()["error"]["message"]
    bad = httpx.post(relay_server.url + "/api/get-response", json=chat(model="sim"), headers={"x-resume-grace": "-1"})
    assert bad.status_code == 422 and "X-Resume-Grace" in bad.json()["error"]["message"]


def test_stream_ids_are_capabilities_of_their_key(start_relay: Callable[..., RelayServer], sim_server: SimServer) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_API_KEYS="key-one-123456,key-two-654321")
    one = {"authorization": "Bearer key-one-123456"}
    two = {"authorization": "Bearer key-two-654321"}
    answer = httpx.post(relay.url + "/api/get-response", json=chat(model="sim:ttft=0,tps=0,tokens=5"), headers=one)
    stream_id = answer.headers["x-stream-id"]
    assert len(stream_id.removeprefix("st_")) == 32  # 128 bits
    url = f"{relay.url}/api/streams/{stream_id}"
    assert httpx.get(url, headers=one).json()["text"] == answer.text
    assert httpx.get(url, headers=two).status_code == 404
    assert httpx.delete(url, headers=two).status_code == 404
