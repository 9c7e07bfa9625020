"""The first hour with tokenrelay: ``ask``'s messages and output, start-up on a port that
is taken, JSON log times, the favicon — each against the real command or a real server."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from servers import RelayServer, free_port

from tokenrelay.cli import cli


def ask(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["ask", *args], env=env, catch_exceptions=False)


def test_a_failure_before_the_first_token_leaves_stdout_empty(relay_server: RelayServer) -> None:
    for sse in ([], ["--sse"]):
        result = ask("--url", relay_server.url, *sse, "--model", "sim:fault=error-before", "hi")
        assert result.exit_code == 1
        assert result.stdout == ""
        assert "upstream" in result.stderr


def test_a_process_failing_before_the_first_token_writes_nothing_to_stdout(relay_server: RelayServer) -> None:
    done = subprocess.run([sys.executable, "-m", "tokenrelay", "ask", "--url", relay_server.url, "--model",
                           "sim:fault=error-before", "hi"], capture_output=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == b""


def test_an_answer_that_breaks_off_says_why_in_plain_words(relay_server: RelayServer) -> None:
    # ask reads SSE (it resumes dropped connections by the event ids), so the reason comes too.
    result = ask("--url", relay_server.url, "--model", "sim:fault=error-mid,tps=0,tokens=10", "hi")
    assert result.exit_code == 1
    assert result.stdout.endswith("\n") and result.stdout.strip()  # the part that arrived, its line ended
    assert result.stderr.startswith("Error: the stream failed midway: upstream_error: ")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("url", ["notaurl", "ftp://example.com/", "http://"])
def test_a_bad_url_is_a_usage_error_naming_the_flag(url: str) -> None:
    result = ask("--url", url, "hi")
    assert result.exit_code == 2
    assert "--url" in result.stderr
    assert "midway" not in result.stderr
    assert result.stdout == ""


def test_a_bad_tokenrelay_url_is_named_too() -> None:
    result = ask("hi", env={"TOKENRELAY_URL": "notaurl"})
    assert result.exit_code == 2
    assert "--url" in result.stderr and "notaurl" in result.stderr


def test_ask_help_names_its_environment_variables() -> None:
    text = CliRunner().invoke(cli, ["ask", "--help"]).output
    assert "TOKENRELAY_URL" in text and "TOKENRELAY_API_KEY" in text
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "TOKENRELAY_URL" in readme and "TOKENRELAY_API_KEY" in readme


def test_a_refused_key_says_how_to_pass_one(start_relay: Callable[..., RelayServer], sim_server) -> None:
    key = secrets.token_urlsafe(24)
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_API_KEYS=key)
    result = ask("--url", relay.url, "--model", "sim:tps=0", "hi")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: 401 ")
    assert "pass the client key with --key (or set TOKENRELAY_API_KEY)" in result.stderr
    assert ask("--url", relay.url, "--model", "sim:tps=0,tokens=3", "--key", key, "hi").exit_code == 0


# --- start-up on a port that is taken -------------------------------------------------------

@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", [["serve"], ["sim"], ["webhooks", "listen"]], ids=" ".join)
def test_a_taken_port_is_one_clear_line_and_no_banner(command: list[str], taken_port: int) -> None:
    done = subprocess.run([sys.executable, "-m", "tokenrelay", *command, "--host", "127.0.0.1", "--port",
                           str(taken_port)], capture_output=True, timeout=60, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{taken_port}: the port is in use (another program listens there)")
    assert " on http://" not in done.stderr  # no banner claiming it serves
    assert "Errno" not in done.stderr and "Traceback" not in done.stderr


def test_a_free_port_still_serves(log_dir: Path) -> None:
    from servers import Process

    port = free_port()
    sim = Process(["sim", "--port", str(port)], port=port, ready_path="/sim/stats", log_dir=log_dir)
    try:
        assert f"simulator on http://127.0.0.1:{port}/v1" in sim.log()
    finally:
        sim.stop()


# --- JSON logs -------------------------------------------------------------------------------

def test_json_log_times_are_iso_8601_with_a_time_zone(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from tokenrelay.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info", json=True)
        logging.getLogger("tokenrelay.test").info("a line")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    line = orjson.loads(capsys.readouterr().err.strip().splitlines()[-1])
    when = datetime.fromisoformat(line["time"])
    assert when.tzinfo is not None and when.utcoffset() is not None
    assert "T" in line["time"] and "," not in line["time"]


# --- the favicon -----------------------------------------------------------------------------

def test_the_page_has_a_favicon_and_loads_without_a_404(browser, relay_server: RelayServer) -> None:
    import httpx

    context = browser.new_context()
    try:
        page = context.new_page()
        failed: list[str] = []
        errors: list[str] = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(relay_server.url + "/", wait_until="networkidle")
        href = page.eval_on_selector("link[rel=icon]", "link => link.href")
        assert failed == [] and errors == []
    finally:
        context.close()
    icon = httpx.get(href, timeout=5)
    assert icon.status_code == 200
    assert icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.text.lstrip().startswith("<svg")


# --- jobs ------------------------------------------------------------------------------------

def test_cancelling_twice_says_the_job_was_already_cancelled(relay_server: RelayServer) -> None:
    import httpx

    from streams import chat

    job = httpx.post(relay_server.url + "/api/jobs", json=chat(model="sim:tps=5,tokens=500"), timeout=10).json()
    assert httpx.delete(f"{relay_server.url}/api/jobs/{job['id']}", timeout=10).status_code == 200
    again = httpx.delete(f"{relay_server.url}/api/jobs/{job['id']}", timeout=10)
    assert again.status_code == 409
    assert again.json()["error"]["message"].startswith(f"job {job['id']} was already cancelled;")


def test_the_readme_jobs_example_works_after_the_readme_set_up(start_relay: Callable[..., RelayServer],
                                                               log_dir: Path) -> None:
    """The README's set-up (a secret from ``webhooks secret``, private addresses allowed, the
    local receiver), then its job with a webhook: accepted, and delivered, signed."""
    import re

    import httpx
    from servers import Process, wait_until

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    jobs = readme[readme.index("**Jobs: the answer later"):]
    setup, example = jobs.index("export TOKENRELAY_WEBHOOK_SECRET"), jobs.index("curl -i http://127.0.0.1:8000/api/jobs")
    assert setup < example  # the set-up comes first
    body = re.search(r"-d '(\{.*?\})'", jobs[example:]).group(1)
    assert "http://127.0.0.1:9100/" in body

    secret = CliRunner().invoke(cli, ["webhooks", "secret"]).stdout.strip()
    relay = start_relay(upstream=None, TOKENRELAY_WEBHOOK_SECRET=secret, TOKENRELAY_WEBHOOK_ALLOW_PRIVATE="true",
                        TOKENRELAY_SIM_TTFT="0", TOKENRELAY_SIM_TPS="0")
    port = free_port()
    listener = Process(["webhooks", "listen", "--port", str(port)], port=port, ready_path="/", log_dir=log_dir,
                       env={"TOKENRELAY_WEBHOOK_SECRET": secret})
    try:
        created = httpx.post(relay.url + "/api/jobs", content=body.replace("127.0.0.1:9100", f"127.0.0.1:{port}"),
                             headers={"content-type": "application/json", "idempotency-key": "report-42"}, timeout=10)
        assert created.status_code == 202, created.text
        wait_until(lambda: httpx.get(listener.url + "/").json()["deliveries"] == 1)
        wait_until(lambda: "signature ok → 204" in listener.log())
    finally:
        listener.stop()


def test_the_simulators_messages_api_needs_the_headers_the_readme_names(sim_server) -> None:
    import httpx

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "`x-api-key`" in readme and "`anthropic-version`" in readme
    body = {"model": "sim", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    bare = httpx.post(sim_server.url + "/v1/messages", json=body, timeout=10)
    assert bare.status_code in (400, 401) and "x-api-key" in bare.text
    asked = httpx.post(sim_server.url + "/v1/messages", json=body, timeout=10,
                       headers={"x-api-key": "any", "anthropic-version": "2023-06-01"})
    assert asked.status_code == 200, asked.text


def test_doctor_header_names_the_url_after_one_space() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli, ["doctor", url, "--ticks", "2", "--interval", "0.05"])
    assert result.exit_code == 2
    assert result.stdout.splitlines()[0] == f"tokenrelay doctor {url}"
