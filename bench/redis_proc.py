"""A real ``redis-server`` for W6, on a free loopback port with persistence off, and what W6
reads off it: how many commands it has run, how many of them its clients sent (the rest ran
inside scripts), and how many clients are connected."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from .procs import free_port


def available() -> bool:
    return shutil.which("redis-server") is not None


class RedisProcess:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self.log_path = log_dir / "redis.log"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.client = redis.Redis.from_url(self.url, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start (log: {self.log_path})") from None
                time.sleep(0.05)

    def commands(self) -> int:
        """Commands run so far, every kind (INFO commandstats), less the ones this reading costs."""
        stats = self.client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_ping"))

    @contextmanager
    def monitor(self) -> Iterator[Calls]:
        """Redis's MONITOR for the block: every command it runs, counted by who sent it — a
        client (one call over the network) or a script running inside Redis. MONITOR slows
        Redis down, so W6 counts this way only in windows of its own, never while it measures
        CPU. The count ends at a marker sent after the block, so nothing run before it is missed."""
        calls = Calls()
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        try:
            sock.sendall(b"MONITOR\r\n")
            lines = sock.makefile("rb")
            if lines.readline().strip() != b"+OK":
                raise RuntimeError("redis-server refused MONITOR")
            marker = "bench-monitor-end-" + secrets.token_hex(4)
            reader = threading.Thread(target=calls.read, args=(lines, marker.encode()), daemon=True)
            reader.start()
            yield calls
            self.client.echo(marker)
            reader.join(30)
            if reader.is_alive():
                raise RuntimeError("redis-server's MONITOR did not show the end marker within 30 s")
        finally:
            sock.close()

    def clients(self) -> int:
        """Connected clients, less this reader's own connection."""
        return int(self.client.info("clients")["connected_clients"]) - 1

    def version(self) -> str:
        return str(self.client.info("server").get("redis_version", "?"))

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._dir.cleanup()


class Calls:
    """What ``RedisProcess.monitor`` saw: commands clients sent, and commands scripts ran."""

    def __init__(self) -> None:
        self.sent = 0
        self.in_scripts = 0

    def read(self, lines: Any, marker: bytes) -> None:
        # A line: +<time> [<db> <client address, or "lua">] "<command>" "<arg>"...
        for line in lines:
            if marker in line:
                return
            who, _, command = line.partition(b"] ")
            if who.endswith(b" lua"):
                self.in_scripts += 1
            elif not command.lower().startswith((b'"info"', b'"echo"')):  # the bench's own
                self.sent += 1
