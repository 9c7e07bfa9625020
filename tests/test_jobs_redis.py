"""Jobs on the Redis task queue: ``tokenrelay serve`` with ``TOKENRELAY_REDIS_URL`` takes them
in, two ``tokenrelay worker`` processes run them, all against a real redis-server; one worker
is killed with SIGKILL midway and the other finishes its jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers import RelayServer, SimServer, stop_process, wait_until
from streams import chat
from test_jobs import cancel_a_running_job, read_events, submit, wait_ended
from webhook_receiver import SECRET, running_receiver


class WorkerProcess:
    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.log_path = log_dir / f"worker-{name}-{os.getpid()}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
        full_env.update(env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenrelay", "worker", "--concurrency", "3"],
                                     env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._alive() and "running jobs from" in self.log(), timeout=20)

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def own_db(redis_url: str, db: int) -> str:
    """The shared redis-server, another database: other tests' relays on Redis run queue
    workers too, and must not take these tests' jobs."""
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="module")
def cluster(redis_url: str, sim_server: SimServer, start_relay: Callable[..., RelayServer],
            log_dir: Path) -> Iterator[tuple[RelayServer, list[WorkerProcess]]]:
    env = {"TOKENRELAY_REDIS_URL": own_db(redis_url, 7), "TOKENRELAY_WEBHOOK_SECRET": SECRET,
           "TOKENRELAY_WEBHOOK_ALLOW_PRIVATE": "true", "TOKENRELAY_WEBHOOK_BACKOFF": "0.05",
           "TOKENRELAY_WEBHOOK_BACKOFF_MAX": "0.2", "TOKENRELAY_JOB_HEARTBEAT": "1"}
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_JOBS_IN_SERVE="false", **env)
    worker_env = {**env, "TOKENRELAY_UPSTREAM_URL": sim_server.url + "/v1", "TOKENRELAY_MODEL": "sim"}
    workers = [WorkerProcess(name, worker_env, log_dir) for name in ("a", "b")]
    yield relay, workers
    for worker in workers:
        worker.stop()


@pytest.fixture()
def client(cluster: tuple[RelayServer, list[WorkerProcess]]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster[0].url, timeout=10) as c:
        yield c


def test_workers_run_jobs_and_stream_them_live(client: httpx.Client) -> None:
    job = submit(client, chat(model="sim:ttft=0,tps=25,tokens=25"))
    events, times = read_events(client, job["id"])
    assert events[0][0] == "start" and events[-1][0] == "done"
    pieces = [data["text"] for kind, data in events if kind == "message"]
    assert len(pieces) > 10 and times[-1] - times[1] > 0.4  # live, from another process, via Redis
    ended = wait_ended(client, job["id"])
    assert ended["status"] == "succeeded" and "".join(pieces) == ended["result"]["text"]
    replay, _ = read_events(client, job["id"])
    assert "".join(d["text"] for k, d in replay if k == "message") == ended["result"]["text"]


def test_idempotency_key_on_redis(client: httpx.Client) -> None:
    body = chat("once", model="sim:ttft=0,tps=0")
    first = submit(client, body, **{"Idempotency-Key": "redis-key-1"})
    assert submit(client, body, **{"Idempotency-Key": "redis-key-1"})["id"] == first["id"]
    reused = client.post("/api/jobs", json=chat("other"), headers={"Idempotency-Key": "redis-key-1"})
    assert reused.status_code == 422 and reused.json()["error"]["type"] == "idempotency_key_reused"


def test_cancel_reaches_the_worker_and_the_upstream(client: httpx.Client, sim_server: SimServer) -> None:
    job = cancel_a_running_job(client, sim_server)
    assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "cancelled"


def test_a_killed_worker_s_jobs_finish_on_the_other(client: httpx.Client,
                                                    cluster: tuple[RelayServer, list[WorkerProcess]]) -> None:
    _, (doomed, survivor) = cluster
    words = " ".join(f"word{n}" for n in range(16))
    with running_receiver() as (url, receiver):
        jobs: dict[str, str] = {}
        for i in range(8):  # more than the two workers' 3 + 3 slots: some wait in the queue
            question = f"job {i}: {words}"
            jobs[submit(client, chat(question, model="sim:echo,ttft=0,tps=5", webhook_url=url))["id"]] = question

        def running_on_doomed() -> list[str]:
            log = doomed.log()
            taken = [j for j in jobs if j in log]
            return [j for j in taken if client.get(f"/api/jobs/{j}").json()["status"] == "running"]

        victims = wait_until(running_on_doomed, timeout=30)
        doomed.proc.kill()
        doomed.proc.wait(10)

        def all_delivered() -> dict[str, dict[str, Any]] | None:
            records = {j: client.get(f"/api/jobs/{j}").json() for j in jobs}
            return records if all(r["webhook"]["state"] == "delivered" for r in records.values()) else None

        records = wait_until(all_delivered, timeout=90)
        by_id = receiver.unique()
    for job_id, question in jobs.items():
        assert records[job_id]["status"] == "succeeded"
        assert records[job_id]["result"]["text"] == question
    assert set(by_id) == {r["webhook"]["id"] for r in records.values()}
    assert all(d.verified for d in receiver.deliveries)
    for victim in victims:
        assert victim in survivor.log()  # taken up by the worker that lived


def test_a_single_serve_with_redis_runs_its_jobs_itself(redis_url: str, sim_server: SimServer,
                                                       start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_REDIS_URL=own_db(redis_url, 8))
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        job = wait_ended(client, submit(client, chat("no worker needed", model="sim:echo,ttft=0,tps=0"))["id"])
    assert job["status"] == "succeeded" and job["result"]["text"] == "no worker needed"
    assert "running jobs from" in relay.log()


def test_redis_away_is_a_clear_503(sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> None:
    from servers import free_port

    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    response = httpx.post(relay.url + "/api/jobs", json=chat(), timeout=10)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "unavailable" and "does not answer" in response.json()["error"]["message"]
    assert httpx.get(relay.url + "/api/jobs/job_x", timeout=10).status_code == 503
    assert httpx.post(relay.url + "/api/get-response", json=chat(stream=False), timeout=10).status_code == 200
    wait_until(lambda: "jobs wait until it does" in relay.log())
    assert relay.log().count("does not answer") == 1  # said once, not a traceback a second
