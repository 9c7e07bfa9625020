"""Durability: ``tokenrelay serve`` killed with SIGKILL in the middle of jobs and of a webhook
delivery, then started again on the same data directory. Every job ends, every webhook
arrives, under the id it was first sent with, and nothing arrives that should not."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from servers import RelayServer, SimServer, wait_until
from streams import chat
from tokenrelay.jobs.listen import Receiver
from webhook_receiver import SECRET, running_receiver


class HoldingReceiver(Receiver):
    """Keeps the first delivery waiting until released: the sender dies in the middle of it."""

    def __init__(self, secret: str) -> None:
        super().__init__(secret)
        self.release = threading.Event()
        self.holding = threading.Event()

    async def handle(self, request: Request) -> Response:
        if not self.holding.is_set():
            await request.body()  # read now: the sender will be gone when this is released
            self.holding.set()
            await asyncio.to_thread(self.release.wait, 30)
        return await super().handle(request)


def test_sigkill_mid_job_and_mid_delivery(sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> None:
    data_dir = tempfile.mkdtemp(prefix="tokenrelay-restart-")
    env = {"TOKENRELAY_DATA_DIR": data_dir, "TOKENRELAY_WEBHOOK_SECRET": SECRET,
           "TOKENRELAY_WEBHOOK_ALLOW_PRIVATE": "true", "TOKENRELAY_WEBHOOK_BACKOFF": "0.05",
           "TOKENRELAY_WEBHOOK_BACKOFF_MAX": "0.2", "TOKENRELAY_JOB_CONCURRENCY": "3"}
    receiver = HoldingReceiver(SECRET)
    with running_receiver(receiver=receiver) as (url, _):
        first = start_relay(upstream=sim_server.url + "/v1", **env)
        client = httpx.Client(base_url=first.url, timeout=10)
        jobs: dict[str, str] = {}  # id → the text it must end with

        def submit(question: str, model: str) -> str:
            response = client.post("/api/jobs", json=chat(question, model=model, webhook_url=url))
            assert response.status_code == 202, response.text
            jobs[response.json()["id"]] = question
            return str(response.json()["id"])

        # One job ends at once and its webhook is held by the receiver (killed mid-delivery),
        delivering = submit("delivered while killed", "sim:echo,ttft=0,tps=0")
        wait_until(receiver.holding.is_set)
        # three are halfway through their answers (killed mid-job), one waits its turn.
        words = " ".join(f"word{n}" for n in range(16))
        running = [submit(f"slow answer {i}: {words}", "sim:echo,ttft=0,tps=8") for i in range(3)]
        queued = submit("still queued", "sim:echo,ttft=0,tps=0")
        wait_until(lambda: all(client.get(f"/api/jobs/{j}").json()["status"] == "running" for j in running))
        wait_until(lambda: sim_server.stats()["open_streams"] >= 3)
        assert client.get(f"/api/jobs/{queued}").json()["status"] == "queued"
        first.proc.kill()
        first.proc.wait(10)
        client.close()
        held_id = receiver.deliveries[0].webhook_id if receiver.deliveries else None
        assert held_id is None  # the held attempt has not been answered yet

        second = start_relay(upstream=sim_server.url + "/v1", **env)
        with httpx.Client(base_url=second.url, timeout=10) as client2:
            def all_delivered() -> dict[str, dict[str, Any]] | None:
                records = {j: client2.get(f"/api/jobs/{j}").json() for j in jobs}
                done = all(r["webhook"]["state"] == "delivered" for r in records.values())
                return records if done else None

            records = wait_until(all_delivered, timeout=30)
        receiver.release.set()  # the attempt the first process died in finally gets its answer
        wait_until(lambda: len(receiver.attempts(records[delivering]["webhook"]["id"])) == 2)

    for job_id, question in jobs.items():
        record = records[job_id]
        assert record["status"] == "succeeded", record
        assert record["result"]["text"] == question  # re-run from the start, not half an answer twice
    by_id = receiver.unique()
    assert set(by_id) == {r["webhook"]["id"] for r in records.values()}  # every one, nothing else
    for job_id, record in records.items():
        attempts = receiver.attempts(record["webhook"]["id"])
        assert all(a.verified for a in attempts)
        assert len({a.body for a in attempts}) == 1  # a retry is the same message
        assert by_id[record["webhook"]["id"]].payload["data"]["id"] == job_id
    # The held delivery was sent again, under its first id, by the second process.
    assert len(receiver.attempts(records[delivering]["webhook"]["id"])) == 2
    log = second.log()
    assert "taking up 5 unfinished job(s)" in log
