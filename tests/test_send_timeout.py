"""A client that keeps its connection open but stops reading is dropped after
``TOKENRELAY_SEND_TIMEOUT`` seconds: its stream, its upstream request and its slot are freed,
and the request's log line and metrics say ``client_stalled``."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import orjson
import pytest

from servers import RelayServer, SimServer, wait_until
from streams import chat


# The simulator echoes the question word by word: first one 3 MB word — more than the kernel
# and the server buffer for a client that reads nothing — then 10,000 short ones at 100 a
# second, so the upstream is still writing when the client is dropped.
QUESTION = "x" * 3_000_000 + " y" * 10_000
ECHO = "sim:echo,ttft=0,tps=100"


@pytest.fixture(scope="module")
def relay(start_relay: Callable[..., RelayServer], sim_server: SimServer) -> RelayServer:
    return start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_SEND_TIMEOUT="1",
                       TOKENRELAY_MAX_BODY_BYTES="4000000")


@pytest.mark.parametrize(("path", "accept", "body"), [
    ("/api/get-response", "text/plain", chat(QUESTION, model=ECHO)),
    ("/api/get-response", "text/event-stream", chat(QUESTION, model=ECHO)),
    ("/v1/chat/completions", "text/event-stream", chat(QUESTION, model=ECHO, stream=True)),
])
def test_a_client_that_stops_reading_is_dropped(relay: RelayServer, sim_server: SimServer,
                                                path: str, accept: str, body: dict) -> None:
    sim_server.wait_idle()
    before = sim_server.stats()
    stalled_before = relay.log().count("outcome=client_stalled")
    mode = "text" if accept == "text/plain" else "sse"
    counted_before = _stalled(relay, mode)
    payload = orjson.dumps(body)
    sock = socket.socket()
    # A small receive window, never read: the relay's writes back up within a few hundred KB.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.port))
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Accept: {accept}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        wait_until(lambda: relay.log().count("outcome=client_stalled") == stalled_before + 1, timeout=10)
        # The upstream request was closed, not left to run for nobody.
        wait_until(lambda: sim_server.stats()["cancelled_streams"] > before["cancelled_streams"], timeout=5)
        assert sim_server.stats()["completed_streams"] == before["completed_streams"]
    finally:
        sock.close()
    assert _stalled(relay, mode) == counted_before + 1


def _stalled(relay: RelayServer, mode: str) -> float:
    prefix = f'tokenrelay_streams_total{{mode="{mode}",outcome="client_stalled"}} '
    lines = [line for line in httpx.get(relay.url + "/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0
