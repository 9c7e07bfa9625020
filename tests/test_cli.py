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
    if sse:  # the error event says why
        assert "the stream failed midway: upstream_error" in result.stderr
    else:  # a plain-text body cannot say why: plain words, and where to find the reason
        assert "the answer broke off midway and is incomplete; ask again with --sse" in result.stderr
        assert "peer closed" not in result.stderr


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
