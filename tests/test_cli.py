"""The command line, invoked for real: ``ask`` against a running relay, ``serve`` and
``sim`` refusing bad settings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest
from click.testing import CliRunner

from servers import RelayServer, SimServer, wait_until
from tokenrelay.cli import cli


def ask(relay: RelayServer, *args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["ask", "--url", relay.url, *args], input=input, catch_exceptions=False)


def test_ask_prints_the_answer(relay_server: RelayServer) -> None:
    result = ask(relay_server, "--model", "sim:echo,tps=0", "hello there, café 😀")
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello there, café 😀\n"


def test_ask_over_sse(relay_server: RelayServer) -> None:
    result = ask(relay_server, "--sse", "--model", "sim:echo,tps=0", "over events")
    assert result.exit_code == 0, result.output
    assert result.stdout == "over events\n"


def test_ask_reads_the_question_from_stdin(relay_server: RelayServer) -> None:
    result = ask(relay_server, "--model", "sim:echo,tps=0", input="from stdin\n")
    assert result.exit_code == 0
    assert result.stdout == "from stdin\n"


def test_ask_verbose_reports_timing_on_stderr(relay_server: RelayServer) -> None:
    result = ask(relay_server, "-v", "--sse", "--model", "sim:tps=0,tokens=5", "hi")
    assert result.exit_code == 0
    assert "time to first token" in result.stderr
    assert "5 tokens" in result.stderr
    assert "time to first token" not in result.stdout


@pytest.mark.parametrize("sse", [False, True])
def test_ask_fails_loudly_when_the_stream_breaks(relay_server: RelayServer, sse: bool) -> None:
    # ask always reads SSE now (``--sse`` is kept for old scripts): the error event says why.
    result = ask(relay_server, *(["--sse"] if sse else []), "--model", "sim:fault=error-mid,tps=0,tokens=10", "hi")
    assert result.exit_code == 1
    assert result.stdout  # what arrived is still shown
    assert "the stream failed midway: upstream_error" in result.stderr
    assert "resuming" not in result.stderr  # an answer that failed is not a lost connection


def test_ask_reports_a_refusal(relay_server: RelayServer) -> None:
    result = ask(relay_server, "--model", "sim:fault=http-429", "hi")
    assert result.exit_code == 1
    assert "429 upstream_rate_limited" in result.stderr


def test_ask_unreachable_service() -> None:
    from servers import free_port

    result = CliRunner().invoke(cli, ["ask", "--url", f"http://127.0.0.1:{free_port()}", "hi"])
    assert result.exit_code == 1
    assert "cannot reach" in result.stderr


def test_ask_ctrl_c_exits_130_and_stops_the_model(relay_server: RelayServer, sim_server: SimServer) -> None:
    sim_server.wait_idle()
    before = sim_server.stats()["cancelled_streams"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "ask", "--url", relay_server.url, "--model", "sim:tps=5,tokens=500",
         "a long one"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    proc.stdout.read(1)  # the answer has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert b"cancelled" in err
    wait_until(lambda: sim_server.stats()["cancelled_streams"] == before + 1, timeout=2)


def test_serve_refuses_a_bad_setting_naming_it() -> None:
    result = CliRunner().invoke(cli, ["serve"], env={"TOKENRELAY_HEARTBEAT_INTERVAL": "-1"})
    assert result.exit_code == 1
    assert "TOKENRELAY_HEARTBEAT_INTERVAL" in result.stderr


def test_serve_refuses_a_bad_config_file_naming_the_file_and_key(tmp_path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text('upstream_url = "ftp://example"\n')
    result = CliRunner().invoke(cli, ["serve", "--config", str(config)])
    assert result.exit_code == 1
    assert f"Error: config file {config}, upstream_url: must be an http(s) URL" in result.stderr
    assert "TOKENRELAY_UPSTREAM_URL" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "99999"], "Invalid value for '--port': Input should be less than or equal to 65535"),
    (["--log-level", "loud"], "Invalid value for '--log-level': must be one of critical, error"),
])
def test_serve_refuses_a_bad_flag_naming_the_flag(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["serve", *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "TOKENRELAY_" not in result.stderr and "Value error" not in result.stderr


def test_serve_refuses_an_upstream_key_with_a_trailing_newline_without_showing_it() -> None:
    # As a key read from a Kubernetes secret file arrives: every upstream request would fail.
    result = CliRunner().invoke(cli, ["serve"], env={"TOKENRELAY_UPSTREAM_URL": "https://api.example.com/v1",
                                                     "OPENAI_API_KEY": "sk-secret-1234\n"})
    assert result.exit_code == 1
    assert "invalid setting OPENAI_API_KEY: the value ends with a newline" in result.stderr
    assert "sk-secret" not in result.output + result.stderr


def test_a_weak_webhook_secret_is_refused_and_webhooks_secret_makes_a_good_one(monkeypatch) -> None:
    from tokenrelay.config import load_settings

    weak = CliRunner().invoke(cli, ["worker"], env={"TOKENRELAY_WEBHOOK_SECRET": "whsec_abc"})
    assert weak.exit_code == 1
    assert "invalid setting TOKENRELAY_WEBHOOK_SECRET: holds 2 bytes" in weak.stderr
    assert "tokenrelay webhooks secret" in weak.stderr
    made = [CliRunner().invoke(cli, ["webhooks", "secret"]) for _ in range(2)]
    assert [result.exit_code for result in made] == [0, 0]
    first, second = (result.stdout.strip() for result in made)
    assert first.startswith("whsec_") and first != second
    monkeypatch.setenv("TOKENRELAY_WEBHOOK_SECRET", first)
    assert load_settings().webhook_secret.get_secret_value() == first


def test_an_unknown_variable_is_a_warning_naming_the_closest_setting(start_relay) -> None:
    relay = start_relay(upstream=None, TOKENRELAY_UPSTREM_URL="http://127.0.0.1:9/v1",
                        # read by other commands and by serve's worker processes: no warning
                        TOKENRELAY_URL="http://127.0.0.1:8000", TOKENRELAY_API_KEY="tr-key",
                        TOKENRELAY_CONFIG_FILE="", TOKENRELAY_SERVE_PROCESSES="1")
    log = relay.log()
    assert ("warning: TOKENRELAY_UPSTREM_URL is not a tokenrelay setting and is ignored; "
            "did you mean TOKENRELAY_UPSTREAM_URL?") in log
    assert log.count("warning:") == 1
    assert "(upstream: simulator)" in log


def test_worker_warns_about_unknown_variables_too() -> None:
    result = CliRunner().invoke(cli, ["worker"], env={"TOKENRELAY_REDIS_ULR": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 1
    assert "did you mean TOKENRELAY_REDIS_URL?" in result.stderr
    assert "set TOKENRELAY_REDIS_URL" in result.stderr


def test_serve_help_lists_every_setting_as_config_describes_it() -> None:
    from tokenrelay.config import settings_help

    text = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    flat = " ".join(text.split())
    for title, entries in settings_help():
        assert f"{title}:" in text
        for entry in entries:
            assert f"{' or '.join(entry.env)} [default: {entry.default}] {entry.description}" in flat
    assert "TOKENRELAY_UPSTREAM_KEY or OPENAI_API_KEY [default: unset]" in flat
    assert "TOKENRELAY_PORT [default: 8000] Port to listen on." in flat
    # The flags that override settings take their help from them too.
    assert "--log-json Write logs as JSON lines. [default: false]" in flat


def test_help_explains_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "sim", "ask"):
        assert command in result.output
    serve_help = CliRunner().invoke(cli, ["serve", "--help"]).output
    for option in ("--host", "--port", "--config", "TOKENRELAY_UPSTREAM_URL", "OPENAI_API_KEY"):
        assert option in serve_help


# --- resuming a dropped connection (a real TCP proxy that cuts it: tests/cutter.py) ----------

LONG = "sim:ttft=0,tps=100,tokens=120"


def test_ask_resumes_a_cut_connection_with_no_duplicate_and_no_gap(relay_server: RelayServer) -> None:
    from cutter import Cutter

    whole = ask(relay_server, "--model", LONG, "tell me a long story")
    assert whole.exit_code == 0, whole.output
    with Cutter(relay_server.url, cut_after=900) as cutter:
        result = CliRunner().invoke(cli, ["ask", "--url", cutter.url, "--model", LONG, "tell me a long story"],
                                    catch_exceptions=False)
        assert cutter.cut_count == 1 and cutter.connections >= 2
    assert result.exit_code == 0, result.output
    assert result.stdout == whole.stdout
    notes = [line for line in result.stderr.splitlines() if "connection lost" in line]
    assert len(notes) == 1, result.stderr
    assert re.fullmatch(r"connection lost after event \d+ \(.+\); resuming…", notes[0]), notes[0]
    assert int(notes[0].split()[4]) > 0  # it was cut midway, not before the first piece


def test_ask_resumes_again_after_a_second_cut(relay_server: RelayServer) -> None:
    from cutter import Cutter

    whole = ask(relay_server, "--model", LONG, "a story cut twice")
    with Cutter(relay_server.url, cut_after=[900, 700]) as cutter:
        result = CliRunner().invoke(cli, ["ask", "--url", cutter.url, "--model", LONG, "a story cut twice"],
                                    catch_exceptions=False)
        assert cutter.cut_count == 2
    assert result.exit_code == 0, result.output
    assert result.stdout == whole.stdout
    assert result.stderr.count("connection lost after event") == 2


def test_ask_gives_up_after_bounded_retries_naming_the_stream(relay_server: RelayServer, monkeypatch) -> None:
    from cutter import Cutter

    import tokenrelay.ask

    monkeypatch.setattr(tokenrelay.ask, "BACKOFF", 0.01)
    # The first connection is cut midway; every reconnect is closed before any answer.
    with Cutter(relay_server.url, cut_after=[900] + [0] * 10) as cutter:
        result = CliRunner().invoke(cli, ["ask", "--url", cutter.url, "--model", "sim:ttft=0,tps=20,tokens=200",
                                          "hi"], catch_exceptions=False)
        assert cutter.connections == 1 + tokenrelay.ask.RETRIES
    assert result.exit_code == 1
    assert result.stdout  # what arrived is shown, its line ended
    assert f"{tokenrelay.ask.RETRIES} attempts to resume failed" in result.stderr
    stream_id = re.search(r"/api/streams/([\w-]+) ", result.stderr)
    assert stream_id, result.stderr
    # ... and the answer is indeed still there to be resumed by hand.
    status = httpx.get(f"{relay_server.url}/api/streams/{stream_id[1]}", headers={"accept": "application/json"})
    assert status.status_code == 200 and status.json()["status"] in ("running", "completed")
    httpx.delete(f"{relay_server.url}/api/streams/{stream_id[1]}")


def test_ask_says_clearly_when_the_answer_is_gone(relay_server: RelayServer,
                                                  start_relay: Callable[..., RelayServer]) -> None:
    """A reconnect that reaches another instance without shared streams (no Redis): 404,
    said as such, exit 1."""
    from cutter import Cutter

    other = start_relay(upstream=None)
    with Cutter(relay_server.url, cut_after=900, reroute=other.url) as cutter:
        result = CliRunner().invoke(cli, ["ask", "--url", cutter.url, "--model", "sim:ttft=0,tps=50,tokens=200",
                                          "hi"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "connection lost after event" in result.stderr
    assert "cannot resume the answer after event" in result.stderr and "404 not_found" in result.stderr


def test_ask_resumes_a_connection_that_went_silent(relay_server: RelayServer, monkeypatch) -> None:
    """No reset, no close: the connection just stops bringing anything (a dead path). The
    read timeout notices it (heartbeats keep a live SSE connection from going this silent)."""
    from cutter import Cutter

    import tokenrelay.ask

    monkeypatch.setattr(tokenrelay.ask, "READ_TIMEOUT", 1.0)
    whole = ask(relay_server, "--model", LONG, "a story on a bad network")
    with Cutter(relay_server.url, cut_after=900, stall=True) as cutter:
        result = CliRunner().invoke(cli, ["ask", "--url", cutter.url, "--model", LONG, "a story on a bad network"],
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == whole.stdout
    assert re.search(r"connection lost after event \d+ \(no data for too long\); resuming…", result.stderr)
