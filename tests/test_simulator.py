from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from tokenrelay.errors import UpstreamError, UpstreamRateLimited, ValidationFailed
from tokenrelay.sim.provider import SimOptions, Simulator
from tokenrelay.schemas import ChatRequest

from servers import SimServer


def run(model: str, content: str = "hello", **request: object) -> str:
    chat = ChatRequest(messages=[{"role": "user", "content": content}], **request)

    async def collect() -> str:
        deltas = await Simulator(SimOptions(ttft=0, tps=0)).open(chat, model=model)
        return "".join([d.text async for d in deltas])

    return asyncio.run(collect())


def test_same_seed_same_answer_other_seed_other_answer() -> None:
    assert run("sim:seed=3") == run("sim:seed=3")
    assert run("sim:seed=3") != run("sim:seed=4")


def test_echo_repeats_the_last_user_message() -> None:
    assert run("sim:echo", "<b>bold</b> ✓") == "<b>bold</b> ✓"


def test_max_tokens_caps_the_answer() -> None:
    assert len(run("sim:tokens=50", max_tokens=5).split()) <= 5


def test_options_are_checked() -> None:
    with pytest.raises(ValidationFailed, match="tpz"):
        SimOptions().with_model("sim:tpz=3")
    with pytest.raises(ValidationFailed, match="fault=nope"):
        SimOptions().with_model("sim:fault=nope")
    assert SimOptions().with_model("sim:echo,ttft=1.5,tokens=3").ttft == 1.5


def test_faults() -> None:
    with pytest.raises(UpstreamRateLimited):
        run("sim:fault=http-429")
    with pytest.raises(UpstreamError, match="mid-stream"):
        run("sim:fault=error-mid")


def test_the_simulator_keeps_idle_connections_longer_than_its_clients(tmp_path: Path) -> None:
    """A server that closes an idle connection before its client drops it can close one under a
    request that is just arriving: a POST then fails without an answer (a 502 behind nginx).
    The simulator keeps one longer than tokenrelay's pool and nginx's upstream keepalive do,
    and ``--keepalive-timeout`` sets how long (here 1 s, seen closing)."""
    from tokenrelay.cli import sim
    from tokenrelay.providers.http11 import IDLE_KEEP

    [option] = [p for p in sim.params if p.name == "keepalive_timeout"]
    assert option.default > max(IDLE_KEEP, 60)  # 60 s: nginx's upstream keepalive_timeout

    server = SimServer(log_dir=tmp_path, args=["--keepalive-timeout", "1"])
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(b"GET /sim/stats HTTP/1.1\r\nHost: sim\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                piece = conn.recv(65536)
                assert piece, f"the simulator closed the connection before answering: {head!r}"
                head += piece
            answered = time.monotonic()
            while conn.recv(65536):  # the rest of the body, then the end the server gives
                pass
            closed_after = time.monotonic() - answered
    finally:
        server.stop()
    assert head.startswith(b"HTTP/1.1 200")
    assert 0.5 < closed_after < 5  # 5 s: uvicorn's own default, which the option replaces
