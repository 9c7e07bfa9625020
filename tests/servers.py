"""Start real tokenrelay processes on free loopback ports, and wait for them to be ready."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Ask a process to stop (SIGTERM); kill it if it has not within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Process:
    """A tokenrelay command running in the background, with its log kept in a file."""

    def __init__(self, args: list[str], *, port: int, ready_path: str, env: dict[str, str] | None = None,
                 log_dir: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{args[0]}-{port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay", *args], env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            wait_until(lambda: self._ready(ready_path), timeout=20)
        except AssertionError:
            self.stop()
            raise AssertionError(f"{args} did not start:\n{self.log()}") from None

    def _ready(self, path: str) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"process exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(self.url + path, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class SimServer(Process):
    def __init__(self, *, log_dir: Path, args: list[str] | None = None) -> None:
        port = free_port()
        super().__init__(["sim", "--port", str(port), *(args or [])], port=port, ready_path="/sim/stats",
                         log_dir=log_dir)

    def stats(self) -> dict[str, int]:
        return dict(httpx.get(self.url + "/sim/stats", timeout=5).json())

    def wait_idle(self, timeout: float = 2.0) -> dict[str, int]:
        """Wait until no stream is open; the stats then."""
        return dict(wait_until(lambda: (s := self.stats())["open_streams"] == 0 and s, timeout=timeout))


class RelayServer(Process):
    def __init__(self, *, log_dir: Path, upstream: str | None, env: dict[str, str] | None = None) -> None:
        port = free_port()
        # Each relay keeps its jobs in a directory of its own, unless a test shares one.
        full_env = {"TOKENRELAY_MODEL": "sim", "TOKENRELAY_DATA_DIR": tempfile.mkdtemp(prefix="tokenrelay-data-")}
        if upstream:
            full_env["TOKENRELAY_UPSTREAM_URL"] = upstream
        full_env.update(env or {})
        super().__init__(["serve", "--port", str(port)], port=port, ready_path="/healthz", env=full_env,
                         log_dir=log_dir)


ANTHROPIC_KEY = "sk-ant-test"


def start_anthropic_relay(start_relay: Callable[..., RelayServer], upstream: SimServer) -> RelayServer:
    """A relay whose default model, ``claude-sim``, goes to ``upstream`` (the simulator
    speaks Anthropic's Messages API too) on an Anthropic route with an API key."""
    routes = [{"name": "anthropic", "pattern": "claude-*", "kind": "anthropic", "url": upstream.url + "/v1",
               "key_env": "TEST_ANTHROPIC_KEY", "models": ["claude-sim"]}]
    return start_relay(upstream=None, TOKENRELAY_ROUTES=json.dumps(routes), TEST_ANTHROPIC_KEY=ANTHROPIC_KEY,
                       TOKENRELAY_MODEL="claude-sim")
