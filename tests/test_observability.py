"""Observability on a real ``tokenrelay serve``: ``/metrics`` counts what streams did (a
completed one, a cancelled one, upstream failures, refusals), ``/readyz`` follows the
upstream, and the request log line carries its fields — as JSON on request, never a key,
the prompt only when asked."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

import anyio
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import Process, RelayServer, SimServer, free_port, wait_until
from streams import chat
from test_cancel import open_request

from tokenrelay.app import create_app
from tokenrelay.config import Settings
from tokenrelay.routes.health import Readiness

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(relay: RelayServer) -> Samples:
    response = httpx.get(relay.url + "/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def total(samples: Samples, name: str) -> float:
    """The sum over every label set of ``name``."""
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.fixture(scope="module")
def own_relay(start_relay: Callable[..., RelayServer]) -> RelayServer:
    """A relay on the in-process simulator whose counters no other test touches."""
    return start_relay(upstream=None)


def test_a_completed_stream_is_counted(own_relay: RelayServer) -> None:
    before = scrape(own_relay)
    response = httpx.post(own_relay.url + "/api/get-response", json=chat(model="sim:ttft=0.05,tps=0,tokens=7"),
                          timeout=10)
    assert response.status_code == 200
    after = scrape(own_relay)
    assert delta(before, after, "tokenrelay_requests_total", route="/api/get-response", status="200") == 1
    assert delta(before, after, "tokenrelay_streams_total", mode="text", outcome="completed") == 1
    assert total(after, "tokenrelay_tokens_out_total") - total(before, "tokenrelay_tokens_out_total") == 7
    assert delta(before, after, "tokenrelay_bytes_out_total") == len(response.content)
    assert delta(before, after, "tokenrelay_time_to_first_token_seconds_count", mode="text") == 1
    # The simulator waits 50 ms before the first token; the event loop's timers keep whole
    # milliseconds, so that wait can end up to a millisecond early.
    assert delta(before, after, "tokenrelay_time_to_first_token_seconds_sum", mode="text") >= 0.048
    assert delta(before, after, "tokenrelay_stream_duration_seconds_count", mode="text") == 1
    assert value(after, "tokenrelay_streams_in_flight", mode="text") == 0
    assert delta(before, after, "tokenrelay_client_cancellations_total") == 0


def test_a_cancelled_stream_is_in_flight_then_counted(own_relay: RelayServer) -> None:
    before = scrape(own_relay)
    sock = open_request(own_relay, chat(model="sim:ttft=0,tps=10,tokens=200"), accept="text/event-stream")
    try:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        wait_until(lambda: value(scrape(own_relay), "tokenrelay_streams_in_flight", mode="sse") == 1)
    finally:
        sock.close()
    wait_until(lambda: delta(before, scrape(own_relay), "tokenrelay_client_cancellations_total") == 1)
    after = scrape(own_relay)
    assert value(after, "tokenrelay_streams_in_flight", mode="sse") == 0
    assert delta(before, after, "tokenrelay_streams_total", mode="sse", outcome="client_cancelled") == 1
    assert delta(before, after, "tokenrelay_streams_total", mode="sse", outcome="completed") == 0
    assert delta(before, after, "tokenrelay_stream_duration_seconds_count", mode="sse") == 1


@pytest.mark.parametrize("path", ["/api/get-response", "/v1/chat/completions", "/api/jobs"])
def test_a_client_that_leaves_before_its_request_arrived_is_a_499_not_an_error(own_relay: RelayServer,
                                                                              path: str) -> None:
    before = scrape(own_relay)
    with socket.create_connection(("127.0.0.1", own_relay.port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{\"messages\": [".encode())
    wait_until(lambda: delta(before, scrape(own_relay), "tokenrelay_requests_total", route=path, status="499") == 1)
    log = own_relay.log()
    assert f"{path} client left before its request arrived whole" in log
    assert "Traceback" not in log and "Exception in ASGI application" not in log


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_the_simulator_takes_a_client_leaving_mid_request_quietly(sim_server: SimServer, path: str) -> None:
    errors_before = sim_server.log().count("Exception in ASGI application")
    with socket.create_connection(("127.0.0.1", int(sim_server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "x-api-key: k\r\nanthropic-version: 2023-06-01\r\nContent-Length: 1000\r\n\r\n{".encode())
    # The simulator handles events in order: once a later request is answered, the
    # departed one has been dealt with.
    assert httpx.get(sim_server.url + "/v1/models", timeout=5).status_code == 200
    assert sim_server.log().count("Exception in ASGI application") == errors_before


def test_upstream_errors_are_counted_by_type(relay_server: RelayServer) -> None:
    before = scrape(relay_server)
    refused = httpx.post(relay_server.url + "/api/get-response", json=chat(model="sim:fault=http-500"), timeout=10)
    assert refused.status_code == 502
    midway = httpx.post(relay_server.url + "/api/get-response",
                        json=chat(model="sim:fault=error-mid,ttft=0,tps=0"), timeout=10,
                        headers={"accept": "text/event-stream"})
    assert b"event: error" in midway.content
    after = scrape(relay_server)
    assert delta(before, after, "tokenrelay_requests_total", route="/api/get-response", status="502") == 1
    assert delta(before, after, "tokenrelay_streams_total", mode="text", outcome="upstream_error") == 1
    assert delta(before, after, "tokenrelay_streams_total", mode="sse", outcome="failed_midway") == 1
    assert delta(before, after, "tokenrelay_upstream_errors_total", type=refused.json()["error"]["type"]) >= 1
    assert sum(v for (name, _), v in after.items() if name == "tokenrelay_upstream_errors_total") - sum(
        v for (name, _), v in before.items() if name == "tokenrelay_upstream_errors_total") == 2


def test_requests_of_every_route_are_counted(own_relay: RelayServer) -> None:
    before = scrape(own_relay)
    assert httpx.post(own_relay.url + "/api/get-response", json={"messages": []}, timeout=5).status_code == 422
    assert httpx.get(own_relay.url + "/api/get-response", timeout=5).status_code == 405
    assert httpx.get(own_relay.url + "/healthz", timeout=5).status_code == 200
    assert httpx.get(own_relay.url + "/no/such/page", timeout=5).status_code == 404
    assert httpx.get(own_relay.url + "/static/app.js", timeout=5).status_code == 200
    after = scrape(own_relay)
    assert delta(before, after, "tokenrelay_requests_total", route="/api/get-response", status="422") == 1
    assert delta(before, after, "tokenrelay_requests_total", route="/api/get-response", status="405") == 1
    assert delta(before, after, "tokenrelay_requests_total", route="/healthz", status="200") == 1
    assert delta(before, after, "tokenrelay_requests_total", route="other", status="404") == 1
    assert delta(before, after, "tokenrelay_requests_total", route="/static", status="200") == 1


def test_each_app_has_its_own_registry() -> None:
    first, second = create_app(Settings()), create_app(Settings())
    assert first.state.metrics.registry is not second.state.metrics.registry
    first.state.metrics.count_request("/api/get-response", 400)
    assert first.state.metrics.requests.labels("/api/get-response", "400")._value.get() == 1
    assert second.state.metrics.requests.labels("/api/get-response", "400")._value.get() == 0


# --- /readyz -------------------------------------------------------------------------------

def test_ready_on_the_simulator_and_on_a_live_upstream(own_relay: RelayServer, relay_server: RelayServer) -> None:
    for relay in (own_relay, relay_server):
        response = httpx.get(relay.url + "/readyz", timeout=5)
        assert response.status_code == 200
        assert response.json()["status"] == "ready"


def test_not_ready_while_the_upstream_is_down(start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=f"http://127.0.0.1:{free_port()}/v1")
    response = httpx.get(relay.url + "/readyz", timeout=10)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert "cannot reach upstream" in body["reason"]
    assert httpx.get(relay.url + "/healthz", timeout=5).status_code == 200, "alive all the same"


def test_readiness_is_cached_for_a_few_seconds() -> None:
    class Upstream:
        calls = 0
        answer: str | None = None

        async def check_ready(self, *, timeout: float) -> str | None:
            self.calls += 1
            return self.answer

    now = [100.0]
    readiness = Readiness(ttl=5, clock=lambda: now[0])
    upstream = Upstream()

    async def main() -> None:
        assert await readiness.reason(upstream) is None
        upstream.answer = "down"
        now[0] += 4.9
        assert await readiness.reason(upstream) is None, "still the cached answer"
        now[0] += 0.2
        assert await readiness.reason(upstream) == "down"
        assert upstream.calls == 2

    anyio.run(main)


# --- the request log line --------------------------------------------------------------------

SECRET = "sk-test-do-not-log-7f3a9c"


def json_lines(relay: RelayServer) -> list[dict]:
    return [orjson.loads(line) for line in relay.log().splitlines() if line.startswith("{")]


def request_line(relay: RelayServer, request_id: str) -> dict:
    def find() -> dict | None:
        return next((line for line in json_lines(relay)
                     if line.get("request_id") == request_id and "stream_id" in line), None)
    return wait_until(find)


def test_json_log_line_has_the_fields_and_no_key(start_relay: Callable[..., RelayServer],
                                                 sim_server: SimServer) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_LOG_JSON="true", TOKENRELAY_LOG_LEVEL="debug",
                        TOKENRELAY_UPSTREAM_KEY=SECRET)
    httpx.post(relay.url + "/api/get-response", json=chat("a private question", model="sim:ttft=0,tps=0,tokens=4"),
               headers={"x-request-id": "req-json-log-1"}, timeout=10).raise_for_status()
    httpx.post(relay.url + "/api/get-response", json=chat(model="sim:fault=error-mid,ttft=0,tps=0"),
               headers={"x-request-id": "req-json-log-2", "accept": "text/event-stream"}, timeout=10)
    httpx.get(relay.url + "/readyz", timeout=10)
    line = request_line(relay, "req-json-log-1")
    assert line["level"] == "info"
    assert line["stream_id"].startswith("st_")
    assert line["model"] == "sim:ttft=0,tps=0,tokens=4"
    assert line["status"] == 200
    assert line["outcome"] == "completed"
    assert line["tokens"] == 4
    assert isinstance(line["ttft_ms"], float) and isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= line["ttft_ms"]
    assert "prompt" not in line
    failed = request_line(relay, "req-json-log-2")
    assert failed["outcome"] == "failed_midway" and failed["error_type"]
    log = relay.log()
    assert SECRET not in log
    assert "a private question" not in log


def test_prompts_are_logged_only_when_enabled(start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=None, TOKENRELAY_LOG_JSON="true", TOKENRELAY_LOG_PROMPTS="true")
    httpx.post(relay.url + "/api/get-response", json=chat("log me, please", model="sim:ttft=0,tps=0,tokens=2"),
               headers={"x-request-id": "req-prompt-1"}, timeout=10).raise_for_status()
    assert request_line(relay, "req-prompt-1")["prompt"] == "log me, please"


def test_plain_log_line_names_request_stream_and_outcome(own_relay: RelayServer) -> None:
    httpx.post(own_relay.url + "/api/get-response", json=chat(model="sim:ttft=0,tps=0,tokens=3"),
               headers={"x-request-id": "req-plain-1"}, timeout=10).raise_for_status()
    line = wait_until(lambda: next((x for x in own_relay.log().splitlines() if "[req-plain-1]" in x), None))
    for part in (" st_", "status=200", "model=sim:ttft=0,tps=0,tokens=3", "outcome=completed", "ttft_ms=",
                 "tokens=3", "duration_ms="):
        assert part in line


def test_metrics_add_up_every_worker(log_dir) -> None:
    """serve --workers 2: whichever worker answers a scrape (new connection each time, so
    both do), it counts both workers' requests."""
    port = free_port()
    server = Process(["serve", "--port", str(port), "--workers", "2"], port=port, ready_path="/healthz",
                     env={"TOKENRELAY_MODEL": "sim"}, log_dir=log_dir)
    relay = RelayServer.__new__(RelayServer)
    relay.url = server.url
    try:
        # /healthz answers as soon as one worker is up: wait for the other too
        wait_until(lambda: server.log().count("Application startup complete") == 2, timeout=30)
        assert len(set(re.findall(r"Started server process \[(\d+)\]", server.log()))) == 2
        for _ in range(8):  # a new connection each: the kernel spreads them over the workers
            httpx.post(server.url + "/api/get-response", json=chat(model="sim:ttft=0,tps=0,tokens=3"),
                       timeout=10).raise_for_status()
        for _ in range(6):
            samples = scrape(relay)
            assert value(samples, "tokenrelay_requests_total", route="/api/get-response", status="200") == 8
            assert total(samples, "tokenrelay_tokens_out_total") == 24
    finally:
        server.stop()


