"""The command line, invoked for real: ``ask`` against a running relay, ``serve`` and
``sim`` refusing bad settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
    result = ask(relay_server, *(["--sse"] if sse else []), "--model", "sim:fault=error-mid,tps=0,tokens=10", "hi")
    assert result.exit_code == 1
    assert result.stdout  # what arrived is still shown
    assert "the stream failed midway" in result.stderr


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


def test_serve_refuses_a_bad_config_file(tmp_path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text('upstream_url = "ftp://example"\n')
    result = CliRunner().invoke(cli, ["serve", "--config", str(config)])
    assert result.exit_code == 1
    assert "TOKENRELAY_UPSTREAM_URL" in result.stderr and "http(s) URL" in result.stderr


def test_help_explains_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "sim", "ask"):
        assert command in result.output
    serve_help = CliRunner().invoke(cli, ["serve", "--help"]).output
    for option in ("--host", "--port", "--config", "TOKENRELAY_UPSTREAM_URL", "OPENAI_API_KEY"):
        assert option in serve_help
