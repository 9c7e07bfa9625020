"""``tokenrelay ask --job`` and ``tokenrelay webhooks listen``, invoked for real."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from servers import Process, RelayServer, SimServer, free_port, wait_until
from streams import chat
from tokenrelay.cli import cli
from webhook_receiver import SECRET


@pytest.fixture(scope="module")
def relay(sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> RelayServer:
    return start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_WEBHOOK_SECRET=SECRET,
                       TOKENRELAY_WEBHOOK_ALLOW_PRIVATE="true")


def test_ask_job_waits_and_prints_the_answer(relay: RelayServer) -> None:
    result = CliRunner().invoke(cli, ["ask", "--job", "--url", relay.url, "--model", "sim:echo,ttft=0,tps=20",
                                      "a job, café 😀"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == "a job, café 😀\n"
    assert result.stderr.startswith("job job_") and "submitted" in result.stderr


def test_ask_job_reports_a_failed_job(relay: RelayServer) -> None:
    result = CliRunner().invoke(cli, ["ask", "--job", "--url", relay.url, "--model",
                                      "sim:ttft=0,tps=0,fault=http-500", "x"], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "failed: upstream_error: upstream answered 500" in result.stderr


def test_ask_job_refused(relay: RelayServer) -> None:
    result = CliRunner().invoke(cli, ["ask", "--job", "--url", relay.url, "--webhook-url", "ftp://x/", "q"],
                                catch_exceptions=False)
    assert result.exit_code == 1
    assert "422 validation_error: webhook_url" in result.stderr


def test_webhooks_listen_verifies_and_prints(relay: RelayServer, log_dir: Path) -> None:
    port = free_port()
    listener = Process(["webhooks", "listen", "--port", str(port), "--secret", SECRET, "--fail-first", "1"],
                       port=port, ready_path="/", log_dir=log_dir)
    try:
        job = httpx.post(relay.url + "/api/jobs", json=chat("to the listener", model="sim:echo,ttft=0,tps=0",
                                                            webhook_url=listener.url + "/hook")).json()
        wait_until(lambda: httpx.get(listener.url + "/").json()["deliveries"] == 2)  # a 500, then a retry
        forged = httpx.post(listener.url + "/hook", content=b'{"type":"job.succeeded"}', headers={
            "webhook-id": "msg_forged", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"})
        assert forged.status_code == 401
        wait_until(lambda: "msg_forged" in listener.log())
        log = listener.log()
        record = httpx.get(f"{relay.url}/api/jobs/{job['id']}").json()
        webhook_id = record["webhook"]["id"]
        assert f"{webhook_id} job.succeeded {job['id']}: signature ok → 500" in log
        assert f"{webhook_id} job.succeeded {job['id']}: signature ok, retry #2 → 204" in log
        assert "msg_forged ? ?: SIGNATURE INVALID → 401" in log
        assert '"text":"to the listener"' in log
    finally:
        listener.stop()


def test_webhooks_listen_refuses_a_bad_secret() -> None:
    result = CliRunner().invoke(cli, ["webhooks", "listen", "--secret", "whsec_"], catch_exceptions=False)
    assert result.exit_code == 2 and "--secret" in result.output
