"""A real ``redis-server`` for W6, on a free loopback port with persistence off, and what W6
reads off it: how many commands it has run and how many clients are connected."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

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
