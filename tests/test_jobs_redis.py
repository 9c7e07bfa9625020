"""Jobs on the Redis task queue: ``tokenrelay serve`` with ``TOKENRELAY_REDIS_URL`` takes them
in, two ``tokenrelay worker`` processes run them, all against a real redis-server; one worker
is killed with SIGKILL midway and the other finishes its jobs. A worker with model routes
answers from the routes' upstreams, as ``serve`` would, and a webhook waiting to be retried
holds none of its slots."""

from __future__ import annotations

import json
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
from test_jobs import a_retry_holds_no_slot, cancel_a_running_job, read_events, submit, wait_ended
from webhook_receiver import SECRET, running_receiver


class WorkerProcess:
    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *, concurrency: int = 3) -> None:
        self.log_path = log_dir / f"worker-{name}-{os.getpid()}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
        full_env.update(env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenrelay", "worker", "--concurrency", str(concurrency)],
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


@pytest.fixture(scope="module")
def anthropic_sim(log_dir: Path) -> Iterator[SimServer]:
    """A simulator of this module's own, so its counts are this module's requests alone."""
    server = SimServer(log_dir=log_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def routed(redis_url: str, anthropic_sim: SimServer, start_relay: Callable[..., RelayServer],
           log_dir: Path) -> Iterator[tuple[RelayServer, WorkerProcess]]:
    """``serve`` that leaves its jobs to one ``tokenrelay worker`` (one slot), both with routes
    and no TOKENRELAY_UPSTREAM_URL: ``claude-*`` to the simulator's Anthropic Messages API,
    ``claude-down-*`` to an address where nothing listens (falling back to the first), the
    rest to the built-in simulator."""
    from servers import free_port

    routes = [
        {"name": "down", "pattern": "claude-down-*", "kind": "anthropic",
         "url": f"http://127.0.0.1:{free_port()}/v1", "key_env": "TEST_ANTHROPIC_KEY", "fallback": "anthropic"},
        {"name": "anthropic", "pattern": "claude-*", "kind": "anthropic", "url": anthropic_sim.url + "/v1",
         "key_env": "TEST_ANTHROPIC_KEY"},
        {"name": "local", "pattern": "*", "kind": "simulator"},
    ]
    env = {"TOKENRELAY_REDIS_URL": own_db(redis_url, 9), "TOKENRELAY_ROUTES": json.dumps(routes),
           "TEST_ANTHROPIC_KEY": "sk-ant-test", "TOKENRELAY_RETRY_BACKOFF": "0.01",
           "TOKENRELAY_WEBHOOK_SECRET": SECRET, "TOKENRELAY_WEBHOOK_ALLOW_PRIVATE": "true",
           "TOKENRELAY_WEBHOOK_BACKOFF": "3", "TOKENRELAY_WEBHOOK_BACKOFF_MAX": "3", "TOKENRELAY_JOB_HEARTBEAT": "2"}
    relay = start_relay(upstream=None, TOKENRELAY_JOBS_IN_SERVE="false", **env)
    worker = WorkerProcess("routed", env, log_dir, concurrency=1)
    yield relay, worker
    worker.stop()


@pytest.fixture()
def routed_client(routed: tuple[RelayServer, WorkerProcess]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=routed[0].url, timeout=10) as c:
        yield c


def test_a_worker_answers_from_the_model_s_route(routed_client: httpx.Client, anthropic_sim: SimServer,
                                                 routed: tuple[RelayServer, WorkerProcess]) -> None:
    _, worker = routed
    assert "claude-* → anthropic (anthropic)" in worker.log()
    model = "claude-3-5-sonnet:ttft=0,tps=0,tokens=12"
    question = "Where does this answer come from?"
    before = anthropic_sim.stats()
    job = wait_ended(routed_client, submit(routed_client, chat(question, model=model))["id"])
    assert job["status"] == "succeeded", job
    assert anthropic_sim.stats()["completed_streams"] == before["completed_streams"] + 1
    # The same text the simulator's Messages API gives for this question, asked directly.
    direct = httpx.post(anthropic_sim.url + "/v1/messages", timeout=10,
                        headers={"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"},
                        json={"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": question}]})
    assert direct.status_code == 200, direct.text
    assert job["result"]["text"] == "".join(b["text"] for b in direct.json()["content"] if b["type"] == "text")
    assert job["result"]["usage"]["completion_tokens"] == 12
    # A model no route sends upstream is the built-in simulator's: the upstream saw nothing.
    counted = anthropic_sim.stats()["total_streams"]
    other = wait_ended(routed_client, submit(routed_client, chat("local", model="sim:echo,ttft=0,tps=0"))["id"])
    assert other["status"] == "succeeded" and other["result"]["text"] == "local"
    assert anthropic_sim.stats()["total_streams"] == counted


def test_a_worker_retries_then_falls_back(routed_client: httpx.Client, anthropic_sim: SimServer) -> None:
    before = anthropic_sim.stats()
    job = wait_ended(routed_client, submit(routed_client, chat("fall back", model="claude-down-1:echo,ttft=0,tps=0"))["id"])
    assert job["status"] == "succeeded" and job["result"]["text"] == "fall back"  # from the fallback route
    assert anthropic_sim.stats()["completed_streams"] == before["completed_streams"] + 1
    # An upstream answering 500 is tried again (TOKENRELAY_RETRIES, 2), then the job fails.
    failing = wait_ended(routed_client, submit(routed_client, chat(model="claude-x:ttft=0,tps=0,fault=http-500"))["id"])
    assert failing["status"] == "failed" and "500" in failing["error"]["message"]
    assert anthropic_sim.stats()["failed_streams"] == before["failed_streams"] + 3


def test_a_webhook_retry_holds_no_worker_slot(routed_client: httpx.Client) -> None:
    a_retry_holds_no_slot(routed_client)


def test_a_job_cancelled_on_a_worker_keeps_its_text(routed_client: httpx.Client, anthropic_sim: SimServer) -> None:
    cancel_a_running_job(routed_client, anthropic_sim, model="claude-long:ttft=0,tps=5,tokens=200")
