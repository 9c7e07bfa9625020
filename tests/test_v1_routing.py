"""Model routing and safe retries, through a real ``tokenrelay serve`` whose routes point at
real simulators on loopback: a healthy one, one that answers every request with 500, one
with 429, and a port where nothing listens."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from sdk import client, close_clients  # noqa: F401  (the fixture closes the clients)
from servers import RelayServer, SimServer, free_port, wait_until
from streams import chat

USER = [{"role": "user", "content": "route me"}]


@pytest.fixture(scope="module")
def failing_sims(log_dir: Path) -> Iterator[dict[str, SimServer]]:
    sims = {"500": SimServer(log_dir=log_dir, args=["--fault", "http-500"]),
            "429": SimServer(log_dir=log_dir, args=["--fault", "http-429"])}
    yield sims
    for sim in sims.values():
        sim.stop()


@pytest.fixture(scope="module")
def routed(start_relay: Callable[..., RelayServer], sim_server: SimServer,
           failing_sims: dict[str, SimServer]) -> RelayServer:
    routes = [
        {"name": "flaky", "pattern": "flaky-*", "url": failing_sims["500"].url + "/v1", "fallback": "good"},
        {"name": "limited", "pattern": "limited-*", "url": failing_sims["429"].url + "/v1"},
        {"name": "dead", "pattern": "dead-*", "url": f"http://127.0.0.1:{free_port()}/v1", "fallback": "good",
         "connect_timeout": 2},
        {"name": "good", "pattern": "sim*", "url": sim_server.url + "/v1"},
        {"name": "local", "pattern": "local", "kind": "simulator"},
    ]
    return start_relay(upstream=None, TOKENRELAY_ROUTES=json.dumps(routes), TOKENRELAY_RETRY_BACKOFF="0.01",
                       TOKENRELAY_RETRY_BUDGET="0.5")



def log_line(relay: RelayServer, model: str) -> str:
    pattern = re.compile(rf"^.* model={re.escape(model)} .*$", re.M)
    return str(wait_until(lambda: (m := pattern.findall(relay.log())) and m[-1]))


def test_models_lists_what_is_routable(routed: RelayServer) -> None:
    listed = {m.id: m.owned_by for m in client(routed).models.list()}
    # 'good' lists its upstream's models matching 'sim*'; 'local' is a plain name; the
    # failing simulators' models match none of their patterns.
    assert listed == {"sim": "good", "sim:echo": "good", "sim:tools": "good", "local": "local"}


def test_unroutable_model_is_404_model_not_found(routed: RelayServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(routed).chat.completions.create(model="gpt-4o", messages=USER)
    assert caught.value.code == "model_not_found"
    assert "gpt-4o" in caught.value.message
    response = httpx.post(routed.url + "/api/get-response", json=chat(model="gpt-4o"))
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "model_not_found"


def test_routes_pick_the_upstream(routed: RelayServer, sim_server: SimServer) -> None:
    sim_server.wait_idle()
    before = sim_server.stats()["total_streams"]
    answer = client(routed).chat.completions.create(model="local", messages=USER)
    assert answer.choices[0].message.content  # the built-in simulator answered...
    assert sim_server.stats()["total_streams"] == before  # ...not the standalone one
    client(routed).chat.completions.create(model="sim:ttft=0,tps=0", messages=USER)
    assert sim_server.stats()["total_streams"] == before + 1


def test_5xx_is_retried_then_falls_back(routed: RelayServer, failing_sims: dict[str, SimServer]) -> None:
    before = failing_sims["500"].stats()["total_streams"]
    stream = client(routed).chat.completions.create(model="flaky-1", messages=USER, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    assert failing_sims["500"].stats()["total_streams"] == before + 3  # one try and two retries
    assert "attempts=flaky:500,flaky:500,flaky:500,good:ok" in log_line(routed, "flaky-1")


def test_connection_refused_falls_back(routed: RelayServer) -> None:
    response = httpx.post(routed.url + "/api/get-response", json=chat(model="dead-2"))
    assert response.status_code == 200 and response.text
    assert "attempts=dead:upstream_unavailable,dead:upstream_unavailable,dead:upstream_unavailable,good:ok" \
        in log_line(routed, "dead-2")


def test_retry_after_beyond_the_budget_is_not_waited_for(routed: RelayServer,
                                                         failing_sims: dict[str, SimServer]) -> None:
    # The simulator asks for Retry-After: 1; the budget is 0.5 s: no retry, the 429 at once.
    before = failing_sims["429"].stats()["total_streams"]
    with pytest.raises(openai.RateLimitError) as caught:
        client(routed).chat.completions.create(model="limited-3", messages=USER, stream=True)
    assert caught.value.response.headers["retry-after"] == "1"
    assert failing_sims["429"].stats()["total_streams"] == before + 1


@pytest.mark.parametrize("fault", ["error-mid", "error-before"])
def test_nothing_is_retried_once_the_answer_began(routed: RelayServer, sim_server: SimServer,
                                                  fault: str) -> None:
    sim_server.wait_idle()
    before = sim_server.stats()["total_streams"]
    stream = client(routed).chat.completions.create(model=f"sim:ttft=0,tps=0,fault={fault}", messages=USER,
                                                    stream=True)
    with pytest.raises(openai.APIError):
        list(stream)
    assert sim_server.stats()["total_streams"] == before + 1
    assert "attempts=" not in log_line(routed, f"sim:ttft=0,tps=0,fault={fault}")


def test_routes_from_a_toml_file(tmp_path: Path, start_relay: Callable[..., RelayServer],
                                 sim_server: SimServer) -> None:
    from tokenrelay.config import load_settings

    config = tmp_path / "routes.toml"
    config.write_text(f'''
retries = 1
[[routes]]
pattern = "sim*"
url = "{sim_server.url}/v1"
key_env = "TEST_ROUTE_KEY"
read_timeout = 30

[[routes]]
pattern = "echo"
kind = "simulator"
''')
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TEST_ROUTE_KEY", "sk-test")
        settings = load_settings(config)
    assert [(r.pattern, r.kind, r.key_env) for r in settings.routes] == [
        ("sim*", "openai", "TEST_ROUTE_KEY"), ("echo", "simulator", None)]
    assert settings.retries == 1
    with pytest.MonkeyPatch.context() as env:
        env.delenv("TEST_ROUTE_KEY", raising=False)
        with pytest.raises(Exception, match="TEST_ROUTE_KEY is not set"):
            load_settings(config)


@pytest.mark.parametrize(("value", "message"), [
    ("not json", "take JSON"),
    ('[{"pattern": "x"}]', "url is required"),
    ('[{"pattern": "x", "kind": "simulator", "fallback": "y"}]', "fallback 'y' names no route"),
    ('[{"pattern": "x", "kind": "bedrock", "url": "http://h/v1"}]', "routes.0.kind"),
])
def test_bad_routes_stop_start_up_with_a_message(monkeypatch: pytest.MonkeyPatch, value: str,
                                                 message: str) -> None:
    from tokenrelay.config import SettingsError, load_settings

    monkeypatch.setenv("TOKENRELAY_ROUTES", value)
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings()
