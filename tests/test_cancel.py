"""A client that goes away stops the model: the relay closes its upstream request within a
second — midway, while still waiting for the first token, and in the one-shot mode — when
the answer has no grace to be resumed in (``X-Resume-Grace: 0``, or a one-shot answer); with
grace, only once nobody has read it for that long (docs/resume.md). The standalone simulator
counts its open and client-cancelled streams, which is what we check."""

from __future__ import annotations

import socket
import time

import orjson
import pytest

from servers import RelayServer, SimServer, wait_until
from streams import chat


def open_request(relay: RelayServer, body: dict, *, accept: str = "text/plain",
                 grace: float | None = 0) -> socket.socket:
    """A request on a raw socket; ``grace`` is sent as ``X-Resume-Grace`` (None: the default)."""
    payload = orjson.dumps(body)
    sock = socket.create_connection(("127.0.0.1", relay.port))
    extra = f"X-Resume-Grace: {grace:g}\r\n" if grace is not None else ""
    sock.sendall(
        b"POST /api/get-response HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Accept: {accept}\r\n{extra}Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def leave_and_time_upstream_close(sock: socket.socket, sim: SimServer, cancelled_before: int) -> float:
    """Close the client's connection; seconds until the simulator saw its stream cancelled."""
    sock.close()
    left = time.monotonic()
    wait_until(lambda: sim.stats()["cancelled_streams"] > cancelled_before, timeout=5, interval=0.01)
    return time.monotonic() - left


@pytest.mark.parametrize(
    ("case", "body", "accept", "read_first"),
    [
        ("midway, text", chat(model="sim:ttft=0,tps=10,tokens=200"), "text/plain", True),
        ("midway, sse", chat(model="sim:ttft=0,tps=10,tokens=200"), "text/event-stream", True),
        ("before the first token, text", chat(model="sim:ttft=60"), "text/plain", False),
        ("before the first token, sse", chat(model="sim:ttft=60"), "text/event-stream", False),
        ("one-shot", chat(model="sim:ttft=0,tps=10,tokens=200", stream=False), "application/json", False),
    ],
)
def test_client_leaving_closes_the_upstream(relay_server: RelayServer, sim_server: SimServer, case: str,
                                            body: dict, accept: str, read_first: bool) -> None:
    sim_server.wait_idle()
    before = sim_server.stats()
    logged_before = relay_server.log().count("outcome=client_cancelled")
    sock = open_request(relay_server, body, accept=accept)
    wait_until(lambda: sim_server.stats()["open_streams"] == 1)
    if read_first:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    seconds = leave_and_time_upstream_close(sock, sim_server, before["cancelled_streams"])
    assert seconds < 1.0, f"{case}: the upstream stayed open {seconds:.2f} s after the client left"
    after = sim_server.wait_idle()
    assert after["completed_streams"] == before["completed_streams"]
    # the relay's request log says why the stream ended
    wait_until(lambda: relay_server.log().count("outcome=client_cancelled") == logged_before + 1)
