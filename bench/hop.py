"""CPU of the upstream hop alone, per transport: one client process → the standalone
simulator, as docs/performance.md §2 measures it.

    python -m bench.hop                      # fast, aiohttp, and auto with a proxy set that does not apply
    python -m bench.hop --before d582c42     # also the fast path as of an older commit

For each client, in its own process (uvloop): ``--requests`` sequential requests answered
with one token, then ``--streams`` sequential 1,000-token streams, each read to its end,
drained and closed as the providers do. The figure is the client process's CPU time
(user + system) per request and per stream, best of ``--rounds``; the clients take turns
in each round, so a busy machine weighs on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

CLIENT = r'''
import asyncio, json, os, sys, time
import uvloop
from yarl import URL
from tokenrelay.providers.http import UpstreamClient

url, kind, requests, streams = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
HEADERS = {"content-type": "application/json", "accept": "text/event-stream", "accept-encoding": "identity"}

def body(tokens):
    return json.dumps({"model": f"sim:ttft=0,tps=0,tokens={tokens}", "stream": True,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()

async def one(client, target, payload):
    response = await client.post_stream(target, payload, HEADERS)
    try:
        async for _ in response:
            pass
        await response.drain(0.5)
    finally:
        response.close()

async def main():
    options = dict(pool_size=16, connect_timeout=5, read_timeout=30, spare_connection=False)
    if kind != "old":
        options["client"] = "auto" if kind == "auto" else kind
    client = UpstreamClient(**options)
    target = URL(url)
    short, long = body(1), body(1000)
    for _ in range(50):  # warm: connections, caches
        await one(client, target, short)
    started = time.process_time()
    for _ in range(requests):
        await one(client, target, short)
    per_request = (time.process_time() - started) / requests
    started = time.process_time()
    for _ in range(streams):
        await one(client, target, long)
    per_stream = (time.process_time() - started) / streams
    await client.aclose()
    print(json.dumps({"request_us": per_request * 1e6, "stream_ms": per_stream * 1e3}))

uvloop.run(main())
'''


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def old_source(ref: str, into: Path) -> Path:
    """``src/`` as of ``ref``, unpacked into ``into``."""
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=ROOT, check=True, capture_output=True).stdout
    path = into / "archive.tar"
    path.write_bytes(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--streams", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", metavar="GITREF", help="also the fast path as of this commit")
    args = parser.parse_args()

    port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "tokenrelay", "sim", "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/sim/stats", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("the simulator did not start") from None
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with tempfile.TemporaryDirectory() as tmp:
            clients: list[tuple[str, str, dict[str, str]]] = []
            if args.before:
                old = old_source(args.before, Path(tmp))
                clients.append((f"fast @{args.before}", "old", {"PYTHONPATH": str(old)}))
            clients += [("fast", "fast", {}), ("aiohttp", "aiohttp", {}),
                        # a proxy is set, NO_PROXY exempts the simulator: the choice costs what?
                        ("auto, proxy set but not for this host", "auto",
                         {"HTTP_PROXY": "http://proxy.invalid:3128", "NO_PROXY": "127.0.0.1"})]
            best: dict[str, dict[str, float]] = {}
            for _ in range(args.rounds):
                for label, kind, extra in clients:
                    env = {**os.environ, **extra}
                    out = subprocess.run([sys.executable, "-c", CLIENT, url, kind, str(args.requests), str(args.streams)],
                                         env=env, check=True, capture_output=True, text=True).stdout
                    got = json.loads(out)
                    mine = best.setdefault(label, got)
                    for key, value in got.items():
                        mine[key] = min(mine[key], value)
        print("| client | CPU per request, 1-token answer | CPU per 1,000-token stream |")
        print("|---|---|---|")
        for label, figures in best.items():
            print(f"| {label} | {figures['request_us']:.0f} µs | {figures['stream_ms']:.1f} ms |")
    finally:
        sim.terminate()
        sim.wait(10)


if __name__ == "__main__":
    main()
