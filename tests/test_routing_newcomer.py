"""Routing mode as a newcomer meets it: ``TOKENRELAY_ROUTES`` set, no ``TOKENRELAY_MODEL``.

A real ``tokenrelay serve`` routes ``gpt-*`` to a real ``tokenrelay sim`` on loopback (as it
would to an OpenAI-compatible API) and ``llama*`` to the built-in simulator. The banner, the
start-up log, ``/api/info``, the page (in headless Chromium) and ``tokenrelay ask`` must name
those upstreams, and a question asked without a model must be answered by a listed one.
``/readyz`` checks every route's upstream and names the one that is down."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from playwright.sync_api import Browser, expect

from servers import Process, SimServer, free_port
from tokenrelay.cli import cli

KEY_ENV = "NEWCOMER_TEST_KEY"
SECRET = "sk-newcomer-do-not-show-4b1e"
MARKUP_MODEL = "llama-<i>tiny</i>"

expect.set_options(timeout=15_000)


def start_serve(log_dir: Path, routes: list[dict[str, Any]], **env: str) -> Process:
    """``tokenrelay serve`` with these routes and, unlike ``RelayServer``, no TOKENRELAY_MODEL."""
    port = free_port()
    full_env = {"TOKENRELAY_ROUTES": json.dumps(routes), KEY_ENV: SECRET,
                "TOKENRELAY_DATA_DIR": tempfile.mkdtemp(prefix="tokenrelay-data-"), **env}
    return Process(["serve", "--port", str(port)], port=port, ready_path="/healthz", env=full_env,
                   log_dir=log_dir)


def lab_url(sim: SimServer) -> str:
    return f"http://127.0.0.1:{sim.port}/v1"


@pytest.fixture(scope="module")
def routed(log_dir: Path, sim_server: SimServer) -> Iterator[Process]:
    routes = [
        # Credentials in the URL and a key: neither may show anywhere.
        {"name": "lab", "pattern": "gpt-*", "url": f"http://lab:{SECRET}@127.0.0.1:{sim_server.port}/v1",
         "key_env": KEY_ENV, "models": ["gpt-4o-mini"]},
        {"name": "local", "pattern": "llama*", "kind": "simulator", "models": ["llama-3-8b", MARKUP_MODEL]},
    ]
    relay = start_serve(log_dir, routes, TOKENRELAY_SIM_TTFT="0", TOKENRELAY_SIM_TPS="0")
    yield relay
    relay.stop()


def test_info_names_the_routes_and_no_default_model(routed: Process, sim_server: SimServer) -> None:
    response = httpx.get(routed.url + "/api/info", timeout=10)
    info = response.json()
    assert info["routed"] is True
    assert info["simulated"] is False, "a real upstream answers gpt-*"
    assert info["model"] is None, "no TOKENRELAY_MODEL: no default, not the simulator's 'sim'"
    assert info["upstreams"] == [
        {"name": "lab", "kind": "openai", "pattern": "gpt-*", "url": lab_url(sim_server)},
        {"name": "local", "kind": "simulator", "pattern": "llama*", "url": None},
    ]
    assert info["upstream"] == f"gpt-* → lab (openai, {lab_url(sim_server)}); llama* → local (built-in simulator)"
    assert SECRET not in response.text


def test_banner_and_start_up_log_name_the_upstreams(routed: Process, sim_server: SimServer) -> None:
    log = routed.log()
    assert (f"(routes: gpt-* → lab (openai, {lab_url(sim_server)}); llama* → local (built-in simulator))"
            in log), log
    assert f"route gpt-* → lab (openai, {lab_url(sim_server)})" in log
    assert "route llama* → local (built-in simulator)" in log
    assert "upstream: simulator" not in log
    assert SECRET not in log


def ask(relay: Process, *args: str) -> Any:
    return CliRunner().invoke(cli, ["ask", "--url", relay.url, *args], catch_exceptions=False)


def test_ask_without_a_model_asks_the_first_listed(routed: Process, sim_server: SimServer) -> None:
    listed = [m["id"] for m in httpx.get(routed.url + "/v1/models", timeout=10).json()["data"]]
    assert listed == ["gpt-4o-mini", "llama-3-8b", MARKUP_MODEL]
    sim_server.wait_idle()
    before = sim_server.stats()["completed_streams"]
    result = ask(routed, "hello from a newcomer")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip(), "an answer"
    assert "asking gpt-4o-mini" in result.stderr
    assert f"answered by lab (openai, {lab_url(sim_server)})" in result.stderr
    assert sim_server.stats()["completed_streams"] == before + 1, "the lab upstream answered"
    assert SECRET not in result.output


def test_ask_for_an_unknown_model_says_which_exist(routed: Process) -> None:
    result = ask(routed, "--model", "sim", "hi")
    assert result.exit_code == 1
    assert "model_not_found" in result.stderr
    assert "models this service lists: gpt-4o-mini, llama-3-8b" in result.stderr


def test_ask_uses_the_default_model_when_routes_have_one(log_dir: Path) -> None:
    relay = start_serve(log_dir, [{"name": "local", "pattern": "llama*", "kind": "simulator"}],
                        TOKENRELAY_MODEL="llama-3-70b", TOKENRELAY_SIM_TTFT="0", TOKENRELAY_SIM_TPS="0")
    try:
        assert httpx.get(relay.url + "/api/info", timeout=10).json()["model"] == "llama-3-70b"
        result = ask(relay, "--sse", "hi")
        assert result.exit_code == 0, result.output
        assert result.stdout.strip()
        assert "model llama-3-70b (the service's default), answered by local (built-in simulator)" in result.stderr
    finally:
        relay.stop()


def test_ask_with_no_default_and_nothing_listed_says_so(log_dir: Path, sim_server: SimServer) -> None:
    # A glob route whose upstream lists no model matching it: nothing to pick from.
    relay = start_serve(log_dir, [{"name": "lab", "pattern": "gpt-*", "url": lab_url(sim_server)}])
    try:
        result = ask(relay, "hi")
        assert result.exit_code == 1
        assert "no default model and lists none at GET /v1/models; name one with --model" in result.stderr
    finally:
        relay.stop()


def test_page_offers_the_listed_models_and_gets_answers(browser: Browser, routed: Process,
                                                        sim_server: SimServer) -> None:
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    errors: list[str] = []
    bodies: list[dict[str, Any]] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda r: bodies.append(json.loads(r.post_data or "null"))
            if r.method == "POST" and r.url.endswith("/api/get-response") else None)
    try:
        page.goto(routed.url + "/")
        label = page.locator("#upstream")
        expect(label).to_have_attribute("data-routed", "true")
        expect(label).not_to_contain_text("Simulator — no model API configured")
        expect(label.locator(".route")).to_have_count(2)
        expect(label.locator(".route").first).to_have_text(f"gpt-* → lab (openai, {lab_url(sim_server)})")
        expect(label.locator(".route").last).to_have_text("llama* → local (built-in simulator)")

        picker = page.locator("#model-list")
        expect(picker).to_be_visible()
        expect(picker.locator("option")).to_have_text(
            ["gpt-4o-mini — lab", "llama-3-8b — local", f"{MARKUP_MODEL} — local", "other (type a name)"])
        assert picker.locator("i").count() == 0, "a model name is text, never markup"
        expect(page.locator("#model")).to_have_value("gpt-4o-mini")  # no default: the first listed
        expect(picker).to_have_value("gpt-4o-mini")
        expect(page.locator("#model-help")).to_contain_text("3 models this server lists")
        expect(page.locator("#model-help")).to_contain_text("no default model")

        answers = page.locator("#conversation .msg.assistant")
        sim_server.wait_idle()
        before = sim_server.stats()["completed_streams"]
        page.fill("#prompt", "hello from the page")
        page.click("#send")
        expect(answers.last).to_have_attribute("data-state", "done")
        expect(answers.last.locator(".text")).not_to_have_text("")
        assert bodies[-1]["model"] == "gpt-4o-mini"
        assert sim_server.stats()["completed_streams"] == before + 1, "the lab upstream answered"

        picker.select_option("llama-3-8b")
        expect(page.locator("#model")).to_have_value("llama-3-8b")
        page.fill("#prompt", "and from the local one")
        page.click("#send")
        expect(answers).to_have_count(2)
        expect(answers.last).to_have_attribute("data-state", "done")
        expect(answers.last.locator(".model-tag")).to_have_text("llama-3-8b")
        assert bodies[-1]["model"] == "llama-3-8b"

        page.fill("#model", "llama-custom")  # a name the list leaves out
        expect(picker).to_have_value("")

        # Left empty with no default on the server: the first listed, as the help text says.
        page.fill("#model", "")
        page.fill("#prompt", "with the box left empty")
        page.click("#send")
        expect(answers).to_have_count(3)
        expect(answers.last).to_have_attribute("data-state", "done")
        assert bodies[-1]["model"] == "gpt-4o-mini"
        assert SECRET not in page.content()
        assert errors == []
    finally:
        context.close()


def test_readyz_checks_every_route_and_names_the_one_down(log_dir: Path, sim_server: SimServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    routes = [
        {"name": "lab", "pattern": "gpt-*", "url": lab_url(sim_server), "key_env": KEY_ENV},
        {"name": "claude-lab", "pattern": "claude-*", "kind": "anthropic", "url": lab_url(sim_server),
         "key_env": KEY_ENV},
        {"name": "vllm", "pattern": "llama*", "url": dead, "connect_timeout": 1},
        {"name": "local", "pattern": "sim*", "kind": "simulator"},
    ]
    relay = start_serve(log_dir, routes)
    try:
        response = httpx.get(relay.url + "/readyz", timeout=10)
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not_ready"
        assert body["reason"].startswith(f"vllm ({dead}): cannot reach upstream"), body["reason"]
        assert {u["name"]: u["status"] for u in body["upstreams"]} == {
            "lab": "ready", "claude-lab": "ready", "vllm": "not_ready", "local": "ready"}
        assert SECRET not in response.text
    finally:
        relay.stop()

    healthy = start_serve(log_dir, [r for r in routes if r["name"] != "vllm"])
    try:
        response = httpx.get(healthy.url + "/readyz", timeout=10)
        assert response.status_code == 200, response.text
        assert [u["status"] for u in response.json()["upstreams"]] == ["ready", "ready", "ready"]
    finally:
        healthy.stop()


def test_readyz_checks_the_routes_at_once_each_within_its_timeout(log_dir: Path) -> None:
    # Two upstreams that accept the connection and never answer: checked one after the
    # other, /readyz would take two check timeouts (2 s each).
    from tokenrelay.routes.health import CHECK_TIMEOUT

    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        routes = [{"name": f"silent-{i}", "pattern": f"m{i}-*", "url": f"http://127.0.0.1:{s.getsockname()[1]}/v1"}
                  for i, s in enumerate(silent)]
        relay = start_serve(log_dir, routes)
        try:
            started = time.monotonic()
            response = httpx.get(relay.url + "/readyz", timeout=10)
            took = time.monotonic() - started
            assert response.status_code == 503
            reason = response.json()["reason"]
            assert "silent-0 (" in reason and "silent-1 (" in reason
            assert f"did not answer GET /models within {CHECK_TIMEOUT:g} s" in reason
            assert CHECK_TIMEOUT <= took < 2 * CHECK_TIMEOUT, f"{took:.2f} s"
        finally:
            relay.stop()
    finally:
        for sock in silent:
            sock.close()