def test_tokens_and_answers_by_model_and_key_name_with_jobs_and_bounded_models(
        start_relay: Callable[..., RelayServer], tmp_path) -> None:
    """Tokens and answers carry the model (a listed one, else ``other``) and the client key's
    name (never the key); a job's tokens are counted when it ends."""
    import secrets

    key = secrets.token_urlsafe(24)
    keys = tmp_path / "keys"
    keys.write_text(f"{key} alice\n")
    relay = start_relay(upstream=None, TOKENRELAY_API_KEYS_FILE=str(keys), TOKENRELAY_SIM_TTFT="0",
                        TOKENRELAY_SIM_TPS="0", TOKENRELAY_SIM_TOKENS="5", TOKENRELAY_DATA_DIR=str(tmp_path / "data"))
    auth = {"authorization": f"Bearer {key}"}
    metrics = httpx.get(relay.url + "/metrics", headers=auth, timeout=5)
    assert metrics.status_code == 200
    with httpx.Client(base_url=relay.url, headers=auth, timeout=10) as client:
        def scrape_keyed() -> Samples:
            samples: Samples = {}
            for family in text_string_to_metric_families(client.get("/metrics").text):
                for sample in family.samples:
                    samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
            return samples

        before = scrape_keyed()
        assert client.post("/api/get-response", json=chat(model="sim")).status_code == 200
        # options make endless names: each is counted as ``other``
        for n in (3, 4):
            assert client.post("/api/get-response", json=chat(model=f"sim:tokens={n}")).status_code == 200
        assert client.post("/api/get-response", json=chat(model="sim:seed=9")).status_code == 200
        job = client.post("/api/jobs", json=chat(model="sim")).json()
        wait_until(lambda: client.get(f"/api/jobs/{job['id']}").json()["status"] == "succeeded")
        after = scrape_keyed()

    stream = {"key": "alice", "source": "stream"}
    assert delta(before, after, "tokenrelay_tokens_out_total", model="sim", **stream) == 5
    assert delta(before, after, "tokenrelay_tokens_out_total", model="other", **stream) == 3 + 4 + 5
    assert delta(before, after, "tokenrelay_answers_total", model="sim", outcome="completed", **stream) == 1
    assert delta(before, after, "tokenrelay_answers_total", model="other", outcome="completed", **stream) == 3
    # a job counts under the key that submitted it
    assert delta(before, after, "tokenrelay_tokens_out_total", model="sim", key="alice", source="job") == 5
    assert delta(before, after, "tokenrelay_answers_total", model="sim", key="alice", source="job",
                 outcome="succeeded") == 1
    models = {dict(labels).get("model") for (name, labels) in after if name == "tokenrelay_tokens_out_total"}
    assert models <= {"sim", "sim:echo", "sim:tools", "other"}
    assert key not in httpx.get(relay.url + "/metrics", headers=auth, timeout=5).text


