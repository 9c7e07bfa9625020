"""The several-instances deployment (``deploy/nginx/tokenrelay-multi.conf``), run for real:
nginx with the shipped file in front of two ``tokenrelay serve`` sharing one redis-server.

Streaming and jobs work through it whichever instance a request reaches. Resuming a stream
on the instance that did not start it waits for the streams to be kept in Redis: that test
is marked as expected to fail until then (strictly, so that it must be unmarked once it
passes)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from proxies import NGINX_CONF, NGINX_MULTI_CONF, Proxy, start_nginx_multi
from servers import RelayServer, SimServer, wait_until
from streams import chat, read_stream

from tokenrelay.providers.sse_decoder import SSEDecoder

REDIS_DB = 13  # a database of its own on the shared redis-server: no other test's workers take these jobs


@dataclass
class Multi:
    proxy: Proxy
    relays: list[RelayServer]
    redis_url: str


@pytest.fixture(scope="module")
def multi(redis_url: str, sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> Iterator[Multi]:
    shared = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    relays = [start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_REDIS_URL=shared) for _ in range(2)]
    with start_nginx_multi([relay.url for relay in relays]) as proxy:
        yield Multi(proxy, relays, shared)


def _location_directives(conf: str) -> list[str]:
    """The stream routes' ``location`` line and its directives, without comments."""
    block = re.search(r"^\s*location ~ .*?\{.*?^\s*\}", conf, flags=re.MULTILINE | re.DOTALL)
    assert block, "no stream location"
    lines = (line.split("#", 1)[0].strip() for line in block[0].splitlines())
    return [line for line in lines if line]


def test_the_multi_config_streams_as_the_single_one_does() -> None:
    """The same stream location and directives as the tested single-instance file."""
    assert _location_directives(NGINX_MULTI_CONF.read_text()) == _location_directives(NGINX_CONF.read_text())


def _streams_served(relay: RelayServer) -> float:
    metrics = httpx.get(relay.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("tokenrelay_streams_total{"))


@pytest.mark.parametrize("sse", [False, True], ids=["text", "sse"])
def test_answers_stream_through_both_instances(multi: Multi, sse: bool) -> None:
    before = [_streams_served(relay) for relay in multi.relays]
    model = "sim:ttft=0,tps=50,tokens=20"
    for _ in range(4):
        arrivals = read_stream(multi.proxy.url, chat("several instances", model=model), sse=sse)
        assert arrivals.status == 200 and arrivals.error is None
        assert arrivals.headers["x-stream-id"]
        assert len(arrivals.chunks) >= 10 and arrivals.spread > 0.2  # piece by piece, not in one lump
        if sse:
            assert arrivals.events()[-1].event == "done"
    def counted() -> list[float] | None:  # an answer is counted as it ends, just after its last byte
        served = [_streams_served(relay) for relay in multi.relays]
        return served if sum(served) - sum(before) == 4 else None

    after = wait_until(counted, timeout=5)
    assert all(a > b for a, b in zip(after, before)), (before, after)  # each instance took some


def _follow(client: httpx.Client, job_id: str) -> list[tuple[str, Any]]:
    decoder = SSEDecoder()
    events: list[tuple[str, Any]] = []
    with client.stream("GET", f"/api/jobs/{job_id}/stream") as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_raw():
            events += [(e.event, orjson.loads(e.data)) for e in decoder.feed(chunk)]
    return events


def test_a_job_is_one_whichever_instance_is_asked(multi: Multi) -> None:
    one, other = multi.relays
    with httpx.Client(base_url=one.url, timeout=10) as first, httpx.Client(base_url=other.url, timeout=10) as second:
        created = first.post("/api/jobs", json=chat("a job for anyone", model="sim:ttft=0,tps=40,tokens=30"))
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        events = _follow(second, job_id)  # followed live on the instance it was not submitted to
        assert events[-1][0] == "done"
        text = "".join(data["text"] for kind, data in events if kind == "message")
        assert second.get(f"/api/jobs/{job_id}").json()["result"]["text"] == text
        assert first.get(f"/api/jobs/{job_id}").json()["result"]["text"] == text


def test_jobs_work_through_the_proxy(multi: Multi) -> None:
    with httpx.Client(base_url=multi.proxy.url, timeout=10) as client:
        ids = []
        for n in range(4):
            created = client.post("/api/jobs", json=chat(f"job {n}", model="sim:echo,ttft=0,tps=100"))
            assert created.status_code == 202, created.text
            ids.append(created.json()["id"])
        for n, job_id in enumerate(ids):
            events = _follow(client, job_id)
            assert events[-1][0] == "done"
            assert "".join(data["text"] for kind, data in events if kind == "message") == f"job {n}"
            polled = client.get(f"/api/jobs/{job_id}").json()
            assert polled["status"] == "succeeded" and polled["result"]["text"] == f"job {n}"


def _start_and_drop(url: str, *, events: int) -> tuple[str, int, str]:
    """Start an SSE answer at ``url``, read ``events`` pieces and drop the connection: its
    stream id, the last event id read and the text read."""
    decoder = SSEDecoder()
    text, last = [], 0
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/api/get-response", headers={"accept": "text/event-stream"},
                           json=chat("resume me elsewhere", model="sim:ttft=0,tps=40,tokens=60")) as response:
            stream_id = response.headers["x-stream-id"]
            for chunk in response.iter_raw():
                for event in decoder.feed(chunk):
                    if event.event == "message":
                        text.append(orjson.loads(event.data)["text"])
                        last = int(event.id or 0)
                if last >= events:
                    break
    return stream_id, last, "".join(text)


def test_a_stream_started_on_one_instance_resumes_on_the_other(multi: Multi) -> None:
    one, other = multi.relays
    stream_id, last, before = _start_and_drop(one.url, events=5)
    decoder = SSEDecoder()
    resumed: list[Any] = []
    with httpx.Client(timeout=10) as client:
        with client.stream("GET", f"{other.url}/api/streams/{stream_id}",
                           headers={"accept": "text/event-stream", "last-event-id": str(last)}) as response:
            assert response.status_code == 200, response.read()
            for chunk in response.iter_raw():
                resumed += decoder.feed(chunk)
        ids = [int(e.id) for e in resumed if e.event == "message"]
        assert ids == list(range(last + 1, last + 1 + len(ids)))
        assert resumed[-1].event == "done"
        kept = client.get(f"{one.url}/api/streams/{stream_id}", headers={"accept": "application/json"}).json()
    assert before + "".join(orjson.loads(e.data)["text"] for e in resumed if e.event == "message") == kept["text"]
