"""``GET /openapi.json`` describes the API as it is, and a live server keeps to it.

The document is generated from the app's route table and its pydantic models
(``tokenrelay.openapi``); every route is in it or deliberately left out. Schemathesis (its
CLI, in a subprocess) then sends generated requests, valid and invalid, to real
``tokenrelay serve`` processes on loopback — one on the built-in simulator with client keys,
one whose default model is an Anthropic route (the standalone simulator's ``/v1/messages``)
— with a fixed seed and a bounded number of examples per operation, and checks every answer:
no 5xx, every status, content type and JSON body as documented."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount, Route

from servers import RelayServer, SimServer, start_anthropic_relay
from tokenrelay.app import create_app
from tokenrelay.config import Settings
from tokenrelay.openapi import OPERATIONS, UNDOCUMENTED, documented

KEY = "sk-client-openapi"
CONFIG = Path(__file__).with_name("schemathesis.toml")
QUICK_SIM = {"TOKENRELAY_SIM_TTFT": "0", "TOKENRELAY_SIM_TPS": "0", "TOKENRELAY_SIM_TOKENS": "5"}
# Each run's bound: examples per operation, and the whole run's wall time.
MAX_EXAMPLES = 12
RUN_TIMEOUT = 300
CHECKS = ",".join(["not_a_server_error", "status_code_conformance", "content_type_conformance",
                   "response_schema_conformance", "response_headers_conformance"])


def test_every_route_is_documented_or_deliberately_left_out() -> None:
    app = create_app(Settings())
    missing = []
    for route in app.routes:
        if isinstance(route, Mount):
            assert route.path in UNDOCUMENTED, f"{route.path}: document it or list it in UNDOCUMENTED"
            continue
        assert isinstance(route, Route)
        if route.path in UNDOCUMENTED:
            continue
        missing += [(m, route.path) for m in route.methods or () if m != "HEAD" and (m, route.path) not in OPERATIONS]
    assert not missing, f"routes missing from tokenrelay.openapi.OPERATIONS: {missing}"
    # Nothing documented that the app does not serve.
    assert documented(app.routes) == set(OPERATIONS)


@pytest.fixture(scope="module")
def keyed(start_relay: Callable[..., RelayServer]) -> RelayServer:
    # Failed keys unlimited: the fuzzer's requests without a key must each get their 401.
    return start_relay(upstream=None, TOKENRELAY_API_KEYS=KEY, TOKENRELAY_FAILED_KEYS_PER_MINUTE="0",
                       TOKENRELAY_MODEL="sim", **QUICK_SIM)


@pytest.fixture(scope="module")
def quick_sim(log_dir: Path) -> Iterator[SimServer]:
    server = SimServer(log_dir=log_dir, args=["--ttft", "0", "--tps", "0", "--tokens", "5"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def claude(start_relay: Callable[..., RelayServer], quick_sim: SimServer) -> RelayServer:
    return start_anthropic_relay(start_relay, quick_sim)


def test_document_describes_streams_errors_and_the_key(keyed: RelayServer) -> None:
    doc = httpx.get(keyed.url + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {path for _, path in OPERATIONS}
    answer = doc["paths"]["/api/get-response"]["post"]
    assert set(answer["responses"]["200"]["content"]) == {"text/plain", "text/event-stream", "application/json"}
    assert answer["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatRequest"}
    for status in ("401", "413", "422", "429", "502"):
        assert answer["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"}
    v1 = doc["paths"]["/v1/chat/completions"]["post"]
    assert v1["responses"]["401"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIErrorBody"}
    assert set(v1["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert doc["components"]["securitySchemes"]["clientKey"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["clientKey"]["description"]}
    assert answer["security"] == [{"clientKey": []}]  # the service has keys: no anonymous option
    assert doc["paths"]["/api/info"]["get"]["security"] == [{}]
    schemas = doc["components"]["schemas"]
    assert schemas["ChatRequest"]["properties"]["model"]["examples"] == ["sim"]
    assert {"kind"} <= set(schemas["StreamEnding"]["properties"])


def test_document_without_keys_makes_the_key_optional_and_drops_401(
        start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=None)
    doc = httpx.get(relay.url + "/openapi.json", timeout=10).json()
    answer = doc["paths"]["/api/get-response"]["post"]
    assert answer["security"] == [{"clientKey": []}, {}]
    assert "401" not in answer["responses"]


def schemathesis(relay: RelayServer, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG),
               "run", relay.url + "/openapi.json",
               "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--seed", "17",
               "--request-timeout", "20", "--no-color", "--suppress-health-check", "all", "--no-shrink", *extra]
    # Run elsewhere: Schemathesis keeps its reports in .schemathesis/ of its working directory.
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tempfile.gettempdir())


def no_crash_logged(relay: RelayServer) -> None:
    log = relay.log()
    assert "Traceback" not in log and "internal_error" not in log, log[-4000:]


def test_schemathesis_finds_nothing_on_the_simulator(keyed: RelayServer) -> None:
    run = schemathesis(keyed, "--header", f"Authorization: Bearer {KEY}")
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    no_crash_logged(keyed)


def test_schemathesis_finds_nothing_on_an_anthropic_route(claude: RelayServer) -> None:
    run = schemathesis(claude)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    no_crash_logged(claude)


def test_v1_refuses_what_its_document_refuses(keyed: RelayServer) -> None:
    """Found by Schemathesis: /v1 took any role and temperature, then the simulator's
    translation refused them with a 422 naming no ``param``. OpenAI's roles and ranges are
    now in the /v1 model: its document says so, and the SDKs get OpenAI's 400 naming the field."""
    headers = {"authorization": f"Bearer {KEY}"}
    for field, body in [("temperature", {"temperature": 3}), ("top_p", {"top_p": 1.5}),
                        ("messages", {"messages": [{"role": "robot", "content": "hi"}]})]:
        response = httpx.post(keyed.url + "/v1/chat/completions", headers=headers, timeout=10,
                              json={"messages": [{"role": "user", "content": "hi"}], **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field, response.text