def test_the_grafana_dashboard_queries_only_what_metrics_serves(own_relay: RelayServer) -> None:
    """deploy/grafana/tokenrelay.json: every metric it queries is at /metrics, and every label
    it groups or filters by is one of that metric's labels."""
    from pathlib import Path

    from tokenrelay.metrics import Metrics

    path = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "tokenrelay.json"
    dashboard = orjson.loads(path.read_bytes())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for shown in ("time to first token", "tokens/s", "in flight", "errors", "cancellations"):
        assert shown in titles
    httpx.post(own_relay.url + "/api/get-response", json=chat(model="sim:ttft=0,tps=0,tokens=2"), timeout=10)
    served: dict[str, str] = {}  # every series name /metrics can serve → its family
    response = httpx.get(own_relay.url + "/metrics", timeout=5)
    for family in text_string_to_metric_families(response.text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "gauge": ("",)}[family.type]
        served.update({family.name + suffix: family.name for suffix in suffixes})
    labels = {collector._name: set(collector._labelnames)  # type: ignore[attr-defined]
              for collector in Metrics().registry._collector_to_names}  # type: ignore[attr-defined]
    for expr in exprs:
        names = re.findall(r"\btokenrelay_[a-z_]+", expr)
        assert names, expr
        for name in names:
            assert name in served, f"{name} (in {expr}) is not at /metrics"
            family = served[name]
            used = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
            used |= set(re.findall(r"[{,]\s*([a-z_]+)\s*(?:=~|!~|!=|=)", expr))
            assert used - {"le", ""} <= labels[family], f"{expr}: {used - labels[family]} not labels of {family}"
