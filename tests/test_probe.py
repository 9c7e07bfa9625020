"""``GET /api/probe``: ticks on time, in text and SSE, with the stream route's headers; bad
values refused; the idle silence really silent."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
from servers import RelayServer
from streams import Arrivals

from tokenrelay.providers.sse_decoder import SSEDecoder


def get_probe(relay: RelayServer, query: str, *, sse: bool = False) -> Arrivals:
    headers = {"accept": "text/event-stream"} if sse else {}
    with httpx.Client(timeout=30) as client, \
            client.stream("GET", f"{relay.url}/api/probe?{query}", headers=headers) as response:
        result = Arrivals(status=response.status_code, headers=response.headers)
        for chunk in response.iter_raw():
            result.chunks.append(chunk)
            result.times.append(time.perf_counter())
    return result


def test_text_ticks_arrive_one_by_one_with_their_send_times(relay_server: RelayServer) -> None:
    got = get_probe(relay_server, "ticks=5&interval=0.2")
    assert got.status == 200
    assert got.headers["content-type"] == "text/plain; charset=utf-8"
    assert got.headers["cache-control"] == "no-cache, no-transform"
    assert got.headers["x-accel-buffering"] == "no"
    assert "x-tokenrelay-probe" in got.headers
    lines = got.body.decode().splitlines()
    assert [line.split()[1] for line in lines] == [f"seq={n}" for n in range(1, 6)]
    offsets = [float(line.split()[3].removeprefix("t=")) for line in lines]
    assert offsets[0] < 0.05
    assert 0.7 < offsets[-1] < 1.2
    sent = [float(line.split()[4].removeprefix("sent=")) for line in lines]
    assert sent == sorted(sent) and abs(sent[0] - time.time()) < 60
    assert len(got.chunks) == 5, "each tick is its own chunk on the wire"
    assert 0.6 < got.spread < 1.5


def test_sse_ticks(relay_server: RelayServer) -> None:
    got = get_probe(relay_server, "ticks=3&interval=0.05", sse=True)
    assert got.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = SSEDecoder().feed(got.body)
    assert [e.event for e in events] == ["tick"] * 3
    assert [e.id for e in events] == ["1", "2", "3"]
    data = [orjson.loads(e.data) for e in events]
    assert [d["seq"] for d in data] == [1, 2, 3] and all(d["of"] == 3 for d in data)
    assert data[0]["t"] <= data[1]["t"] <= data[2]["t"]


def test_defaults_are_eight_ticks_a_quarter_second_apart(relay_server: RelayServer) -> None:
    got = get_probe(relay_server, "")
    lines = got.body.decode().splitlines()
    assert len(lines) == 8
    assert 1.6 < float(lines[-1].split()[3].removeprefix("t=")) < 2.2


def test_idle_keeps_silent_before_the_last_tick(relay_server: RelayServer) -> None:
    got = get_probe(relay_server, "ticks=3&interval=0&idle=1.2")
    assert got.body.decode().count("tick ") == 3
    # two ticks at once, then nothing at all (no heartbeat) until the last one
    gaps = [b - a for a, b in zip(got.times, got.times[1:])]
    assert len(got.chunks) == 3
    assert gaps[0] < 0.3 and 1.0 < gaps[1] < 2.5


@pytest.mark.parametrize(
    "query",
    ["ticks=0", "ticks=101", "ticks=two", "interval=-1", "interval=11", "interval=nan", "idle=1000", "idle=inf"],
)
def test_bad_values_are_refused(relay_server: RelayServer, query: str) -> None:
    response = httpx.get(f"{relay_server.url}/api/probe?{query}", timeout=5)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    assert query.split("=")[0] in error["message"]
