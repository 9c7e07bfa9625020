"""The processes under test: started on free loopback ports, watched, stopped.

Each server's CPU time and memory are read from ``/proc`` through psutil, summed over its
process tree (``tokenrelay serve --workers N`` runs N children under one parent).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process with its output in a log file; ready when ``ready_path`` answers 200."""

    def __init__(self, name: str, args: list[str], *, port: int, log_dir: Path, ready_path: str = "/healthz",
                 env: dict[str, str] | None = None, cwd: Path | None = None, start_timeout: float = 60.0) -> None:
        self.name = name
        self.args = args
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
        full_env.update(env or {})
        self.env = env or {}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=cwd or ROOT, start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)
        self.start_timeout = start_timeout

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as resp:
                    if resp.status < 500:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            except urllib.error.HTTPError as exc:  # pragma: no cover - URLError subclass, kept explicit
                if exc.code < 500:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer {self.ready_path} in {self.start_timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def command(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items()
                       if not k.startswith("PYTHON") and not k.endswith("_KEY"))
        args = " ".join(a if " " not in a else repr(a) for a in self.args)
        # Paths relative to the checkout, so a results file reads the same on any machine.
        return f"{env} {args}".strip().replace(sys.executable, "python").replace(str(ROOT) + "/", "")

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole process tree."""
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss(self) -> int:
        """Resident memory of the whole process tree, in bytes."""
        total = 0
        for p in self._tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def pids(self) -> list[int]:
        return [p.pid for p in self._tree()]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def python_env(src: Path | None = None) -> dict[str, str]:
    """Children import tokenrelay (from ``src``, default this checkout's) and the bench first."""
    paths = [str(src or ROOT / "src"), str(ROOT)]
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(paths + ([old] if old else []))}


def start_sim(log_dir: Path, *, name: str = "sim", chat_only: bool = False) -> Server:
    port = free_port()
    args = [sys.executable, "-m", "tokenrelay", "sim", "--port", str(port), *(["--chat-only"] if chat_only else [])]
    return Server(name, args, port=port, log_dir=log_dir, ready_path="/sim/stats", env=python_env())


def start_tokenrelay(log_dir: Path, upstream: str, *, workers: int = 1, name: str = "tokenrelay",
                     extra_env: dict[str, str] | None = None, src: Path | None = None) -> Server:
    port = free_port()
    args = [sys.executable, "-m", "tokenrelay", "serve", "--port", str(port)]
    if workers > 1:
        args += ["--workers", str(workers)]
    env = {**python_env(src), "TOKENRELAY_UPSTREAM_URL": upstream, "TOKENRELAY_MODEL": "sim",
           # room for W3's thousands of concurrent upstream streams
           "TOKENRELAY_POOL_SIZE": "20000", **(extra_env or {})}
    return Server(name, args, port=port, log_dir=log_dir, env=env)


def start_floor(log_dir: Path) -> Server:
    port = free_port()
    return Server("floor", [sys.executable, "-m", "bench.floor_app", "--port", str(port)], port=port, log_dir=log_dir,
                  env=python_env())


def start_floor_relay(log_dir: Path, upstream_root: str, *, name: str = "floor-relay") -> Server:
    port = free_port()
    return Server(name, [sys.executable, "-m", "bench.floor_relay", "--port", str(port), "--upstream", upstream_root],
                  port=port, log_dir=log_dir, env=python_env())


def start_baseline(log_dir: Path, upstream: str) -> Server:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "bench.baseline_relay:app", "--port", str(port),
            "--host", "127.0.0.1", "--log-level", "warning"]
    return Server("baseline", args, port=port, log_dir=log_dir,
                  env={**python_env(), "BASELINE_UPSTREAM": upstream})


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def wait_until(condition: Callable[[], object], *, timeout: float, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def export_source(ref: str, dest: Path) -> Path:
    """tokenrelay's ``src/`` as of git ``ref``, unpacked into ``dest``: the "before" of a
    before/after comparison run side by side with this checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"
