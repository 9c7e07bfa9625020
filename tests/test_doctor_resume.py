"""``tokenrelay doctor --resume`` against real relays, directly and through real nginx with
the shipped configs: it passes where a dropped stream resumes, and fails with the fix where
the proxy drops ``Last-Event-ID``, where the reconnect reaches an instance without the
stream, or where leaving stops the model."""

from __future__ import annotations

import re
from collections.abc import Callable

import orjson
from click.testing import CliRunner
from proxies import start_nginx, start_nginx_multi
from servers import RelayServer, SimServer

from tokenrelay.cli import cli

FAST = ["--ticks", "3", "--interval", "0.1"]


def doctor(*args: str):
    return CliRunner().invoke(cli, ["doctor", *args, *FAST], catch_exceptions=False)


def test_resume_passes_against_tokenrelay_itself(relay_server: RelayServer) -> None:
    result = doctor(relay_server.url, "--resume", "--model", "sim:ttft=0,tps=100,tokens=40")
    assert result.exit_code == 0, result.output
    out = result.stdout
    # (how many events the 40 tokens make depends on how the relay's reads fall)
    assert re.search(r"resume       OK         3 events read, connection dropped, resumed with Last-Event-ID: "
                     r"events 4–\d+, then done", out), out
    assert "no gap, no duplicate, and the model went on while nobody read" in out
    assert "Result: OK — " in out and "streams, and a dropped stream resumes." in out


def test_resume_passes_through_the_shipped_nginx(relay_server: RelayServer) -> None:
    with start_nginx(relay_server.url) as proxy:
        result = doctor(proxy.url, "--resume", "--json")
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout)
    resume = report["resume"]
    assert resume["ok"] and resume["outcome"] == "ok" and resume["read_before_drop"] == [1, 2, 3]
    assert resume["resumed_ids"][0] == 4 and resume["ending"] == "done"
    assert resume["stream_id"].startswith("st_")
    assert any(f["code"] == "resume_ok" and f["severity"] == "note" for f in report["findings"])


def test_a_proxy_that_drops_last_event_id_fails_with_the_fix(relay_server: RelayServer) -> None:
    with start_nginx(relay_server.url, extra='proxy_set_header Last-Event-ID "";') as proxy:
        result = doctor(proxy.url, "--resume")
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "resume       FAILED     3 events read, connection dropped: header dropped" in out
    assert ("PROBLEM: Resuming a dropped stream FAILED: asked for the events after 3, got events from 1 — "
            "the Last-Event-ID header does not reach tokenrelay") in out
    assert "fix (nginx): Pass the Last-Event-ID request header on" in out


def test_a_reconnect_that_reaches_another_instance_without_redis_fails_with_the_fix(
        sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> None:
    relays = [start_relay(upstream=sim_server.url + "/v1") for _ in range(2)]
    # Round robin, so that the resume (the 4th request: text probe, SSE probe, the answer,
    # its resume) reaches the instance the answer did not.
    with start_nginx_multi([relay.url for relay in relays], balance="") as proxy:
        result = doctor(proxy.url, "--resume")
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "connection dropped: not found" in out
    assert "GET /api/streams/{id} answered 404 not_found" in out
    assert "reached a tokenrelay that does not have the stream" in out
    assert "the same TOKENRELAY_REDIS_URL on every instance" in out


def test_a_service_where_leaving_stops_the_model_fails_with_the_fix(
        sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_RESUME_GRACE="0")
    result = doctor(relay.url, "--resume", "--model", "sim:ttft=0,tps=20,tokens=200")
    assert result.exit_code == 1, result.output
    assert "the answer ended stopped (client_cancelled) after the connection was dropped" in result.stdout
    assert "Set TOKENRELAY_RESUME_GRACE above 0" in result.stdout


def test_model_is_only_for_resume(relay_server: RelayServer) -> None:
    result = CliRunner().invoke(cli, ["doctor", relay_server.url, "--model", "sim"])
    assert result.exit_code == 2
    assert "--model is for --resume" in result.stderr


def test_without_resume_no_model_is_asked(relay_server: RelayServer, sim_server: SimServer) -> None:
    sim_server.wait_idle()
    before = sim_server.stats()
    result = doctor(relay_server.url, "--json")
    assert result.exit_code == 0
    assert orjson.loads(result.stdout)["resume"] is None
    assert sim_server.stats() == before
