"""CPU of the upstream hop alone, per transport: one client process → the standalone
simulator, as docs/performance.md §2 measures it.

    python -m bench.hop                      # fast, aiohttp, and auto with a proxy set that does not apply
    python -m bench.hop --before d582c42     # also the fast path as of an older commit

All clients live in one process (uvloop) and take turns in short batches — a batch of
one-token requests or of 1,000-token streams each, read to the end, drained and closed as
the providers do — so a machine shared with other work slows them alike. The figure is the
process's CPU time (user + system) per request and per stream: the median over the batches,
with the spread between the quartiles. ``--before`` loads ``src/`` as of an older commit
under another package name beside the current one.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"content-type": "application/json", "accept": "text/event-stream", "accept-encoding": "identity"}


def body(tokens: int) -> bytes:
    return orjson.dumps({"model": f"sim:ttft=0,tps=0,tokens={tokens}", "stream": True,
                         "messages": [{"role": "user", "content": "hello"}]})


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_before(ref: str, into: Path) -> Any:
    """``tokenrelay.providers.http`` as of ``ref``, imported as ``tokenrelay_before``."""
    archive = subprocess.run(["git", "archive", ref, "src/tokenrelay"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    shutil.move(into / "src" / "tokenrelay", into / "tokenrelay_before")  # its imports are relative
    sys.path.insert(0, str(into))
    return importlib.import_module("tokenrelay_before.providers.http")


async def one(client: Any, url: URL, payload: bytes) -> None:
    response = await client.post_stream(url, payload, HEADERS)
    try:
        async for _ in response:
            pass
        await response.drain(0.5)
    finally:
        response.close()


async def measure(clients: dict[str, Callable[[], Any]], url: URL, *, batches: int, requests: int,
                  streams: int) -> dict[str, dict[str, list[float]]]:
    made = {label: make() for label, make in clients.items()}
    short, long = body(1), body(1000)
    for client in made.values():  # warm: connections, caches
        for _ in range(50):
            await one(client, url, short)
    per: dict[str, dict[str, list[float]]] = {label: {"request": [], "stream": []} for label in made}
    labels = list(made)
    for batch in range(batches):
        turn = batch % len(labels)
        for label in labels[turn:] + labels[:turn]:  # each batch in another order
            for kind, payload, count in (("request", short, requests), ("stream", long, streams)):
                started = time.process_time()
                for _ in range(count):
                    await one(made[label], url, payload)
                per[label][kind].append((time.process_time() - started) / count)
    for client in made.values():
        await client.aclose()
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--requests", type=int, default=200, help="one-token requests per batch")
    parser.add_argument("--streams", type=int, default=5, help="1,000-token streams per batch")
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
        from tokenrelay.providers.http import UpstreamClient

        options: dict[str, Any] = dict(pool_size=16, connect_timeout=5, read_timeout=30, spare_connection=False)
        clients: dict[str, Callable[[], Any]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            if args.before:
                before = load_before(args.before, Path(tmp))
                clients[f"fast @{args.before}"] = lambda: before.UpstreamClient(**options)
            clients["fast"] = lambda: UpstreamClient(**options, client="fast")
            clients["aiohttp"] = lambda: UpstreamClient(**options, client="aiohttp")

            def auto() -> Any:
                # A proxy in the environment that NO_PROXY exempts the simulator from: the
                # fast path behind the per-URL choice.
                os.environ.update(HTTP_PROXY="http://proxy.invalid:3128", NO_PROXY="127.0.0.1")
                try:
                    return UpstreamClient(**options, client="auto")
                finally:
                    del os.environ["HTTP_PROXY"], os.environ["NO_PROXY"]

            clients["auto, a proxy set that does not apply"] = auto
            import uvloop

            per = uvloop.run(measure(clients, URL(f"http://127.0.0.1:{port}/v1/chat/completions"),
                                     batches=args.batches, requests=args.requests, streams=args.streams))
        print("| client | CPU per request, 1-token answer | CPU per 1,000-token stream |")
        print("|---|---|---|")
        for label, figures in per.items():
            cells = []
            for kind, scale, unit, digits in (("request", 1e6, "µs", 0), ("stream", 1e3, "ms", 2)):
                q1, median, q3 = statistics.quantiles([v * scale for v in figures[kind]], n=4)
                cells.append(f"{median:.{digits}f} {unit} ({q1:.{digits}f}–{q3:.{digits}f})")
            print(f"| {label} | {cells[0]} | {cells[1]} |")
    finally:
        sim.terminate()
        sim.wait(10)


if __name__ == "__main__":
    main()
