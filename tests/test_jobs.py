"""``/api/jobs`` on a real ``tokenrelay serve`` (SQLite mode) in front of the real simulator,
with webhooks sent to a real receiver on loopback."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from servers import Process, RelayServer, SimServer, free_port, wait_until
from standardwebhooks.webhooks import Webhook
from streams import chat
from webhook_receiver import SECRET, running_receiver

from tokenrelay.providers.sse_decoder import SSEDecoder

FAST_RETRIES = {"TOKENRELAY_WEBHOOK_BACKOFF": "0.05", "TOKENRELAY_WEBHOOK_BACKOFF_MAX": "0.2"}


@pytest.fixture(scope="module")
def relay(sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> RelayServer:
    return start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_WEBHOOK_SECRET=SECRET,
                       TOKENRELAY_WEBHOOK_ALLOW_PRIVATE="true", TOKENRELAY_WEBHOOK_MAX_ATTEMPTS="4",
                       **FAST_RETRIES)


@pytest.fixture()
def client(relay: RelayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay.url, timeout=10) as c:
        yield c


def submit(client: httpx.Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = client.post("/api/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/api/jobs/{response.json()['id']}"
    return dict(response.json())


def wait_ended(client: httpx.Client, job_id: str, timeout: float = 10) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = client.get(f"/api/jobs/{job_id}").json()
        return job if job["status"] not in ("queued", "running") else None
    return dict(wait_until(ended, timeout=timeout))


def wait_webhook(client: httpx.Client, job_id: str, state: str, timeout: float = 10) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = client.get(f"/api/jobs/{job_id}").json()
        return job if job["webhook"]["state"] == state else None
    return dict(wait_until(reached, timeout=timeout))


def test_submit_then_poll(client: httpx.Client) -> None:
    created = submit(client, chat("poll me please", model="sim:echo,ttft=0,tps=0"))
    assert created["status"] == "queued" and created["id"].startswith("job_")
    job = wait_ended(client, created["id"])
    assert job["status"] == "succeeded"
    assert job["result"]["text"] == "poll me please"
    assert job["result"]["finish_reason"] == "stop"
    assert job["result"]["usage"]["completion_tokens"] == 3
    assert job["error"] is None and job["webhook"] is None and job["deliveries"] == []
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]


def test_failed_job_reports_the_upstream_error(client: httpx.Client) -> None:
    job = wait_ended(client, submit(client, chat(model="sim:ttft=0,tps=0,fault=http-500"))["id"])
    assert job["status"] == "failed"
    assert job["error"]["type"] == "upstream_error" and "500" in job["error"]["message"]


def test_idempotency_key(client: httpx.Client) -> None:
    body = chat("once", model="sim:ttft=0,tps=0")
    first = submit(client, body, **{"Idempotency-Key": "order-17"})
    again = client.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = client.post("/api/jobs", json=chat("twice"), headers={"Idempotency-Key": "order-17"})
    assert other.status_code == 422
    assert other.json()["error"]["type"] == "idempotency_key_reused"
    assert first["id"] in other.json()["error"]["message"]
    assert submit(client, body)["id"] != first["id"]  # no key: a new job each time


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"messages": []}, 422, "validation_error"),
    ({"messages": [{"role": "user", "content": "x"}], "webhook_url": "ftp://example.com/x"}, 422,
     "validation_error"),
    ({"messages": [{"role": "user", "content": "x"}], "webhook_url": "http://user:pw@example.com/"}, 422,
     "validation_error"),
])
def test_bad_requests(client: httpx.Client, body: dict[str, Any], status: int, kind: str) -> None:
    response = client.post("/api/jobs", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == kind


def test_unknown_job(client: httpx.Client) -> None:
    for method, path in (("GET", "/api/jobs/job_nope"), ("DELETE", "/api/jobs/job_nope"),
                         ("GET", "/api/jobs/job_nope/stream")):
        response = client.request(method, path)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


def test_webhook_url_without_a_secret_is_refused(sim_server: SimServer,
                                                 start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1")
    response = httpx.post(relay.url + "/api/jobs", json=chat(webhook_url="https://example.com/hook"))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "webhooks_not_configured" and "TOKENRELAY_WEBHOOK_SECRET" in error["message"]
    assert httpx.post(relay.url + "/api/jobs", json=chat()).status_code == 202  # polling still works


def read_events(client: httpx.Client, job_id: str) -> tuple[list[tuple[str, Any]], list[float]]:
    decoder = SSEDecoder()
    events, times = [], []
    with client.stream("GET", f"/api/jobs/{job_id}/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_raw():
            for event in decoder.feed(chunk):
                events.append((event.event, orjson.loads(event.data)))
                times.append(time.perf_counter())
    return events, times


def test_stream_follows_live_then_replays(client: httpx.Client) -> None:
    job = submit(client, chat(model="sim:ttft=0,tps=25,tokens=25"))
    events, times = read_events(client, job["id"])
    assert events[0] == ("start", {"stream_id": job["id"], "model": "sim:ttft=0,tps=25,tokens=25"})
    assert events[-1][0] == "done" and events[-1][1]["usage"]["completion_tokens"] == 25
    pieces = [data["text"] for kind, data in events if kind == "message"]
    assert len(pieces) > 10
    assert times[-1] - times[1] > 0.4  # pieces arrived over ~1 s as written, not in one burst
    ended = client.get(f"/api/jobs/{job['id']}").json()
    assert "".join(pieces) == ended["result"]["text"]
    replay, _ = read_events(client, job["id"])  # after the end: the whole text, then done
    assert "".join(d["text"] for k, d in replay if k == "message") == ended["result"]["text"]
    assert replay[-1][0] == "done"


def test_stream_of_a_failing_job_ends_with_error(client: httpx.Client) -> None:
    job = submit(client, chat(model="sim:ttft=0,tps=50,tokens=20,fault=error-mid"))
    events, _ = read_events(client, job["id"])
    assert any(kind == "message" for kind, _ in events)
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"].startswith("upstream")
    assert wait_ended(client, job["id"])["status"] == "failed"


def cancel_a_running_job(client: httpx.Client, sim_server: SimServer, *,
                         model: str = "sim:ttft=0,tps=5,tokens=200") -> dict[str, Any]:
    """Submit a long job, follow it, cancel it once some text has arrived, and check that its
    upstream stream was cancelled at the simulator (whichever process ran it) and that the
    job keeps the text it had written; the cancelled job."""
    sim_server.wait_idle(timeout=10)
    before = sim_server.stats()
    job = submit(client, chat(model=model))
    decoder = SSEDecoder()
    events: list[tuple[str, Any]] = []
    cancelled: dict[str, Any] = {}
    with client.stream("GET", f"/api/jobs/{job['id']}/stream") as stream:
        for chunk in stream.iter_raw():
            events += [(e.event, orjson.loads(e.data)) for e in decoder.feed(chunk)]
            if not cancelled and any(kind == "message" for kind, _ in events):
                response = client.delete(f"/api/jobs/{job['id']}")
                assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
                cancelled = response.json()
    after = sim_server.wait_idle(timeout=10)
    assert after["cancelled_streams"] == before["cancelled_streams"] + 1
    assert events[-1] == ("error", {"error": {"type": "job_cancelled", "message": "the job was cancelled"}})
    streamed = "".join(data["text"] for kind, data in events if kind == "message")
    kept = cancelled["result"]["text"]
    assert kept and streamed.startswith(kept)  # what followers had seen when it was cancelled
    record = client.get(f"/api/jobs/{job['id']}").json()
    assert record["status"] == "cancelled" and record["result"]["text"] == kept
    assert record["webhook"] is None and record["finished_at"] is not None
    return record


def test_cancel_a_running_job_stops_the_upstream(client: httpx.Client, sim_server: SimServer) -> None:
    job = cancel_a_running_job(client, sim_server)
    again = client.delete(f"/api/jobs/{job['id']}")
    assert again.status_code == 409 and "cancelled" in again.json()["error"]["message"]
    events, _ = read_events(client, job["id"])  # replayed: the text it kept, then why it ended
    assert "".join(d["text"] for k, d in events if k == "message") == job["result"]["text"]
    assert events[-1] == ("error", {"error": {"type": "job_cancelled", "message": "the job was cancelled"}})


def test_cancel_a_queued_job(sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_JOB_CONCURRENCY="1")
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        busy = submit(client, chat(model="sim:ttft=0,tps=5,tokens=200"))
        queued = submit(client, chat(model="sim:ttft=0,tps=0"))
        wait_until(lambda: client.get(f"/api/jobs/{busy['id']}").json()["status"] == "running")
        assert client.get(f"/api/jobs/{queued['id']}").json()["status"] == "queued"
        assert client.delete(f"/api/jobs/{queued['id']}").json()["status"] == "cancelled"
        assert client.delete(f"/api/jobs/{busy['id']}").json()["status"] == "cancelled"
        assert client.get(f"/api/jobs/{queued['id']}").json()["result"] is None


def a_retry_holds_no_slot(client: httpx.Client) -> None:
    """With one job slot, a job whose webhook waits to be retried lets the next job run: the
    retry is a scheduled item, not a wait in the first job's slot. Needs a relay (or worker)
    with job concurrency 1 and a webhook backoff of seconds."""
    with running_receiver(fail_first=1) as (url, receiver):
        first = submit(client, chat("hook me", model="sim:echo,ttft=0,tps=0", webhook_url=url))
        wait_until(lambda: len(client.get(f"/api/jobs/{first['id']}").json()["deliveries"]) == 1, timeout=20)
        second = wait_ended(client, submit(client, chat("me too", model="sim:echo,ttft=0,tps=0"))["id"])
        assert second["status"] == "succeeded" and second["result"]["text"] == "me too"
        waiting = client.get(f"/api/jobs/{first['id']}").json()
        assert waiting["webhook"]["state"] == "pending" and len(waiting["deliveries"]) == 1  # still due later
        record = wait_webhook(client, first["id"], "delivered", timeout=20)
    assert [d["status_code"] for d in record["deliveries"]] == [500, 204]
    assert second["finished_at"] < record["deliveries"][1]["at"]
    assert [d.status for d in receiver.deliveries] == [500, 204]


def test_a_webhook_retry_holds_no_job_slot(sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_JOB_CONCURRENCY="1",
                        TOKENRELAY_WEBHOOK_SECRET=SECRET, TOKENRELAY_WEBHOOK_ALLOW_PRIVATE="true",
                        TOKENRELAY_WEBHOOK_BACKOFF="3", TOKENRELAY_WEBHOOK_BACKOFF_MAX="3")
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        a_retry_holds_no_slot(client)


def test_webhook_is_signed_and_retried_under_one_id(client: httpx.Client) -> None:
    with running_receiver(fail_first=2) as (url, receiver):
        job = submit(client, chat("hook me", model="sim:echo,ttft=0,tps=0", webhook_url=url))
        record = wait_webhook(client, job["id"], "delivered")
        attempts = receiver.deliveries
        assert [d.status for d in attempts] == [500, 500, 204]
        assert {d.webhook_id for d in attempts} == {record["webhook"]["id"]}
        assert all(d.verified for d in attempts)
        assert len({d.body for d in attempts}) == 1  # the same bytes every time
        # Verified independently of the receiver, with the library a user would use.
        last = attempts[-1]
        payload = Webhook(SECRET).verify(last.body, last.headers)
        assert payload["type"] == "job.succeeded"
        assert payload["data"]["id"] == job["id"] and payload["data"]["result"]["text"] == "hook me"
        assert payload["timestamp"] == record["finished_at"]
        assert [(d["attempt"], d["status_code"]) for d in record["deliveries"]] == [(1, 500), (2, 500), (3, 204)]
        assert record["deliveries"][0]["error"] == "receiver answered 500"
        assert all(d["duration_ms"] >= 0 and d["at"] for d in record["deliveries"])


def test_webhook_of_a_failed_job(client: httpx.Client) -> None:
    with running_receiver() as (url, receiver):
        job = submit(client, chat(model="sim:ttft=0,tps=0,fault=error-before", webhook_url=url))
        wait_until(lambda: receiver.unique())
        payload = next(iter(receiver.unique().values())).payload
        assert payload["type"] == "job.failed" and payload["data"]["id"] == job["id"]
        assert payload["data"]["error"]["type"].startswith("upstream")


def test_webhook_gives_up_after_max_attempts(client: httpx.Client) -> None:
    with running_receiver(fail_first=100) as (url, receiver):
        job = submit(client, chat(model="sim:ttft=0,tps=0", webhook_url=url))
        wait_webhook(client, job["id"], "failed")
        assert len(receiver.deliveries) == 4
        assert len(client.get(f"/api/jobs/{job['id']}").json()["deliveries"]) == 4


def test_private_addresses_are_refused_by_default(sim_server: SimServer,
                                                  start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_WEBHOOK_SECRET=SECRET, **FAST_RETRIES)
    with running_receiver() as (url, receiver), httpx.Client(base_url=relay.url, timeout=10) as client:
        # A literal address is refused when the job is submitted...
        for literal in (url, url.replace("127.0.0.1", "[::ffff:127.0.0.1]"), "http://[64:ff9b::a00:1]/hook"):
            response = client.post("/api/jobs", json=chat(model="sim:ttft=0,tps=0", webhook_url=literal))
            assert response.status_code == 422, literal
            assert "TOKENRELAY_WEBHOOK_ALLOW_PRIVATE" in response.json()["error"]["message"]
        # ...a name, at each attempt, by what it resolves to then.
        job_id = submit(client, chat(model="sim:ttft=0,tps=0", webhook_url=url.replace("127.0.0.1", "localhost")))["id"]
        record = wait_webhook(client, job_id, "failed")
        assert len(record["deliveries"]) == 1  # refused for good, not retried
        assert "TOKENRELAY_WEBHOOK_ALLOW_PRIVATE" in record["deliveries"][0]["error"]
        assert receiver.deliveries == []


@pytest.mark.parametrize("hook", ["http://[::1", "http://[::1/hook", "https://[nothost]/x"])
def test_an_unparseable_webhook_url_is_a_clear_error(client: httpx.Client, hook: str) -> None:
    response = client.post("/api/jobs", json=chat(webhook_url=hook))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "validation_error" and error["message"].startswith("webhook_url:")


def test_several_serve_processes_need_redis_for_jobs(log_dir: Path) -> None:
    port = free_port()
    relay = Process(["serve", "--port", str(port), "--workers", "2"], port=port, ready_path="/healthz",
                    env={"TOKENRELAY_DATA_DIR": tempfile.mkdtemp(prefix="tokenrelay-data-")}, log_dir=log_dir)
    try:
        for _ in range(4):  # whichever process answers
            response = httpx.post(relay.url + "/api/jobs", json=chat())
            assert response.status_code == 503
            assert "TOKENRELAY_REDIS_URL" in response.json()["error"]["message"]
        assert httpx.post(relay.url + "/api/get-response", json=chat(stream=False)).status_code == 200
    finally:
        relay.stop()
