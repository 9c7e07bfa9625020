"""Safe to expose: what a hung Redis, a hostile connection, a public address without keys, a
hostile web page and hostile input do to a real ``tokenrelay serve`` (docs/security.md)."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer
from servers import Process, RelayServer, free_port, stop_process, wait_until
from streams import chat


QUICK = "sim:echo,ttft=0,tps=0"


def counter(relay: RelayServer, name: str, **labels: str) -> float:
    text = httpx.get(relay.url + "/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ------------------------------------------------------------------ a hung Redis


@pytest.fixture()
def own_redis(log_dir: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: it is stopped (SIGSTOP) and must not take others with it."""
    server = RedisServer(log_dir=log_dir)
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


@contextlib.contextmanager
def stopped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_a_hung_redis_delays_a_request_by_its_timeout_at_most(start_relay, own_redis: RedisServer) -> None:
    relay = start_relay(upstream=None, TOKENRELAY_REDIS_URL=own_redis.url, TOKENRELAY_REDIS_TIMEOUT="1",
                        TOKENRELAY_JOBS_IN_SERVE="false", TOKENRELAY_MAX_CONCURRENT_STREAMS_PER_KEY="4",
                        TOKENRELAY_REQUESTS_PER_MINUTE_PER_KEY="1000")
    assert httpx.post(relay.url + "/api/get-response", json=chat(model=QUICK), timeout=10).status_code == 200
    ready = httpx.get(relay.url + "/readyz", timeout=10).json()
    assert ready["limits"]["status"] == "ok" and ready["limits"]["store"] == "redis"
    with stopped(own_redis.proc):
        timings = []
        for _ in range(3):
            started = time.monotonic()
            response = httpx.post(relay.url + "/api/get-response", json=chat(model=QUICK), timeout=10)
            timings.append(time.monotonic() - started)
            assert response.status_code == 200
        # The first pays the deadline (1 s, plus the wait for a slot); the next ones do not
        # ask the Redis that just failed.
        assert timings[0] < 3.5, timings
        assert max(timings[1:]) < 1.0, timings
        readyz = httpx.get(relay.url + "/readyz", timeout=10)
        assert readyz.status_code == 200  # degraded limits do not make the service not ready
        limits = readyz.json()["limits"]
        assert limits["status"] == "degraded"
        assert "Redis" in limits["reason"] and "let through" in limits["reason"]
    assert "limits not enforced: Redis failed" in relay.log()
    # Redis is back: the limits are enforced again once the degraded window has passed.
    wait_until(lambda: httpx.get(relay.url + "/readyz", timeout=10).json()["limits"]["status"] == "ok",
               timeout=15, interval=0.5)


# ------------------------------------------------------------------ connection limits


@pytest.fixture(scope="module")
def strict(start_relay) -> RelayServer:
    return start_relay(upstream=None, TOKENRELAY_HEADER_TIMEOUT="1", TOKENRELAY_BODY_TIMEOUT="1",
                       TOKENRELAY_MAX_HEADER_BYTES="8192")


def connect(relay: RelayServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port))
    sock.settimeout(10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_request_head_that_never_ends_gets_408(strict: RelayServer) -> None:
    with connect(strict) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"request_timeout"' in answer
    assert time.monotonic() - started < 5


def test_a_silent_connection_is_closed(strict: RelayServer) -> None:
    with connect(strict) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""
    assert time.monotonic() - started < 5


def test_a_body_that_never_ends_gets_408(strict: RelayServer) -> None:
    with connect(strict) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /api/get-response HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\": [")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body did not arrive" in answer
    assert time.monotonic() - started < 5


def test_a_huge_header_gets_431_without_being_kept(strict: RelayServer) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        with contextlib.suppress(ConnectionError):  # the server may close before all is sent
            for _ in range(100):
                sock.sendall(b"a" * 65536)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert httpx.get(strict.url + "/healthz", timeout=5).status_code == 200


