"""A Redis that hangs (SIGSTOP) or goes away (stopped, started again) under the jobs of a
real ``tokenrelay serve`` and ``tokenrelay worker``: the API answers 503 with Retry-After
within TOKENRELAY_REDIS_TIMEOUT, a follower gets an in-band error, streaming goes on, the
worker says once that Redis is lost and once that it is back, and jobs run again after.

Each test has a redis-server of its own: freezing the shared one would stall other tests."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis_server import REDIS_SERVER
from servers import RelayServer, SimServer, free_port, stop_process, wait_until
from streams import chat
from test_jobs import read_events, submit, wait_ended
from test_jobs_redis import WorkerProcess

from tokenrelay.jobs.redis_store import JOB
from tokenrelay.providers.sse_decoder import SSEDecoder

TIMEOUT = 1.0
"""TOKENRELAY_REDIS_TIMEOUT in these tests."""


class OwnRedis:
    """A redis-server on a port of its own that a test can freeze, stop and start again."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_dir = log_dir
        self._dir = tempfile.TemporaryDirectory(prefix="tokenrelay-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--logfile", str(self.log_dir / f"redis-{self.port}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(self.answers, timeout=10)

    def answers(self) -> bool:
        try:
            with redis.Redis.from_url(self.url, socket_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.thaw()
            stop_process(self.proc)
            self.proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


@pytest.fixture()
def own_redis(log_dir: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(log_dir)
    yield server
    server.close()


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_a_frozen_redis_is_a_quick_503_and_jobs_go_on_after(own_redis: OwnRedis, sim_server: SimServer,
                                                           start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_REDIS_URL=own_redis.url,
                        TOKENRELAY_REDIS_TIMEOUT=str(TIMEOUT))
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        job_id = submit(client, chat(model="sim:ttft=0,tps=0"))["id"]
        wait_ended(client, job_id)
        own_redis.freeze()
        try:
            for call in (lambda: client.post("/api/jobs", json=chat()), lambda: client.get(f"/api/jobs/{job_id}"),
                         lambda: client.get(f"/api/jobs/{job_id}/stream"),
                         lambda: client.delete(f"/api/jobs/{job_id}")):
                response, seconds = timed(call)
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"].isdigit()
                assert response.json()["error"]["type"] == "unavailable"
                assert seconds < 3 * TIMEOUT + 2, seconds  # not until Redis resumes
            # Streaming needs no Redis.
            assert client.post("/api/get-response", json=chat(stream=False)).status_code == 200
            wait_until(lambda: "lost Redis" in relay.log(), timeout=10)
        finally:
            own_redis.thaw()
        wait_until(lambda: "is back" in relay.log(), timeout=15)
        job = wait_ended(client, submit(client, chat("after", model="sim:echo,ttft=0,tps=0"))["id"])
        assert job["result"]["text"] == "after"
    log = relay.log()
    assert log.count("lost Redis") == 1 and log.count("is back") == 1
    assert "Traceback" not in log


def test_a_follower_gets_an_in_band_error_when_redis_freezes(own_redis: OwnRedis, sim_server: SimServer,
                                                            start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_REDIS_URL=own_redis.url,
                        TOKENRELAY_REDIS_TIMEOUT=str(TIMEOUT))
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        job_id = submit(client, chat(model="sim:ttft=0,tps=5,tokens=100"))["id"]
        wait_until(lambda: client.get(f"/api/jobs/{job_id}").json()["status"] == "running")
        events: list[tuple[str, str]] = []
        frozen_at = None
        try:
            with client.stream("GET", f"/api/jobs/{job_id}/stream") as response:
                assert response.status_code == 200
                decoder = SSEDecoder()
                for chunk in response.iter_raw():
                    for event in decoder.feed(chunk):
                        events.append((event.event, event.data))
                        if event.event == "message" and frozen_at is None:
                            own_redis.freeze()
                            frozen_at = time.monotonic()
            assert frozen_at is not None and time.monotonic() - frozen_at < 3 * TIMEOUT + 5
        finally:
            own_redis.thaw()
        assert events[-1][0] == "error" and "following the job failed" in events[-1][1]
        assert "Traceback" not in relay.log()


def test_the_worker_says_once_that_redis_is_lost_and_once_that_it_is_back(
        own_redis: OwnRedis, sim_server: SimServer, start_relay: Callable[..., RelayServer], log_dir: Path) -> None:
    env = {"TOKENRELAY_REDIS_URL": own_redis.url, "TOKENRELAY_REDIS_TIMEOUT": str(TIMEOUT),
           "TOKENRELAY_UPSTREAM_URL": sim_server.url + "/v1", "TOKENRELAY_MODEL": "sim"}
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_JOBS_IN_SERVE="false", **env)
    worker = WorkerProcess(f"down-{own_redis.port}", env, log_dir, concurrency=2)
    try:
        with httpx.Client(base_url=relay.url, timeout=30) as client:
            own_redis.freeze()
            wait_until(lambda: "lost Redis" in worker.log(), timeout=10)
            # Frozen a while: the worker waits quietly, with its backoff, not a traceback a second.
            time.sleep(3)  # the length of the outage itself, not a wait for a signal
            own_redis.thaw()
            wait_until(lambda: "is back" in worker.log(), timeout=15)
            own_redis.stop()
            wait_until(lambda: worker.log().count("lost Redis") == 2, timeout=15)
            own_redis.start()
            wait_until(lambda: worker.log().count("is back") == 2, timeout=15)
            job = wait_ended(client, submit(client, chat("still here", model="sim:echo,ttft=0,tps=0"))["id"],
                             timeout=20)
            assert job["result"]["text"] == "still here"
        log = worker.log()
        assert log.count("lost Redis") == 2 and log.count("is back") == 2
        assert "Traceback" not in log
    finally:
        worker.stop()


def test_redis_records_expire_after_the_retention(own_redis: OwnRedis, sim_server: SimServer,
                                                 start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_REDIS_URL=own_redis.url,
                        TOKENRELAY_JOB_RETENTION="3600")
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        job_id = submit(client, chat(model="sim:ttft=0,tps=0"))["id"]
        wait_ended(client, job_id)
    with redis.Redis.from_url(own_redis.url) as r:
        assert 3500 < int(r.ttl(JOB + job_id)) <= 3600
