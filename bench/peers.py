"""The gateways users would pick instead, installed and started only with ``--peers``.

Each lives in its own environment under ``bench/.peers/`` (ignored by git), installed on the
first ``--peers`` run: LiteLLM's proxy in a Python venv, Portkey's gateway as the
``@portkey-ai/gateway`` package under node. Both are pointed at the same simulator as
everything else; the simulator's options ride in the model name through both.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .loadgen import OPENAI, Target
from .procs import Server, free_port

PEERS_DIR = Path(__file__).resolve().parent / ".peers"
LITELLM_VENV = PEERS_DIR / "litellm-venv"
PORTKEY_DIR = PEERS_DIR / "portkey"
NAMES = ("portkey", "litellm-workers", "litellm")  # W2 measures them in this order; LiteLLM overruns its windows
HOW = {
    "litellm": "LiteLLM's proxy with --num_workers 1, the default of its CLI, as a first user starts it",
    "litellm-workers": "LiteLLM's proxy as its production guide recommends for throughput: --num_workers = the "
                       "machine's cores ({cores}), set_verbose off, LITELLM_LOG=ERROR, no database",
    "portkey": "Portkey's gateway under node, one process (it has no worker option), @hono/node-server pinned",
}
"""How each peer was started, for the results: a peer's figures mean little without it."""
LITELLM_SPEC = "litellm[proxy]"
# The gateway's own dependency range lets npm pick the newest @hono/node-server, with which
# every streamed answer fails ("TypeError: immutable", Portkey-AI/gateway#1389): the gateway
# appends headers to a Response whose headers are immutable. It streams with 1.13.8; 1.14.2
# and 1.19.19 both fail.
PORTKEY_MANIFEST = {
    "name": "bench-portkey",
    "private": True,
    "dependencies": {"@portkey-ai/gateway": "^1.15.2"},
    "overrides": {"@hono/node-server": "1.13.8"},
}


def _run(args: list[str], *, cwd: Path | None = None, log: Callable[[str], None]) -> None:
    log("  $ " + " ".join(args))
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800)


def install_litellm(log: Callable[[str], None]) -> Path:
    python = LITELLM_VENV / "bin" / "python"
    litellm = LITELLM_VENV / "bin" / "litellm"
    if not litellm.exists():
        PEERS_DIR.mkdir(exist_ok=True)
        log("installing LiteLLM's proxy into bench/.peers/litellm-venv (once) …")
        _run([sys.executable, "-m", "venv", str(LITELLM_VENV)], log=log)
        _run([str(python), "-m", "pip", "install", "-q", LITELLM_SPEC], log=log)
    return litellm


def install_portkey(log: Callable[[str], None]) -> Path:
    entry = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    manifest = PORTKEY_DIR / "package.json"
    wanted = json.dumps(PORTKEY_MANIFEST, indent=2) + "\n"
    # An install made from another manifest (an older bench's) is redone, so the pin applies.
    if not entry.exists() or not manifest.exists() or manifest.read_text() != wanted:
        if shutil.which("npm") is None:
            raise RuntimeError("npm is not installed")
        PORTKEY_DIR.mkdir(parents=True, exist_ok=True)
        log("installing Portkey's gateway into bench/.peers/portkey …")
        manifest.write_text(wanted)
        _run(["npm", "install", "--no-audit", "--no-fund"], cwd=PORTKEY_DIR, log=log)
    if not entry.exists():
        found = list((PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway").rglob("start-server.js"))
        if not found:
            raise RuntimeError("the gateway package has no start-server.js")
        entry = found[0]
    return entry


def start_litellm(log_dir: Path, *, upstream: str, log: Callable[[str], None], workers: int = 1,
                  name: str = "litellm") -> tuple[Server, Target]:
    litellm = install_litellm(log)
    port = free_port()
    config = log_dir / f"{name}.yaml"
    # One wildcard route: "openai/<anything>" goes to the simulator with <anything> as the
    # model, so the simulator's options pass through in the model name.
    config.write_text(
        "model_list:\n"
        "  - model_name: \"openai/*\"\n"
        "    litellm_params:\n"
        "      model: \"openai/*\"\n"
        f"      api_base: \"{upstream}\"\n"
        "      api_key: \"sk-bench\"\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  set_verbose: false\n"
        "general_settings: {}\n"
    )
    key = "sk-" + secrets.token_hex(32)  # the proxy refuses to start without a strong master key
    env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True",
           "NO_DOCS": "True", "NO_REDOC": "True", "LITELLM_MASTER_KEY": key}
    server = Server(name, [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                           "--num_workers", str(workers)],
                    port=port, log_dir=log_dir, ready_path="/health/liveliness", env=env, start_timeout=180)
    return server, Target(name, server.url, OPENAI, headers=(("authorization", f"Bearer {key}"),),
                          model_prefix="openai/", option_sep=";")


def start_litellm_workers(log_dir: Path, *, upstream: str, log: Callable[[str], None]) -> tuple[Server, Target]:
    return start_litellm(log_dir, upstream=upstream, log=log, workers=os.cpu_count() or 2, name="litellm-workers")


def start_portkey(log_dir: Path, *, upstream: str, log: Callable[[str], None]) -> tuple[Server, Target]:
    entry = install_portkey(log)
    port = free_port()
    server = Server("portkey", ["node", str(entry), f"--port={port}", "--headless"], port=port, log_dir=log_dir,
                    ready_path="/", cwd=PORTKEY_DIR, env={"NODE_ENV": "production"}, start_timeout=60)
    headers = (("x-portkey-provider", "openai"), ("x-portkey-custom-host", upstream),
               ("authorization", "Bearer sk-bench"))
    return server, Target("portkey", server.url, OPENAI, headers=headers)


def start_all(log_dir: Path, *, upstream: str, log: Callable[[str], None],
              notes: list[str]) -> list[tuple[Server, Target]]:
    started = []
    for name, start in (("litellm", start_litellm), ("litellm-workers", start_litellm_workers),
                        ("portkey", start_portkey)):
        try:
            server, target = start(log_dir, upstream=upstream, log=log)
            server.wait_ready()
            started.append((server, target))
            notes.append(f"{name}: " + HOW[name].format(cores=os.cpu_count()))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            notes.append(f"peer {name} not measured: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            log(f"  {name}: not measured ({exc})")
    return started


def versions() -> dict[str, str]:
    out = {}
    python = LITELLM_VENV / "bin" / "python"
    if python.exists():
        try:
            out["litellm"] = subprocess.run(
                [str(python), "-c", "from importlib.metadata import version; print(version('litellm'))"],
                capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    for package, label in (("@portkey-ai/gateway", "portkey-gateway"), ("@hono/node-server", "@hono/node-server")):
        manifest = PORTKEY_DIR / "node_modules" / package / "package.json"
        if manifest.exists():
            out[label] = json.loads(manifest.read_text()).get("version", "?")
    if shutil.which("node"):
        out["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return {k: v for k, v in out.items() if v}