def test_a_kept_alive_connection_serves_the_next_request(strict: RelayServer) -> None:
    """The head deadline counts from a request's first byte, not from the connection's."""
    with httpx.Client(timeout=5) as client:
        assert client.get(strict.url + "/healthz").status_code == 200
        time.sleep(0.5)  # idle on purpose, under the keep-alive timeout (5 s)
        assert client.get(strict.url + "/healthz").status_code == 200


def test_over_the_connection_limit_is_a_json_503(start_relay) -> None:
    relay = start_relay(upstream=None, TOKENRELAY_MAX_CONNECTIONS="3", TOKENRELAY_HEADER_TIMEOUT="30")
    silent = [connect(relay) for _ in range(3)]
    try:
        response = httpx.get(relay.url + "/healthz", timeout=5)
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "overloaded"
        assert response.headers["retry-after"] == "1"
    finally:
        for sock in silent:
            sock.close()
    wait_until(lambda: httpx.get(relay.url + "/healthz", timeout=5).status_code == 200)


def test_the_open_file_limit_is_raised_and_silent_sockets_do_not_starve_healthz(tmp_path: Path) -> None:
    """Started with 256 open files allowed (the hard limit higher), 300 silent sockets used to
    make /healthz fail; serve raises its limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1024), hard))  # this test's own 300 sockets
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
    env["TOKENRELAY_DATA_DIR"] = str(tmp_path)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "serve", "--port", str(port)], env=env, stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    url = f"http://127.0.0.1:{port}"
    sockets: list[socket.socket] = []
    try:
        wait_until(lambda: _healthy(url), timeout=20)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3] == (str(hard) if hard != resource.RLIM_INFINITY else "unlimited"), line
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    finally:
        for sock in sockets:
            sock.close()
        stop_process(proc)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------------ exposure by default


def serve_exit(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
    full.update({"TOKENRELAY_DATA_DIR": tempfile.mkdtemp(prefix="tokenrelay-data-"), **env})
    return subprocess.run([sys.executable, "-m", "tokenrelay", "serve", "--port", str(free_port()), *args],
                          env=full, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_public_address_without_keys_is_refused(host: str) -> None:
    result = serve_exit(["--host", host], OPENAI_API_KEY="sk-operators-paid-key",
                        TOKENRELAY_UPSTREAM_URL="http://127.0.0.1:9/v1")
    assert result.returncode == 1, result.stderr
    assert "TOKENRELAY_API_KEYS" in result.stderr and "--allow-public-without-keys" in result.stderr
    assert "sk-operators-paid-key" not in result.stderr


def test_a_public_address_serves_with_keys_or_when_allowed_and_the_banner_brackets_ipv6(log_dir: Path) -> None:
    port = free_port()
    keyed = Process(["serve", "--port", str(port), "--host", "0.0.0.0"], port=port, ready_path="/healthz",
                    env={"TOKENRELAY_DATA_DIR": tempfile.mkdtemp(prefix="tokenrelay-data-"),
                         "TOKENRELAY_API_KEYS": "tr-public-test-key-0123456789"}, log_dir=log_dir)
    keyed.stop()
    # '::' listens on IPv6 only (asyncio sets IPV6_V6ONLY): asked on [::1].
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
    env["TOKENRELAY_DATA_DIR"] = tempfile.mkdtemp(prefix="tokenrelay-data-")
    log_path = log_dir / f"serve-ipv6-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tokenrelay", "serve", "--port", str(port), "--host", "::",
                                 "--allow-public-without-keys"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: _healthy(f"http://[::1]:{port}"), timeout=20)
            assert f"tokenrelay on http://[::]:{port}/" in log_path.read_text()
        finally:
            stop_process(proc)


# ------------------------------------------------------------------ browsers and host names


@contextlib.contextmanager
def attacker_site(html: str) -> Iterator[str]:
    """Another local web server (another origin, the same site as 127.0.0.1) serving ``html``."""
    page = html.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def open_relay(start_relay) -> RelayServer:
    """No keys, on loopback: the set-up of a developer's machine."""
    return start_relay(upstream=None)


