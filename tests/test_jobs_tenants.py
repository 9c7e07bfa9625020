"""Jobs belong to the client key that created them: on a real ``tokenrelay serve`` with two
keys, the other key cannot see, follow or cancel them, and Idempotency-Keys are each key's
own. Without keys nothing changes, and records written before jobs had owners stay readable."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from servers import RelayServer, SimServer
from streams import chat
from test_jobs import read_events, submit, wait_ended

from tokenrelay.jobs.model import Job, new_job

KEY1, KEY2 = "tenant-one-secret", "tenant-two-secret"


@pytest.fixture(scope="module")
def relay(sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> RelayServer:
    return start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_API_KEYS=f"{KEY1},{KEY2}")


@pytest.fixture()
def one(relay: RelayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay.url, timeout=10, headers={"authorization": f"Bearer {KEY1}"}) as c:
        yield c


@pytest.fixture()
def two(relay: RelayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay.url, timeout=10, headers={"authorization": f"Bearer {KEY2}"}) as c:
        yield c


def test_another_key_s_job_is_not_found(one: httpx.Client, two: httpx.Client) -> None:
    job_id = submit(one, chat("mine", model="sim:echo,ttft=0,tps=0"))["id"]
    wait_ended(one, job_id)
    for response in (two.get(f"/api/jobs/{job_id}"), two.get(f"/api/jobs/{job_id}/stream"),
                     two.delete(f"/api/jobs/{job_id}")):
        assert response.status_code == 404, response.text
        # The same answer as for a job that does not exist: nothing to learn from it.
        assert response.json()["error"] == {"type": "not_found", "message": f"no job {job_id!r}"}
    assert one.get(f"/api/jobs/{job_id}").json()["result"]["text"] == "mine"
    events, _ = read_events(one, job_id)
    assert events[-1][0] == "done"


def test_another_key_cannot_cancel_a_running_job(one: httpx.Client, two: httpx.Client) -> None:
    job_id = submit(one, chat(model="sim:ttft=0,tps=20,tokens=100"))["id"]
    assert two.delete(f"/api/jobs/{job_id}").status_code == 404
    assert one.delete(f"/api/jobs/{job_id}").json()["status"] == "cancelled"


def test_idempotency_keys_are_per_client_key(one: httpx.Client, two: httpx.Client) -> None:
    body = chat("same body", model="sim:ttft=0,tps=0")
    first = submit(one, body, **{"Idempotency-Key": "order-1"})
    # The same key and body from another client key is another job, not the first one's.
    other = two.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert other.status_code == 202 and other.json()["id"] != first["id"]
    assert "idempotent-replayed" not in other.headers
    # Another body under the key: refused naming the key's own job, never the other key's.
    reused = two.post("/api/jobs", json=chat("else"), headers={"Idempotency-Key": "order-1"})
    assert reused.status_code == 422
    assert other.json()["id"] in reused.json()["error"]["message"]
    assert first["id"] not in reused.json()["error"]["message"]
    # Each key replays its own job.
    again = one.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert again.json()["id"] == first["id"] and again.headers["idempotent-replayed"] == "true"
    again = two.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert again.json()["id"] == other.json()["id"]


def test_a_record_without_an_owner_is_readable_by_any_key() -> None:
    record = new_job(request={"messages": []}, model="sim", webhook_url=None, idempotency_key="k", body_hash="h")
    raw = record.to_json().replace(b',"owner":null', b"")
    assert b"owner" not in raw  # as records were written before jobs had owners
    old = Job.from_json(raw)
    assert old.owner is None and old.visible_to("key-12345678") and old.idempotency_scope == "k"
    owned = new_job(request={"messages": []}, model="sim", webhook_url=None, idempotency_key="k", body_hash="h",
                    owner="alice")
    assert owned.visible_to("alice") and not owned.visible_to("bob") and owned.visible_to(None)
    assert owned.idempotency_scope != old.idempotency_scope
