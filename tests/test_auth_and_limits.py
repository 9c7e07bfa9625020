"""Client keys, per-key limits and CORS, on real ``tokenrelay serve`` processes with the
standalone simulator as their upstream (and a real redis-server where limits are shared)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from click.testing import CliRunner
from servers import RelayServer, SimServer, wait_until
from streams import chat

from tokenrelay.cli import cli
from tokenrelay.config import SettingsError, load_settings

SLOW = "sim:ttft=0,tps=5,tokens=400"  # streams for 80 s unless its client leaves
QUICK = "sim:echo,ttft=0,tps=0"


def new_key() -> str:
    return "tr-" + secrets.token_urlsafe(18)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def post(relay: RelayServer, key: str | None = None, *, path: str = "/api/get-response",
         model: str = QUICK, **extra: str) -> httpx.Response:
    headers = {**(bearer(key) if key else {}), **extra}
    return httpx.post(relay.url + path, json=chat("hello", model=model), headers=headers, timeout=30)


@contextlib.contextmanager
def open_stream(relay: RelayServer, key: str | None, *, grace: str = "0") -> Iterator[httpx.Response]:
    """A stream that is running (its first piece arrived) until the block ends; the client
    then hangs up, midway — for good with ``grace`` 0, else the answer waits that long for a
    resume (docs/resume.md)."""
    with httpx.Client(timeout=30) as client:
        headers = {**(bearer(key) if key else {}), "x-resume-grace": grace}
        with client.stream("POST", relay.url + "/api/get-response", json=chat("hi", model=SLOW),
                           headers=headers) as response:
            assert response.status_code == 200, response.read()
            pieces = response.iter_raw()  # kept: dropping the iterator would close the stream
            next(pieces)
            yield response


def sim_upstream(sim_server: SimServer) -> str:
    return sim_server.url + "/v1"


# --------------------------------------------------------------------------- keys


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return new_key(), new_key()


@pytest.fixture(scope="module")
def keyed(start_relay, sim_server: SimServer, keys: tuple[str, str]) -> RelayServer:
    return start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_API_KEYS=",".join(keys))


def test_no_key_is_refused_with_a_clear_error(keyed: RelayServer) -> None:
    response = post(keyed)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert error["type"] == "unauthorized"
    assert "Authorization: Bearer" in error["message"]


@pytest.mark.parametrize("header", ["Bearer wrong-key", "Basic dXNlcjpwYXNz", "Bearer", "Token abc"])
def test_a_wrong_key_is_refused(keyed: RelayServer, keys: tuple[str, str], header: str) -> None:
    response = post(keyed, authorization=header)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"
    assert "www-authenticate" in response.headers
    # a prefix of a real key is as wrong as any other
    assert post(keyed, keys[0][:-1]).status_code == 401


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/v1/no-such-route"])
def test_v1_refusals_use_openai_error_shape(keyed: RelayServer, path: str) -> None:
    # Checked on the path alone, before routing: every /v1 route is covered.
    for headers in ({}, bearer("not-a-key")):
        response = httpx.post(keyed.url + path, json={}, headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "authentication_error" and error["code"] == "unauthorized"
        assert error["param"] is None and error["message"]


def test_the_right_keys_are_let_in(keyed: RelayServer, keys: tuple[str, str]) -> None:
    for key in keys:
        response = post(keyed, key)
        assert response.status_code == 200
        assert response.text == "hello"
    response = post(keyed, authorization=f"bearer {keys[1]}")  # the scheme is case-insensitive
    assert response.status_code == 200


def test_public_routes_stay_public(keyed: RelayServer) -> None:
    for path in ("/", "/static/app.js", "/healthz"):
        assert httpx.get(keyed.url + path, timeout=10).status_code == 200, path
    info = httpx.get(keyed.url + "/api/info", timeout=10).json()
    assert info["auth_required"] is True
    for path in ("/readyz", "/metrics"):  # not guarded, whether or not they exist yet
        assert httpx.get(keyed.url + path, timeout=10).status_code != 401, path


def test_info_says_when_no_key_is_needed(relay_server: RelayServer) -> None:
    assert httpx.get(relay_server.url + "/api/info", timeout=10).json()["auth_required"] is False


def test_keys_file_names_clients_in_logs_and_never_logs_keys(start_relay, sim_server: SimServer,
                                                            tmp_path: Path) -> None:
    alice, bob = new_key(), new_key()
    path = tmp_path / "keys"
    path.write_text(f"# client keys\n{alice} alice\n\n{bob}   bob  # the batch job\n")
    relay = start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_API_KEYS_FILE=str(path))
    assert post(relay, alice).status_code == 200
    assert post(relay, bob).status_code == 200
    assert post(relay, alice + "x").status_code == 401
    wait_until(lambda: "client=alice" in relay.log() and "client=bob" in relay.log())
    log = relay.log()
    assert "status=401" in log
    assert alice not in log and bob not in log


def test_keys_never_appear_in_logs(keyed: RelayServer, keys: tuple[str, str]) -> None:
    assert post(keyed, keys[0]).status_code == 200
    assert post(keyed, keys[0] + "-typo").status_code == 401
    wait_until(lambda: keyed.log().count("status=401") >= 2)
    log = keyed.log()
    assert "client=key-" in log  # a short hash names the client instead
    for key in keys:
        assert key not in log


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOKENRELAY_API_KEYS": " , "}, "no key given"),
        ({"TOKENRELAY_API_KEYS": "has space"}, "printable ASCII"),
        ({"TOKENRELAY_API_KEYS_FILE": "/no/such/file"}, "cannot read"),
        ({"TOKENRELAY_CORS_ORIGINS": "example.com"}, "not an origin"),
        ({"TOKENRELAY_REDIS_URL": "http://127.0.0.1:1"}, "redis://"),
    ],
)
def test_bad_settings_stop_start_up(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_a_keys_file_without_keys_stops_start_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# nothing yet\n")
    monkeypatch.setenv("TOKENRELAY_API_KEYS_FILE", str(path))
    with pytest.raises(SettingsError, match="holds no key"):
        load_settings()


def test_ask_sends_the_key(keyed: RelayServer, keys: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENRELAY_API_KEY", raising=False)
    runner = CliRunner()
    refused = runner.invoke(cli, ["ask", "--url", keyed.url, "--model", QUICK, "hi"], catch_exceptions=False)
    assert refused.exit_code == 1
    assert "401 unauthorized" in refused.stderr
    given = runner.invoke(cli, ["ask", "--url", keyed.url, "--key", keys[0], "--model", QUICK, "hi there"],
                          catch_exceptions=False)
    assert given.exit_code == 0, given.output
    assert given.stdout == "hi there\n"
    from_env = runner.invoke(cli, ["ask", "--url", keyed.url, "--model", QUICK, "from env"],
                             env={"TOKENRELAY_API_KEY": keys[1]}, catch_exceptions=False)
    assert from_env.exit_code == 0, from_env.output
    assert from_env.stdout == "from env\n"


# --------------------------------------------------------------------------- limits


def assert_busy(response: httpx.Response, *, subject: str = "this key") -> None:
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error.get("code", error["type"]) == "rate_limited"  # OpenAI's shape on /v1
    assert "open at once" in error["message"] and subject in error["message"]


def test_concurrent_streams_per_key(start_relay, sim_server: SimServer) -> None:
    one, other = new_key(), new_key()
    relay = start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_API_KEYS=f"{one},{other}",
                        TOKENRELAY_MAX_CONCURRENT_STREAMS_PER_KEY="1")
    with open_stream(relay, one):
        assert_busy(post(relay, one))
        assert_busy(post(relay, one, path="/v1/chat/completions"))
        assert post(relay, other).status_code == 200  # each key has its own limit
        with open_stream(relay, other):
            assert_busy(post(relay, other))
    # The client hung up midway: its slot is free again once the relay has noticed.
    wait_until(lambda: post(relay, one).status_code == 200, timeout=10)
    # A stream that completes, and one that fails midway, give their slot back too.
    assert post(relay, one).text == "hello"
    failed = post(relay, one, model="sim:fault=error-mid,ttft=0,tps=0,tokens=10", accept="text/event-stream")
    assert failed.status_code == 200 and "event: error" in failed.text
    refused = post(relay, one, model="sim:fault=http-500")
    assert refused.status_code == 502
    assert post(relay, one).status_code == 200


def test_a_stream_waiting_for_its_resume_keeps_its_slot_until_stopped(start_relay, sim_server: SimServer) -> None:
    """Hanging up does not end a resumable answer, so it still counts against its key;
    stopping it gives the slot back — or hanging up and coming back would open any number."""
    one = new_key()
    relay = start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_API_KEYS=one,
                        TOKENRELAY_MAX_CONCURRENT_STREAMS_PER_KEY="1")
    with open_stream(relay, one, grace="30") as response:
        stream_id = response.headers["x-stream-id"]
    assert_busy(post(relay, one))
    stopped = httpx.delete(f"{relay.url}/api/streams/{stream_id}", headers=bearer(one))
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    wait_until(lambda: post(relay, one).status_code == 200, timeout=10)


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis"])
def test_one_request_after_another_is_never_refused(start_relay, sim_server: SimServer, redis_url: str,
                                                    shared: bool) -> None:
    """The slot is given back a moment after the client has read the last byte; a client
    that asks again at once waits for it instead of being refused by its own last request."""
    key = new_key()
    relay = start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_API_KEYS=key,
                        TOKENRELAY_MAX_CONCURRENT_STREAMS_PER_KEY="1",
                        **({"TOKENRELAY_REDIS_URL": redis_url} if shared else {}))
    with httpx.Client(timeout=30, headers=bearer(key)) as client:  # one kept-alive connection
        statuses = [
            client.post(relay.url + path, json=chat("hi", model="sim:ttft=0,tps=0,tokens=3"),
                        headers={"accept": "text/event-stream"}).status_code
            for _ in range(15) for path in ("/api/get-response", "/v1/chat/completions")
        ]
    assert statuses == [200] * 30


def test_concurrency_counts_one_shot_and_sse_requests(start_relay, sim_server: SimServer) -> None:
    key = new_key()
    relay = start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_API_KEYS=key,
                        TOKENRELAY_MAX_CONCURRENT_STREAMS_PER_KEY="2")
    with open_stream(relay, key), open_stream(relay, key):
        assert_busy(post(relay, key))
    wait_until(lambda: post(relay, key).status_code == 200, timeout=10)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", relay.url + "/api/get-response", json=chat("hi", model=SLOW),
                           headers={**bearer(key), "accept": "text/event-stream"}) as sse:
            pieces = sse.iter_raw()
            next(pieces)
            with open_stream(relay, key):
                assert_busy(post(relay, key))
    wait_until(lambda: post(relay, key).status_code == 200, timeout=10)


def test_without_keys_limits_count_per_client_address(start_relay, sim_server: SimServer) -> None:
    relay = start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_MAX_CONCURRENT_STREAMS_PER_KEY="1")
    assert httpx.get(relay.url + "/api/info", timeout=10).json()["auth_required"] is False
    with open_stream(relay, None):
        assert_busy(post(relay), subject="this client address")
    wait_until(lambda: post(relay).status_code == 200, timeout=10)


def assert_over_rate(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 60
    error = response.json()["error"]
    assert error["type"] == "rate_limited" and "per minute" in error["message"]


def test_requests_per_minute_per_key(start_relay, sim_server: SimServer) -> None:
    one, other = new_key(), new_key()
    relay = start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_API_KEYS=f"{one},{other}",
                        TOKENRELAY_REQUESTS_PER_MINUTE_PER_KEY="3")
    assert [post(relay, one).status_code for _ in range(3)] == [200, 200, 200]
    assert_over_rate(post(relay, one))
    v1 = httpx.get(relay.url + "/v1/models", headers=bearer(one), timeout=10)
    assert v1.status_code == 429 and v1.json()["error"]["type"] == "rate_limit_error"
    assert post(relay, other).status_code == 200
    assert post(relay, None).status_code == 401  # no key: refused before any limit


# --------------------------------------------------------------------------- shared in Redis


def test_limits_are_shared_through_redis(start_relay, sim_server: SimServer, redis_url: str,
                                         tmp_path: Path) -> None:
    key, name = new_key(), "shared-" + secrets.token_hex(4)
    path = tmp_path / "keys"
    path.write_text(f"{key} {name}\n")
    env = {
        "TOKENRELAY_API_KEYS_FILE": str(path),
        "TOKENRELAY_REDIS_URL": redis_url,
        "TOKENRELAY_MAX_CONCURRENT_STREAMS_PER_KEY": "1",
        "TOKENRELAY_REQUESTS_PER_MINUTE_PER_KEY": "6",
    }
    first = start_relay(upstream=sim_upstream(sim_server), **env)
    second = start_relay(upstream=sim_upstream(sim_server), **env)
    slots = "tokenrelay:slots:" + name
    with redis.Redis.from_url(redis_url) as client:
        with open_stream(first, key):
            assert client.zcard(slots) == 1
            assert_busy(post(second, key))  # the other process sees the open stream
            assert_busy(post(first, key))
        # the client left: the slot is given back, in Redis, for both processes
        wait_until(lambda: client.zcard(slots) == 0, timeout=10)
        assert post(second, key).status_code == 200  # requests so far: 4
        assert post(first, key).status_code == 200  # 5
        assert post(second, key).status_code == 200  # 6
        assert_over_rate(post(first, key))
        assert_over_rate(post(second, key))
        assert client.zcard(slots) == 0
        assert key not in " ".join(k.decode() for k in client.keys("*"))
    for relay in (first, second):
        assert key not in relay.log()
        assert "in Redis, shared" in relay.log()


def test_redis_down_lets_requests_through(start_relay, sim_server: SimServer) -> None:
    """Limits that cannot be checked do not take the API down; the log says so."""
    from servers import free_port

    key = new_key()
    relay = start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_API_KEYS=key,
                        TOKENRELAY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                        TOKENRELAY_MAX_CONCURRENT_STREAMS_PER_KEY="1", TOKENRELAY_REQUESTS_PER_MINUTE_PER_KEY="1")
    assert post(relay, key).status_code == 200
    assert post(relay, key).status_code == 200
    assert post(relay).status_code == 401  # keys are still checked
    wait_until(lambda: "limits not enforced: Redis failed" in relay.log())


# --------------------------------------------------------------------------- CORS


ALLOWED = "https://app.example.test"


def preflight(relay: RelayServer, origin: str) -> httpx.Response:
    return httpx.options(relay.url + "/api/get-response", timeout=10, headers={
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    })


def test_cors_allows_listed_origins_only(start_relay, sim_server: SimServer) -> None:
    key = new_key()
    relay = start_relay(upstream=sim_upstream(sim_server), TOKENRELAY_API_KEYS=key,
                        TOKENRELAY_CORS_ORIGINS=f"{ALLOWED}, http://localhost:5173")
    allowed = preflight(relay, ALLOWED)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "POST" in allowed.headers["access-control-allow-methods"]
    denied = preflight(relay, "https://evil.example.test")
    assert denied.status_code == 400
    assert "access-control-allow-origin" not in denied.headers

    answer = post(relay, key, origin=ALLOWED)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-stream-id", "retry-after"} <= exposed
    # a refusal is readable by the allowed page too, so it can ask for a key
    refused = post(relay, None, origin=ALLOWED)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ALLOWED
    assert "access-control-allow-origin" not in post(relay, key, origin="https://evil.example.test").headers


def test_cors_is_off_by_default(relay_server: RelayServer) -> None:
    response = preflight(relay_server, ALLOWED)
    assert "access-control-allow-origin" not in response.headers
    # A page on another origin is refused outright, not only kept from reading the answer:
    # a browser would send it anyway (docs/security.md).
    answer = post(relay_server, None, origin=ALLOWED)
    assert answer.status_code == 403
    assert answer.json()["error"]["type"] == "forbidden"
    assert "access-control-allow-origin" not in answer.headers


def test_doctor_sends_the_key(keyed: RelayServer, keys: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENRELAY_API_KEY", raising=False)
    fast = ["--ticks", "4", "--interval", "0.1"]
    runner = CliRunner()
    refused = runner.invoke(cli, ["doctor", keyed.url, *fast], catch_exceptions=False)
    assert refused.exit_code == 1
    assert "answered 401" in refused.stdout and "--key" in refused.stdout
    given = runner.invoke(cli, ["doctor", keyed.url, *fast, "--key", keys[0]], catch_exceptions=False)
    assert given.exit_code == 0, given.output
    assert "Result: OK" in given.stdout


def test_a_mount_prefix_does_not_bypass_the_key_check() -> None:
    """Behind a prefix (ASGI ``root_path``), the check sees the path the router matches."""
    import asyncio

    from tokenrelay.app import create_app
    from tokenrelay.config import Settings

    app = create_app(Settings(api_keys="tr-prefix-test-key"))

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, root_path="/chat")
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.post("/chat/api/get-response", json=chat("hi"))

    response = asyncio.run(ask())
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"
