"""A real ``redis-server`` on a free loopback port, with persistence off, for the tests.

The ``redis_url`` session fixture (``conftest.py``) starts one per run; tests that need a
clean database call ``flush(url)`` or use their own key prefix."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis
from servers import free_port, stop_process, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, *, log_dir: Path, persist: bool = False) -> None:
        """``persist``: an append-only file written at every command, so the server can be
        stopped and started again (``stop_server``, ``start_server``) with its data."""
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError("redis-server is not installed (scripts/test.sh installs Debian's redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_dir / f"redis-{self.port}.log"
        self._dir = tempfile.TemporaryDirectory(prefix="tokenrelay-redis-")
        self._persist = persist
        self.start_server()

    def start_server(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self._persist else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                *persistence,
                "--dir", self._dir.name,
                "--logfile", str(self.log_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._ready, timeout=10)
        except AssertionError:
            self.stop()
            raise AssertionError(f"redis-server did not start:\n{self.log()}") from None

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop_server(self) -> None:
        """Stop the server, keeping its data directory (see ``persist``)."""
        stop_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc)
        self._dir.cleanup()


def flush(url: str) -> None:
    """Empty the database behind ``url``."""
    with redis.Redis.from_url(url) as client:
        client.flushdb()