def test_another_site_cannot_start_answers_or_jobs_but_the_own_page_can(browser, open_relay: RelayServer) -> None:
    target = open_relay.url
    body = '{"messages": [{"role": "user", "content": "spend the owner\\u2019s tokens"}], "model": "sim:echo"}'
    html = f"""<!doctype html><title>loading</title><script>
      Promise.allSettled([
        fetch("{target}/api/get-response", {{method: "POST", mode: "no-cors", body: '{body}'}}),
        fetch("{target}/api/jobs", {{method: "POST", mode: "no-cors", body: '{body}'}}),
        fetch("{target}/v1/chat/completions", {{method: "POST", mode: "no-cors",
              headers: {{"content-type": "text/plain"}}, body: '{body}'}}),
      ]).then(() => {{ document.title = "sent"; }});
    </script>"""
    started = counter(open_relay, "tokenrelay_streams_total")
    refusals = open_relay.log().count("outcome=forbidden (sec-fetch-site")
    context = browser.new_context()
    try:
        with attacker_site(html) as evil:
            page = context.new_page()
            page.goto(evil)
            page.wait_for_function("document.title === 'sent'", timeout=15_000)
        # The three requests reached tokenrelay (so the test can fail) and were refused.
        wait_until(lambda: open_relay.log().count("outcome=forbidden (sec-fetch-site") - refusals == 3)
        for path in ("/api/get-response", "/api/jobs", "/v1/chat/completions"):
            assert f"POST {path} status=403 outcome=forbidden" in open_relay.log()
        assert counter(open_relay, "tokenrelay_streams_total") == started

        # The app's own page: a same-origin fetch with a string body (text/plain, as the
        # original design's page sends it) still gets its answer.
        own = context.new_page()
        own.goto(target + "/")
        text = own.evaluate("""async (body) => {
            const r = await fetch("/api/get-response", {method: "POST", body});
            return r.status + " " + await r.text();
        }""", '{"messages": [{"role": "user", "content": "hello there"}], "model": "sim:echo,ttft=0,tps=0"}')
        assert text.startswith("200 ") and "hello there" in text
    finally:
        context.close()


def test_a_foreign_host_name_is_refused(open_relay: RelayServer) -> None:
    """DNS rebinding in a real browser: tests/test_exposure_rebinding.py."""
    for host in ("localhost", f"127.0.0.1:{open_relay.port}", f"localhost:{open_relay.port}"):
        assert httpx.get(open_relay.url + "/healthz", headers={"host": host}, timeout=5).status_code == 200
    page = httpx.get(open_relay.url + "/", headers={"host": f"rebind.example:{open_relay.port}"}, timeout=5)
    assert page.status_code == 403 and "TOKENRELAY_ALLOWED_HOSTS" in page.text
    refused = httpx.post(open_relay.url + "/v1/chat/completions", json=chat(model=QUICK),
                         headers={"host": "rebind.example"}, timeout=5)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"  # OpenAI's shape on /v1


def test_allowed_hosts_and_cors_origins_let_a_deployment_in(start_relay) -> None:
    relay = start_relay(upstream=None, TOKENRELAY_ALLOWED_HOSTS="127.0.0.1,chat.example.com,.example.org",
                        TOKENRELAY_CORS_ORIGINS="https://app.example.com")
    for host, status in (("chat.example.com", 200), ("a.example.org", 200), ("example.org", 200),
                         ("evil.example.net", 403), ("localhost", 403)):  # the list replaces the default
        assert httpx.get(relay.url + "/healthz", headers={"host": host}, timeout=5).status_code == status, host
    listed = httpx.post(relay.url + "/api/get-response", json=chat(model=QUICK), timeout=10, headers={
        "host": "chat.example.com", "origin": "https://app.example.com", "sec-fetch-site": "cross-site"})
    assert listed.status_code == 200
    other = httpx.post(relay.url + "/api/get-response", json=chat(model=QUICK), timeout=10, headers={
        "host": "chat.example.com", "origin": "https://evil.example.net", "sec-fetch-site": "cross-site"})
    assert other.status_code == 403
    same = httpx.post(relay.url + "/api/get-response", json=chat(model=QUICK), timeout=10, headers={
        "host": "chat.example.com", "origin": "https://chat.example.com"})  # an older browser
    assert same.status_code == 200
    broken = httpx.post(relay.url + "/api/get-response", json=chat(model=QUICK), timeout=10, headers={
        "host": "chat.example.com", "origin": "http://[::1"})  # not a URL: refused, not a 500
    assert broken.status_code == 403


# ------------------------------------------------------------------ hostile input


def test_crlf_in_a_model_name_cannot_forge_a_log_line(open_relay: RelayServer) -> None:
    forged = "FORGED-LINE-1234 INFO tokenrelay [req_x] everything is fine"
    response = httpx.post(open_relay.url + "/api/get-response", timeout=10,
                          json=chat(model=f"sim:echo\r\n{forged}"))
    assert response.status_code in (200, 404, 422)
    wait_until(lambda: "FORGED-LINE-1234" in open_relay.log())
    # Every record's line starts with its time; what a client sends can only continue one.
    lines = [line for line in open_relay.log().splitlines() if "FORGED-LINE-1234" in line]
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d |\s", line) for line in lines), lines
    assert "\\x0d" in open_relay.log()


@pytest.mark.parametrize("given", ['abc"<script>', "a b", "x" * 129, "é-id"])
def test_an_unsafe_request_id_is_replaced(open_relay: RelayServer, given: str) -> None:
    response = httpx.get(open_relay.url + "/api/probe?ticks=2&interval=0.05", timeout=10,
                         headers={"x-request-id": given.encode("utf-8")})
    assert re.fullmatch(r"req_[0-9a-f]{16}", response.headers["x-request-id"]), response.headers["x-request-id"]


def test_a_safe_request_id_is_kept(open_relay: RelayServer) -> None:
    given = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331:01"
    response = httpx.get(open_relay.url + "/api/probe?ticks=2&interval=0.05", timeout=10,
                         headers={"x-request-id": given})
    assert response.headers["x-request-id"] == given


def test_failed_keys_are_limited_per_address(start_relay) -> None:
    key = "tr-failed-keys-test-0123456789"
    relay = start_relay(upstream=None, TOKENRELAY_API_KEYS=key, TOKENRELAY_FAILED_KEYS_PER_MINUTE="3")
    post: Callable[[dict[str, str]], httpx.Response] = lambda headers: httpx.post(  # noqa: E731
        relay.url + "/api/get-response", json=chat(model=QUICK), headers=headers, timeout=10)
    assert post({"authorization": f"Bearer {key}"}).status_code == 200  # right keys are not counted
    for guess in range(3):
        assert post({"authorization": f"Bearer wrong-{guess}"}).status_code == 401
    limited = post({"authorization": "Bearer wrong-3"})
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # Over the limit even the right key waits: the limit must not tell which guess was right.
    assert post({"authorization": f"Bearer {key}"}).status_code == 429


def test_tools_on_the_text_route_are_refused_pointing_to_sse(open_relay: RelayServer) -> None:
    body = {**chat(model="sim:tools,ttft=0,tps=0"),
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]}
    text = httpx.post(open_relay.url + "/api/get-response", json=body, timeout=10)
    assert text.status_code == 422
    error = text.json()["error"]
    assert error["type"] == "validation_error"
    assert "text/event-stream" in error["message"] and "/v1/chat/completions" in error["message"]
    sse = httpx.post(open_relay.url + "/api/get-response", json=body, timeout=10,
                     headers={"accept": "text/event-stream"})
    assert sse.status_code == 200
