"""One benchmark run: start the servers, run W0–W6 against every target, keep every figure.

Targets (what a stream goes through on its way from the simulator to the load generator):

    direct             the simulator itself: the floor
    tokenrelay-text    tokenrelay, POST /api/get-response, plain text
    tokenrelay-sse     tokenrelay, POST /api/get-response, Accept: text/event-stream
    tokenrelay-v1      tokenrelay, POST /v1/chat/completions (when the route exists)
    tokenrelay-responses     tokenrelay, POST /v1/responses passed through (the simulator serves it)
    tokenrelay-responses-tr  tokenrelay, POST /v1/responses translated to chat completions for an
                       upstream that serves only those (a second simulator, ``--chat-only``)
    nginx              nginx with proxy_buffering off in front of the simulator: the class to aim at
    floor-relay        the floor for relaying in Python: uvicorn and tokenrelay's upstream client
                       passing each read through, nothing else (bench/floor_relay.py)
    nginx+tokenrelay   the shipped deploy/nginx config in front of tokenrelay (when it exists)
    baseline-text      the original design's route (Starlette + httpx), decoding every delta
    baseline-v1        the same, passing /v1 bytes through
    litellm, portkey   the gateways users would pick instead (--peers)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import random
import re
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from . import loadgen, nginx, peers, redis_proc
from .loadgen import (OPENAI, RESPONSES, TEXT, TR_SSE, Ask, Target, make_session, ms, one_stream, percentile,
                      run_streams, summarize)
from .procs import (ROOT, Server, export_source, start_baseline, start_floor, start_floor_relay, start_sim,
                    start_tokenrelay)
from .sizes import Sizes

QUESTION = "How does a relay stream an answer without holding it back?"
WORKLOADS = ("W0", "W1", "W2", "W3", "W4", "W5", "W6")


def make_ask(*, ttft: float, tps: float, tokens: int, question: str = QUESTION) -> Ask:
    """The simulator options for a stream, and the answer it must produce."""
    from tokenrelay.sim.provider import SimOptions, answer_tokens
    from tokenrelay.schemas import ChatRequest

    model = f"sim:ttft={ttft:g},tps={tps:g},tokens={tokens}"
    request = ChatRequest.model_validate({"messages": [{"role": "user", "content": question}], "model": model})
    words = answer_tokens(request, SimOptions().with_model(model))
    return Ask(model=model, question=question, tokens=len(words), text_bytes=len("".join(words).encode()))


QUIET_WINDOW = 0.1  # seconds
QUIET_CORES = 0.05  # servers using less than this share of a core, together, are quiet


class MachineMeter:
    """CPU the machine spent on other things than this run (other users' work), in cores."""

    def __init__(self, servers: Callable[[], list[Server]]) -> None:
        self.servers = servers
        self._me = psutil.Process()

    def snapshot(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
        mine = sum(s.cpu_seconds() for s in self.servers())
        c = self._me.cpu_times()
        mine += c.user + c.system
        return time.monotonic(), busy, mine

    @staticmethod
    def others(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
        elapsed = after[0] - before[0]
        if elapsed <= 0:
            return 0.0
        return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / elapsed)


@dataclass
class Bench:
    sizes: Sizes
    out_dir: Path
    log_dir: Path
    with_peers: bool = False
    before: tuple[str, ...] = ()  # git refs: their tokenrelay runs beside this one as "<ref>-text/-sse"
    only: tuple[str, ...] = WORKLOADS
    log: Callable[[str], None] = print
    servers: dict[str, Server] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)
    relay_of: dict[str, str] = field(default_factory=dict)  # target → the server whose CPU/memory it costs
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, Path] = field(default_factory=dict)  # "@<ref>" → that ref's exported src/

    # --- set-up ---------------------------------------------------------------------

    def start(self) -> None:
        raise_fd_limit(self.log)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sim = start_sim(self.log_dir)
        sim.wait_ready()
        self.servers["sim"] = sim
        upstream = sim.url + "/v1"
        pending = [start_tokenrelay(self.log_dir, upstream), start_baseline(self.log_dir, upstream),
                   start_floor_relay(self.log_dir, sim.url)]
        if nginx.available():
            pending.append(nginx.start_proxy(self.log_dir, upstream=sim.url, name="nginx"))
        for server in pending:
            self.servers[server.name] = server.wait_ready()
        tr = self.servers["tokenrelay"]
        if nginx.shipped_config() is not None and nginx.available():
            self.servers["nginx+tokenrelay"] = nginx.start_shipped(self.log_dir, relay_url=tr.url).wait_ready()

        self._add("direct", sim.url, OPENAI, "sim")
        self._add("tokenrelay-text", tr.url, TEXT, "tokenrelay")
        self._add("tokenrelay-sse", tr.url, TR_SSE, "tokenrelay")
        if has_v1(tr.url):
            self._add("tokenrelay-v1", tr.url, OPENAI, "tokenrelay")
        else:
            self.notes.append("tokenrelay has no /v1/chat/completions route in this build: tokenrelay-v1 not measured")
        if has_route(tr.url, "/v1/responses"):
            self._add("tokenrelay-responses", tr.url, RESPONSES, "tokenrelay")
            chat_sim = start_sim(self.log_dir, name="sim-chat-only", chat_only=True)
            self.servers[chat_sim.name] = chat_sim.wait_ready()
            translating = start_tokenrelay(self.log_dir, chat_sim.url + "/v1", name="tokenrelay-translating")
            self.servers[translating.name] = translating.wait_ready()
            self._add("tokenrelay-responses-tr", translating.url, RESPONSES, translating.name)
        else:
            self.notes.append("tokenrelay has no /v1/responses route in this build: tokenrelay-responses not measured")
        if "nginx" in self.servers:
            self._add("nginx", self.servers["nginx"].url, OPENAI, "nginx")
        else:
            self.notes.append("nginx not installed: the nginx targets were not measured")
        if "nginx+tokenrelay" in self.servers:
            front = self.servers["nginx+tokenrelay"]
            self._add("nginx+tokenrelay-sse", front.url, TR_SSE, "tokenrelay")
            if "tokenrelay-v1" in self.targets:
                self._add("nginx+tokenrelay-v1", front.url, OPENAI, "tokenrelay")
        elif nginx.shipped_config() is None:
            self.notes.append("no shipped nginx config (deploy/nginx/tokenrelay.conf): nginx+tokenrelay not measured")
        for ref in self.before:
            label = "@" + ref
            src = export_source(ref, self.log_dir / f"src-{len(self.servers)}")
            self.sources[label] = src
            old = start_tokenrelay(self.log_dir, upstream, name=label, src=src).wait_ready()
            self.servers[label] = old
            self._add(f"{label}-text", old.url, TEXT, label)
            self._add(f"{label}-sse", old.url, TR_SSE, label)
            if has_v1(old.url):
                self._add(f"{label}-v1", old.url, OPENAI, label)
            self.notes.append(f"{label}-*: tokenrelay as of {ref} ({git_describe(ref) or ref}), run beside this checkout")
        self._add("floor-relay", self.servers["floor-relay"].url, OPENAI, "floor-relay")
        self.notes.append("floor-relay: the floor for relaying in Python (bench/floor_relay.py): uvicorn and "
                          "tokenrelay's upstream client passing each read through as it came, nothing else")
        base = self.servers["baseline"]
        self._add("baseline-text", base.url, TEXT, "baseline")
        self._add("baseline-v1", base.url, OPENAI, "baseline")
        if self.with_peers:
            for server, target in peers.start_all(self.log_dir, upstream=upstream, log=self.log, notes=self.notes):
                self.servers[server.name] = server
                self.targets[target.name] = target
                self.relay_of[target.name] = server.name

    def _add(self, name: str, url: str, wire: loadgen.Wire, server: str) -> None:
        self.targets[name] = Target(name, url, wire)
        self.relay_of[name] = server

    def stop(self) -> None:
        for server in reversed(list(self.servers.values())):
            server.stop()

    # --- the run --------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        meter = MachineMeter(lambda: list(self.servers.values()))
        self.results = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sizes": self.sizes.name,
            "source": source_state(),
            "machine": machine(),
            "versions": versions(self.servers),
            "commands": {name: s.command() for name, s in self.servers.items()},
            "targets": {name: {"url": t.url + t.wire.path, "wire": t.wire.name, "server": self.relay_of[name]}
                        for name, t in self.targets.items()},
            "workloads": {},
            "load": {"loadavg_start": list(os.getloadavg())},
            "notes": self.notes,
        }
        await self._warm_up()
        steps = {"W0": self.w0, "W1": self.w1, "W2": self.w2, "W3": self.w3, "W4": self.w4, "W5": self.w5,
                 "W6": self.w6}
        for name in self.only:
            self.log(f"{name} …")
            before = meter.snapshot()
            started = time.monotonic()
            figures = await steps[name]()
            figures["seconds"] = round(time.monotonic() - started, 1)
            figures["other_cpu_cores"] = round(MachineMeter.others(before, meter.snapshot()), 2)
            self.results["workloads"][name] = figures
            self.log(f"{name} done in {figures['seconds']} s (other load on the machine: "
                     f"{figures['other_cpu_cores']} cores)")
        self.results["load"]["loadavg_end"] = list(os.getloadavg())
        from .report import check_targets

        self.results["goals"] = check_targets(self.results)
        return self.results

    async def _warm_up(self) -> None:
        ask = make_ask(ttft=0, tps=0, tokens=20)
        async with make_session() as session:
            for target in list(self.targets.values()):
                for _ in range(3):
                    result = await one_stream(session, target, ask)
                    if result.ok:
                        continue
                    if target.name not in peers.NAMES:
                        raise RuntimeError(f"{target.name} does not stream: {result.error}")
                    # A peer that cannot relay a stream here is reported, not measured.
                    self.notes.append(f"peer {target.name} not measured: its answer to a streamed request "
                                      f"was {result.error} (log: {self.servers[target.name].log_path.name})")
                    self.log(f"  {target.name}: does not stream ({result.error}); not measured")
                    del self.targets[target.name]
                    break

    @contextlib.asynccontextmanager
    async def fresh_relay(self, name: str) -> AsyncIterator[tuple[Server, Target]]:
        """A new tokenrelay process for a memory measurement, so what earlier workloads left
        in the heap does not hide (or inflate) this one's growth."""
        label = self.relay_of.get(name, "")
        server = start_tokenrelay(self.log_dir, self.servers["sim"].url + "/v1", name=f"tokenrelay-{name}-fresh",
                                  src=self.sources.get(label))
        try:
            server.wait_ready()
            target = Target(name, server.url, self.targets[name].wire)
            await run_streams(target, make_ask(ttft=0, tps=0, tokens=20), concurrency=4, per_worker=5)
            yield server, target
        finally:
            server.stop()

    async def settle(self, timeout: float = 10.0, *, after: str = "") -> None:
        """Wait until the simulator has no stream open — every stream cut at a deadline has
        been let go by the relay in between — and until every server has gone quiet: a
        gateway still busy with the last run's work would otherwise load the machine
        under the next target's measurement. ``after``: the target that ran last, for the log."""
        deadline = time.monotonic() + timeout
        since = f" after {after}" if after else ""
        while (await sim_stats(self.servers["sim"]))["open_streams"] > 0:
            if time.monotonic() > deadline:
                self.log(f"  (streams still open at the simulator after the settle timeout{since})")
                return
            await asyncio.sleep(0.02)
        servers = list(self.servers.values())
        used = sum(s.cpu_seconds() for s in servers)
        while True:
            await asyncio.sleep(QUIET_WINDOW)
            now = sum(s.cpu_seconds() for s in servers)
            if now - used < QUIET_CORES * QUIET_WINDOW:
                return
            if time.monotonic() > deadline:
                self.log(f"  (servers still busy after the settle timeout{since}: "
                         f"{(now - used) / QUIET_WINDOW:.2f} cores)")
                return
            used = now

    # W0: sequential per-request overhead, interleaved rounds -----------------------------

    async def w0(self) -> dict[str, Any]:
        s = self.sizes
        ask = make_ask(ttft=0, tps=0, tokens=s.w0_tokens)
        names = [n for n in self.targets if n != "direct"]
        ttft: dict[str, list[float]] = {n: [] for n in names}
        paired_direct: dict[str, list[float]] = {n: [] for n in names}
        errors: dict[str, int] = {n: 0 for n in ["direct", *names]}
        sessions = {n: make_session() for n in ["direct", *names]}
        per_block = max(1, s.w0_rounds // s.w0_blocks)
        try:
            shuffler = random.Random(0)
            for _ in range(s.w0_blocks):
                # Each target in a block of direct/target pairs, the blocks in a new order
                # every pass: a target's server then waits one direct request between two
                # of its own, whichever other targets the run has (a server left idle longer
                # answers slower, and LiteLLM's requests take 15 ms), and a drift of the
                # machine's speed lands on both halves of every pair.
                order = names[:]
                shuffler.shuffle(order)
                for name in order:
                    for _ in range(per_block):
                        direct = await one_stream(sessions["direct"], self.targets["direct"], ask, keep_gaps=False)
                        result = await one_stream(sessions[name], self.targets[name], ask, keep_gaps=False)
                        if not (direct.ok and direct.ttft is not None):
                            errors["direct"] += 1
                            continue
                        if result.ok and result.ttft is not None:
                            ttft[name].append(result.ttft)
                            paired_direct[name].append(direct.ttft)
                        else:
                            errors[name] += 1
        finally:
            for session in sessions.values():
                await session.close()
        every_direct = [t for n in names for t in paired_direct[n]]
        out: dict[str, Any] = {"direct": self._w0_figures(every_direct, every_direct, errors["direct"])}
        for name in names:
            out[name] = self._w0_figures(ttft[name], paired_direct[name], errors[name])
        return {"params": {"rounds": s.w0_blocks * per_block, "blocks": s.w0_blocks, "model": ask.model,
                           "order": "per target, blocks of direct/target pairs; the blocks in a new random "
                                    "order every pass (seeded); added = the target's median minus the median "
                                    "of the direct requests paired with it"},
                "results": out}

    @staticmethod
    def _w0_figures(ttft: list[float], direct: list[float], errors: int) -> dict[str, Any]:
        med = statistics.median(ttft) if ttft else None
        p90 = percentile(ttft, 90)
        direct_med = statistics.median(direct) if direct else None
        direct_p90 = percentile(direct, 90)
        return {
            "requests": len(ttft) + errors,
            "errors": errors,
            "ttft_ms": {"p50": ms(med), "p90": ms(p90)},
            "added_ttft_ms": {"p50": ms(med - direct_med) if med is not None and direct_med is not None else None,
                              "p90": ms(p90 - direct_p90) if p90 is not None and direct_p90 is not None else None},
        }

    # W1: latency under load --------------------------------------------------------------

    async def w1(self) -> dict[str, Any]:
        s = self.sizes
        ask = make_ask(ttft=0, tps=1 / s.w1_interval, tokens=s.w1_tokens)
        window = min(1.0, s.w1_tokens * s.w1_interval)
        # Arrivals at random moments of the first second (seeded: each wave's are the same for
        # every target). Evenly spaced arrivals 20 ms apart would each land at the same moment
        # of the 20 ms token cycle of the streams already open, always in (or always clear
        # of) their burst of tokens: the figure would depend on that phase (docs/performance.md, 12).
        arrivals = random.Random(1)
        # Waves alternate the order of the targets, so a burst of other work on the machine
        # does not land on one target only; each target's figures pool all its waves.
        runs: dict[str, list[loadgen.RunResult]] = {name: [] for name in self.targets}
        previous = ""
        for wave in range(s.w1_waves):
            starts = sorted(arrivals.uniform(0, window) for _ in range(s.w1_streams))
            order = list(self.targets.items())
            for name, target in (order if wave % 2 == 0 else order[::-1]):
                await self.settle(after=previous)
                previous = name
                run = await run_streams(target, ask, concurrency=s.w1_streams, starts=starts,
                                        deadline=s.w1_tokens * s.w1_interval * 4 + 30)
                runs[name].append(run)
        out: dict[str, Any] = {}
        for name, done in runs.items():
            out[name] = summarize(loadgen.RunResult(streams=[x for r in done for x in r.streams],
                                                    elapsed=sum(r.elapsed for r in done),
                                                    tokens=sum(r.tokens for r in done)))
            # A stall of the whole machine (tens of ms) lands on one wave and would be the
            # pooled p99 of whichever target ran then; the median of the waves' p99s is what
            # the added figures compare, so one such wave does not decide a goal.
            waves = [summarize(r) for r in done]
            for key in ("ttft_ms", "gap_ms"):
                p99s = [w[key]["p99"] for w in waves if w[key]["p99"] is not None]
                out[name][key]["p99_waves"] = round(statistics.median(p99s), 3) if p99s else None
                out[name][key]["p99_wave_range"] = [round(min(p99s), 3), round(max(p99s), 3)] if p99s else None
            self.log(f"  W1 {name}: ttft p99 {out[name]['ttft_ms']['p99']} ms, gap p99 {out[name]['gap_ms']['p99']} ms,"
                     f" errors {out[name]['errors']}")
        direct = out["direct"]
        for name, figures in out.items():
            figures["added_ttft_ms"] = {
                "p50": _sub(figures["ttft_ms"]["p50"], direct["ttft_ms"]["p50"]),
                "p99": _sub(figures["ttft_ms"]["p99_waves"], direct["ttft_ms"]["p99_waves"])}
            figures["added_gap_ms"] = {
                "p50": _sub(figures["gap_ms"]["p50"], direct["gap_ms"]["p50"]),
                "p99": _sub(figures["gap_ms"]["p99_waves"], direct["gap_ms"]["p99_waves"])}
        return {"params": {"streams": s.w1_streams, "waves": s.w1_waves, "tokens": s.w1_tokens,
                           "interval_ms": s.w1_interval * 1000,
                           "arrivals": "random in the first second (seeded, the same for every target)",
                           "order": "waves alternate the order of the targets", "model": ask.model},
                "results": out}

    # W2: throughput ----------------------------------------------------------------------

    async def _throughput(self, target: Target, server: Server, ask: Ask, concurrency: int,
                          seconds: float) -> dict[str, Any]:
        return self._throughput_figures([await self._throughput_window(target, server, ask, concurrency, seconds)])

    async def _throughput_window(self, target: Target, server: Server, ask: Ask, concurrency: int,
                                 seconds: float) -> tuple[loadgen.RunResult, float, float]:
        """One window of back-to-back streams: the run, and the relay's and the simulator's
        CPU seconds during it."""
        sim = self.servers["sim"]
        cpu0, sim0 = server.cpu_seconds(), sim.cpu_seconds()
        run = await run_streams(target, ask, concurrency=concurrency, per_worker=10**9, deadline=seconds,
                                keep_gaps=False)
        cpu, sim_cpu = server.cpu_seconds() - cpu0, sim.cpu_seconds() - sim0
        await self.settle(after=target.name)
        return run, cpu, sim_cpu

    @staticmethod
    def _throughput_figures(windows: list[tuple[loadgen.RunResult, float, float]]) -> dict[str, Any]:
        """The figures of one target's windows pooled: tokens over the time they took."""
        run = loadgen.RunResult(streams=[s for w in windows for s in w[0].streams],
                                elapsed=sum(w[0].elapsed for w in windows), tokens=sum(w[0].tokens for w in windows))
        cpu, sim_cpu = sum(w[1] for w in windows), sum(w[2] for w in windows)
        figures = summarize(run)
        return {
            "tokens_per_s": figures["tokens_per_s"],
            "tokens": figures["tokens"],
            "seconds": figures["elapsed_s"],
            "completed_streams": figures["completed"],
            "errors": figures["errors"],
            "error_examples": figures["error_examples"],
            "ttft_ms_p50": figures["ttft_ms"]["p50"],
            "ttft_ms_p99": figures["ttft_ms"]["p99"],
            "cpu_s_per_mtok": round(cpu / run.tokens * 1e6, 2) if run.tokens else None,
            "relay_cpu_pct": round(cpu / run.elapsed * 100, 1) if run.elapsed else None,
            "sim_cpu_pct": round(sim_cpu / run.elapsed * 100, 1) if run.elapsed else None,
        }

    async def w2(self) -> dict[str, Any]:
        s = self.sizes
        ask = make_ask(ttft=0, tps=0, tokens=s.w2_tokens)
        out: dict[str, Any] = {name: {} for name in self.targets}
        shuffler = random.Random(2)
        # The gateway peers run after all the others, one after the other in the order of
        # peers.NAMES: LiteLLM falls far behind, keeps working on the streams its clients
        # left, and stays busy past the settle timeout, loading the machine under whichever
        # target comes next, so it comes last.
        own = [n for n in self.targets if n not in peers.NAMES]
        gateways = [[n] for n in peers.NAMES if n in self.targets]
        for group in (own, *gateways):
            for c in s.w2_concurrency:
                # Each target's time is split into rounds in a new order each round, so a
                # drift of the machine's speed over the run is shared by all targets instead
                # of landing on whichever ran last.
                windows: dict[str, list[tuple[loadgen.RunResult, float, float]]] = {n: [] for n in group}
                for _ in range(s.w2_rounds):
                    order = list(group)
                    shuffler.shuffle(order)
                    for name in order:
                        server = self.servers[self.relay_of[name]]
                        windows[name].append(await self._throughput_window(
                            self.targets[name], server, ask, c, s.w2_seconds / s.w2_rounds))
                for name in group:
                    out[name][str(c)] = self._throughput_figures(windows[name])
                    self.log(f"  W2 {name} c={c}: {out[name][str(c)]['tokens_per_s']:.0f} tokens/s")
        for name, by_c in out.items():
            for c, figures in by_c.items():
                base = out["direct"][c]["tokens_per_s"]
                figures["ratio_to_direct"] = round(figures["tokens_per_s"] / base, 3) if base else None
        return {"params": {"tokens": s.w2_tokens, "concurrency": list(s.w2_concurrency),
                           "seconds_each": s.w2_seconds, "rounds": s.w2_rounds, "model": ask.model,
                           "order": "each target's time split into rounds, a new random order every round (seeded); "
                                    "the gateway peers after all the others, one at a time, LiteLLM last",
                           "note": "tokens/s over a fixed window; streams open at its end are cut off"},
                "results": out}

    # W3: many open streams ---------------------------------------------------------------

    async def w3(self) -> dict[str, Any]:
        s = self.sizes
        tokens = max(1, round(s.w3_seconds / s.w3_interval))
        ask = make_ask(ttft=0, tps=1 / s.w3_interval, tokens=tokens)
        out: dict[str, Any] = {}
        # One relay route: opening thousands of streams is what costs here, and the routes
        # share it. Direct runs first at each size: whether the simulator and the load
        # generator hold that many streams themselves, on the same cores.
        # The floors: a bare uvicorn app writing the same kind of stream itself
        # (bench/floor_app.py), and one relaying it (bench/floor_relay.py).
        relays = ("direct", "floor", "floor-relay", "tokenrelay-sse", *(f"@{ref}-sse" for ref in self.before))
        for streams in s.w3_streams:
            for name in [n for n in relays if n in self.targets or n == "floor"]:
                key = f"{name} ×{streams}"
                if name == "direct":
                    out[key] = await self._many_streams(self.targets[name], self.servers["sim"], ask, streams)
                elif name in ("floor", "floor-relay"):  # a fresh one, as the relays below
                    floor = (start_floor(self.log_dir) if name == "floor" else
                             start_floor_relay(self.log_dir, self.servers["sim"].url, name="floor-relay-fresh"))
                    try:
                        floor.wait_ready()
                        self.results["commands"].setdefault(name, floor.command())
                        out[key] = await self._many_streams(Target(name, floor.url, OPENAI), floor, ask, streams)
                    finally:
                        floor.stop()
                else:
                    async with self.fresh_relay(name) as (server, target):
                        out[key] = await self._many_streams(target, server, ask, streams)
                self.log(f"  W3 {key}: {out[key]['kb_per_stream']} KB/stream, stalled {out[key]['stalled_streams']},"
                         f" completed {out[key]['completed']}/{out[key]['streams']}")
        return {"params": {"streams": list(s.w3_streams), "interval_ms": s.w3_interval * 1000, "tokens": tokens,
                           "opened_per_s": s.w3_rate, "stall": f"a gap over {3 * s.w3_interval:g} s",
                           "model": ask.model},
                "results": out}

    async def _many_streams(self, target: Target, server: Server, ask: Ask, streams: int) -> dict[str, Any]:
        s = self.sizes
        idle = server.rss()
        peak = idle
        samples: list[tuple[float, int, int]] = []
        t0 = time.perf_counter()

        async def sample() -> None:
            nonlocal peak
            while True:
                await asyncio.sleep(0.25)
                rss = server.rss()
                opened = sum(1 for r in results_ref if r.ttft is not None and r.total is None and r.error is None)
                samples.append((round(time.perf_counter() - t0, 2), rss, opened))
                peak = max(peak, rss)

        results_ref: list[loadgen.StreamResult] = []
        session = make_session(timeout=s.w3_seconds * 4 + 60)
        try:
            ramp = streams / s.w3_rate
            run = await _tracked_run(target, ask, streams, 1 / s.w3_rate, s.w3_seconds * 3 + ramp + 30, session,
                                     results_ref, sample)
        finally:
            await session.close()
        await self.settle(timeout=30)
        stall_limit = 3 * s.w3_interval
        stalled = [r for r in run.streams if r.gaps and max(r.gaps) > stall_limit]
        ok = sum(1 for r in run.streams if r.ok)
        max_open = max((o for _, _, o in samples), default=0)
        # Memory per stream at the moment the most streams were open at once.
        rss_at_most = max((r for _, r, o in samples if o == max_open), default=idle)
        growth = max(0, rss_at_most - idle)
        errors = sorted({r.error for r in run.streams if r.error})[:3]
        return {
            "streams": len(run.streams),
            "completed": ok,
            "errors": len(run.streams) - ok,
            "error_examples": errors,
            "max_open_streams": max_open,
            "stalled_streams": len(stalled),
            "gap_ms": {"p50": ms(percentile([g for r in run.streams for g in r.gaps], 50)),
                       "p99": ms(percentile([g for r in run.streams for g in r.gaps], 99)),
                       "max": ms(max((max(r.gaps) for r in run.streams if r.gaps), default=None))},
            "ttft_ms": {"p50": ms(percentile([r.ttft for r in run.streams if r.ttft], 50)),
                        "max": ms(max((r.ttft for r in run.streams if r.ttft), default=None))},
            "relay_rss_idle_mb": round(idle / 2**20, 1),
            "relay_rss_peak_mb": round(peak / 2**20, 1),
            "rss_at_most_open_mb": round(rss_at_most / 2**20, 1),
            "kb_per_stream": round(growth / 1024 / max(max_open, 1), 1),
            "rss_samples": [(t, round(r / 2**20, 1), o) for t, r, o in samples[:: max(1, len(samples) // 40)]],
        }

    # W4: slow readers ----------------------------------------------------------------------

    async def w4(self) -> dict[str, Any]:
        s = self.sizes
        ask = make_ask(ttft=0, tps=0, tokens=s.w4_tokens)
        out: dict[str, Any] = {}
        for name in [n for n in ("tokenrelay-sse", "tokenrelay-text") if n in self.targets]:
            async with self.fresh_relay(name) as (server, target):
                out[name] = await self._slow_readers(target, server, ask)
            self.log(f"  W4 {name}: relay +{out[name]['relay_rss_growth_mb']} MB for {s.w4_readers} slow readers,"
                     f" upstream finished {out[name]['upstream_finished']}")
        stalled: dict[str, Any] = {}
        if "tokenrelay-sse" in self.targets:
            await self.settle(30)  # the slow readers' upstream streams end first: they are counted apart
            stalled["tokenrelay-sse"] = await self._stalled_readers(self.targets["tokenrelay-sse"])
            f = stalled["tokenrelay-sse"]
            self.log(f"  W4 stalled readers: dropped {f['dropped']}/{f['readers']} after {f['dropped_after_s']} s "
                     f"(send timeout {f['send_timeout_s']:g} s); RSS {f['relay_rss_idle_mb']} → "
                     f"{f['relay_rss_stalled_mb']} → {f['relay_rss_after_mb']} MB")
        return {"params": {"readers": s.w4_readers, "tokens": s.w4_tokens, "model": ask.model,
                           "read": f"{s.w4_read_bytes} bytes every {s.w4_read_pause * 1000:g} ms, 4 KiB receive buffer",
                           "seconds": s.w4_seconds, "send_timeout": s.w4_send_timeout},
                "results": out, "stalled": stalled}

    async def _stalled_readers(self, target: Target) -> dict[str, Any]:
        """Readers that send their request, then never read a byte: each holds an upstream
        request, its relay stream and a rate-limit slot until the send timeout drops it
        (TOKENRELAY_SEND_TIMEOUT). Measured: how long until the simulator saw every one of
        those upstream requests closed, and the relay's memory before, while and after."""
        s = self.sizes
        sim = self.servers["sim"]
        readers = max(2, s.w4_readers // 25)
        # The simulator echoes the question word by word: first two 3 MB words, more than the
        # kernel buffers for a client that reads nothing (up to 4 MB of send buffer on
        # loopback: a whole 50,000-token answer fits, and the relay would never wait on it;
        # one word stays under the relay's 4 MiB cap on an upstream line), then short words at
        # 100 a second, so the upstream is still writing when the reader is dropped.
        ask = Ask(model="sim:echo,ttft=0,tps=100", question="x" * 3_000_000 + " " + "z" * 3_000_000 + " y" * 10_000,
                  tokens=10_002, text_bytes=6_020_001)
        server = start_tokenrelay(self.log_dir, sim.url + "/v1", name="tokenrelay-stalled",
                                  extra_env={"TOKENRELAY_SEND_TIMEOUT": f"{s.w4_send_timeout:g}",
                                             "TOKENRELAY_MAX_BODY_BYTES": "8000000"})
        writers: list[asyncio.StreamWriter] = []
        try:
            server.wait_ready()
            warm = Target(target.name, server.url, target.wire)
            await run_streams(warm, make_ask(ttft=0, tps=0, tokens=20), concurrency=4, per_worker=5)
            await self.settle()
            idle = server.rss()
            cancelled_before = (await sim_stats(sim))["cancelled_streams"]
            request = _raw_request(server.url, target.wire.path, target.wire.accept,
                                   target.wire.body(ask.model, ask.question))
            for _ in range(readers):
                sock = socket.socket()
                # A tiny receive window set before connecting: the relay's writes block at once.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
                _, writer = await asyncio.open_connection(sock=sock)
                writer.write(request)
                writers.append(writer)
            stalled_at = time.monotonic()
            # The relay's own log says when it dropped each one (outcome=client_stalled).
            peak = server.rss()
            dropped = closed = 0
            dropped_after = None
            while closed < readers and time.monotonic() < stalled_at + s.w4_send_timeout + 10:
                peak = max(peak, server.rss())
                await asyncio.sleep(0.05)
                dropped = server.log_path.read_text(errors="replace").count("outcome=client_stalled")
                if dropped == readers and dropped_after is None:
                    dropped_after = time.monotonic() - stalled_at
                # ... and the simulator, that each one's upstream request was closed.
                closed = (await sim_stats(sim))["cancelled_streams"] - cancelled_before
            after = server.rss()
        finally:
            for writer in writers:
                writer.close()
            server.stop()
        return {
            "readers": readers,
            "send_timeout_s": s.w4_send_timeout,
            "upstream_closed": closed,
            "dropped": dropped,
            "dropped_after_s": round(dropped_after, 2) if dropped_after is not None else None,
            "relay_rss_idle_mb": round(idle / 2**20, 1),
            "relay_rss_stalled_mb": round(peak / 2**20, 1),
            "relay_rss_after_mb": round(after / 2**20, 1),
        }

    async def _slow_readers(self, target: Target, server: Server, ask: Ask) -> dict[str, Any]:
        s = self.sizes
        sim = self.servers["sim"]
        sim_before = await sim_stats(sim)
        idle = server.rss()
        peak = idle

        async def sample() -> None:
            nonlocal peak
            while True:
                await asyncio.sleep(0.2)
                peak = max(peak, server.rss())

        session = make_session(rcvbuf=4096)
        try:
            run = await run_streams(target, ask, concurrency=s.w4_readers, per_worker=1, deadline=s.w4_seconds,
                                    keep_gaps=False, session=session,
                                    slow_read=(s.w4_read_bytes, s.w4_read_pause), during=sample)
            # Read the simulator's counters while the slow streams are still open.
            sim_during = await sim_stats(sim)
        finally:
            await session.close()
        await self.settle()
        finished = sim_during["completed_streams"] - sim_before["completed_streams"]
        growth = max(0, peak - idle)
        rate = s.w4_read_bytes / s.w4_read_pause
        return {
            "readers": s.w4_readers,
            "client_read_bytes_per_s": rate,
            "tokens_read": run.tokens,
            "upstream_finished": finished,
            "upstream_paced": finished == 0,
            "relay_rss_idle_mb": round(idle / 2**20, 1),
            "relay_rss_peak_mb": round(peak / 2**20, 1),
            "relay_rss_growth_mb": round(growth / 2**20, 1),
            "kb_per_slow_stream": round(growth / 1024 / s.w4_readers, 1),
            "answer_kb": round(ask.text_bytes / 1024, 1),
        }

    # W5: --workers scaling -----------------------------------------------------------------

    async def w5(self) -> dict[str, Any]:
        s = self.sizes
        ask = make_ask(ttft=0, tps=0, tokens=s.w2_tokens)
        upstream = self.servers["sim"].url + "/v1"
        out: dict[str, Any] = {}
        one = self.servers["tokenrelay"]
        multi = start_tokenrelay(self.log_dir, upstream, workers=s.w5_workers, name=f"tokenrelay-w{s.w5_workers}")
        pinned = _pin(self.servers["sim"], 0)
        try:
            multi.wait_ready()
            self.results["commands"][multi.name] = multi.command()
            for label, server in (("1", one), (str(s.w5_workers), multi)):
                target = Target(f"tokenrelay-text-w{label}", server.url, TEXT)
                await run_streams(target, make_ask(ttft=0, tps=0, tokens=20), concurrency=8, per_worker=4)
                out[label] = await self._throughput(target, server, ask, s.w5_concurrency, s.w5_seconds)
                out[label]["processes"] = len(server.pids())
                self.log(f"  W5 workers={label}: {out[label]['tokens_per_s']:.0f} tokens/s")
        finally:
            multi.stop()
            if pinned:
                _pin(self.servers["sim"], None)
        base = out["1"]["tokens_per_s"]
        scaling = round(out[str(s.w5_workers)]["tokens_per_s"] / base, 3) if base else None
        return {"params": {"workers": s.w5_workers, "concurrency": s.w5_concurrency, "tokens": s.w2_tokens,
                           "route": "tokenrelay-text", "cores": os.cpu_count(), "seconds_each": s.w5_seconds,
                           "sim_pinned": pinned},
                "results": out, "scaling": scaling}


    # W6: resumable streams on Redis ------------------------------------------------------

    async def w6(self) -> dict[str, Any]:
        """The same SSE route on two fresh relays, its streams kept in memory and on a real
        redis-server (TOKENRELAY_REDIS_URL): what Redis adds to the first token, to the CPU
        per token, in Redis calls (and commands run, scripts' included) per relayed piece, and whether Redis's connections grow
        with the readers of a stream (they must not: one hub per stream per instance)."""
        s = self.sizes
        if not redis_proc.available():
            self.notes.append("redis-server not installed: W6 not measured")
            return {"params": {}, "results": {}}
        upstream = self.servers["sim"].url + "/v1"
        store = redis_proc.RedisProcess(self.log_dir)
        relays = {"memory": start_tokenrelay(self.log_dir, upstream, name="tokenrelay-w6-memory"),
                  "redis": start_tokenrelay(self.log_dir, upstream, name="tokenrelay-w6-redis",
                                            # no job queue polling Redis beside the streams
                                            extra_env={"TOKENRELAY_REDIS_URL": store.url,
                                                       "TOKENRELAY_JOBS_IN_SERVE": "false"})}
        try:
            for relay in relays.values():
                relay.wait_ready()
                self.results["commands"][relay.name] = relay.command()
            self.results["versions"]["redis-server"] = store.version()
            targets = {k: Target(f"tokenrelay-sse ({k})", r.url, TR_SSE) for k, r in relays.items()}
            for target in targets.values():
                await run_streams(target, make_ask(ttft=0, tps=0, tokens=20), concurrency=4, per_worker=5)
            await self.settle()
            out: dict[str, Any] = {k: {} for k in relays}

            # Time to first token: sequential pairs, the two relays alternating first.
            one = make_ask(ttft=0, tps=0, tokens=s.w0_tokens)
            ttft: dict[str, list[float]] = {k: [] for k in relays}
            async with make_session() as session:
                for i in range(s.w0_rounds):
                    for k in (("memory", "redis") if i % 2 == 0 else ("redis", "memory")):
                        result = await one_stream(session, targets[k], one, keep_gaps=False)
                        if result.ok and result.ttft is not None:
                            ttft[k].append(result.ttft)
            for k in relays:
                out[k]["ttft_ms_p50"] = ms(statistics.median(ttft[k])) if ttft[k] else None
            added = _sub(out["redis"]["ttft_ms_p50"], out["memory"]["ttft_ms_p50"])

            # Latency under load (W1's shape, one wave), as information.
            paced = make_ask(ttft=0, tps=1 / s.w1_interval, tokens=s.w1_tokens)
            for k in relays:
                await self.settle()
                figures = summarize(await run_streams(targets[k], paced, concurrency=s.w1_streams,
                                                      deadline=s.w1_tokens * s.w1_interval * 4 + 30))
                out[k]["w1"] = {"ttft_ms": figures["ttft_ms"], "gap_ms": figures["gap_ms"],
                                "errors": figures["errors"]}

            # CPU per token (W2's shape), and Redis's commands per piece the relay wrote.
            flat = make_ask(ttft=0, tps=0, tokens=s.w2_tokens)
            for c in s.w2_concurrency:
                for k in relays:
                    commands, log_at = store.commands(), relays[k].log_path.stat().st_size
                    window = await self._throughput_window(targets[k], relays[k], flat, c, s.w2_seconds)
                    figures = self._throughput_figures([window])
                    pieces = _pieces_logged(relays[k].log_path, log_at)
                    figures["pieces"] = pieces
                    figures["redis_commands"] = store.commands() - commands
                    figures["redis_commands_per_piece"] = (round(figures["redis_commands"] / pieces, 3)
                                                           if pieces else None)
                    out[k][str(c)] = figures
                    self.log(f"  W6 {k} c={c}: {figures['cpu_s_per_mtok']} CPU s per million tokens, "
                             f"{figures['redis_commands_per_piece']} Redis commands per piece")

            # Calls per piece: the Redis relay's windows again, with MONITOR telling the calls
            # the relay sent from the commands its scripts ran (not above: MONITOR slows Redis).
            for c in s.w2_concurrency:
                log_at = relays["redis"].log_path.stat().st_size
                with store.monitor() as seen:
                    await self._throughput_window(targets["redis"], relays["redis"], flat, c, s.w2_seconds)
                pieces = _pieces_logged(relays["redis"].log_path, log_at)
                figures = out["redis"][str(c)]
                figures.update({"calls_pieces": pieces, "redis_calls": seen.sent, "redis_in_scripts": seen.in_scripts,
                                "redis_calls_per_piece": round(seen.sent / pieces, 3) if pieces else None})
                self.log(f"  W6 redis c={c}: {figures['redis_calls_per_piece']} Redis calls per piece "
                         f"({seen.sent} calls, {seen.in_scripts} commands inside scripts, {pieces} pieces)")

            connections = await self._redis_connections(targets["redis"], store)
            self.log(f"  W6 Redis connections by readers of one stream: {connections}")
        finally:
            for relay in relays.values():
                relay.stop()
            store.stop()
        ratios = [out["redis"][str(c)]["cpu_s_per_mtok"] / out["memory"][str(c)]["cpu_s_per_mtok"]
                  for c in s.w2_concurrency
                  if out["redis"][str(c)]["cpu_s_per_mtok"] and out["memory"][str(c)]["cpu_s_per_mtok"]]
        per_piece = [out["redis"][str(c)]["redis_commands_per_piece"] for c in s.w2_concurrency]
        calls = [out["redis"][str(c)]["redis_calls_per_piece"] for c in s.w2_concurrency]
        return {"params": {"pairs": s.w0_rounds, "concurrency": list(s.w2_concurrency), "tokens": s.w2_tokens,
                           "seconds_each": s.w2_seconds, "readers": list(s.w6_readers),
                           "w1": f"{s.w1_streams} streams × {s.w1_tokens} tokens × {s.w1_interval * 1000:g} ms"},
                "results": out,
                "added_ttft_ms": added,
                "cpu_ratio": round(max(ratios), 3) if len(ratios) == len(s.w2_concurrency) else None,
                "redis_commands_per_piece": max((x for x in per_piece if x is not None), default=None),
                "redis_calls_per_piece": max((x for x in calls if x is not None), default=None),
                "redis_connections": connections}

    async def _redis_connections(self, target: Target, store: redis_proc.RedisProcess) -> dict[str, int]:
        """Redis's connected clients while one stream runs, with 0 and then each number of
        readers of it attached (``GET /api/streams/{id}``, each having read an event)."""
        s = self.sizes
        slow = make_ask(ttft=0, tps=20, tokens=400)
        counts: dict[str, int] = {}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            body = target.wire.body(slow.model, slow.question)
            async with session.post(target.url + target.wire.path, data=body,
                                    headers={"content-type": "application/json",
                                             "accept": "text/event-stream"}) as asking:
                stream_id = asking.headers["x-stream-id"]
                await asking.content.readline()
                counts["0"] = store.clients()
                readers: list[aiohttp.ClientResponse] = []
                try:
                    for want in s.w6_readers:
                        while len(readers) < want:
                            reader = await session.get(f"{target.url}/api/streams/{stream_id}",
                                                       headers={"accept": "text/event-stream"})
                            await reader.content.readline()  # attached: it has its first event
                            readers.append(reader)
                        counts[str(want)] = store.clients()
                finally:
                    for reader in readers:
                        reader.close()
        return counts


def _pieces_logged(log_path: Path, offset: int) -> int:
    """The pieces (``chunks=``) of every answer a relay logged after byte ``offset``."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        tail = f.read().decode(errors="replace")
    return sum(int(n) for n in re.findall(r" chunks=(\d+)", tail))


async def _tracked_run(target: Target, ask: Ask, streams: int, stagger: float, deadline: float,
                       session: aiohttp.ClientSession, results_ref: list[loadgen.StreamResult],
                       during: Callable[[], Any]) -> loadgen.RunResult:
    """W3's run: one stream per worker, every result visible while it runs, so the sampler
    can count the streams open right now."""
    slots = [loadgen.StreamResult() for _ in range(streams)]
    results_ref.extend(slots)

    async def worker(i: int) -> None:
        await asyncio.sleep(i * stagger)
        await one_stream(session, target, ask, result=slots[i])

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(worker(i)) for i in range(streams)]
    side = asyncio.ensure_future(during())
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    elapsed = time.perf_counter() - start
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    side.cancel()
    await asyncio.gather(side, return_exceptions=True)
    return loadgen.RunResult(streams=slots, elapsed=elapsed, tokens=sum(s.tokens for s in slots))


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


async def sim_stats(sim: Server) -> dict[str, int]:
    async with aiohttp.ClientSession() as session:
        async with session.get(sim.url + "/sim/stats") as resp:
            return dict(await resp.json())


def _pin(server: Server, core: int | None) -> str | None:
    """Pin a server's processes to one core (None: every core again) so W5's workers share
    the other cores only with the load generator; what was done, or None where the machine
    does not allow it."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    want = {cpus[core]} if core is not None else set(cpus)
    try:
        for pid in server.pids():
            os.sched_setaffinity(pid, want)
    except OSError:
        return None
    return f"pinned to core {cpus[core]}" if core is not None else None


def _raw_request(url: str, path: str, accept: str, body: bytes) -> bytes:
    host = url.split("://", 1)[1].rstrip("/")
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAccept: {accept}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def has_v1(url: str) -> bool:
    """Whether this tokenrelay serves ``POST /v1/chat/completions``."""
    return has_route(url, "/v1/chat/completions")


def has_route(url: str, path: str) -> bool:
    """Whether this tokenrelay serves ``POST path`` (an empty body is refused with 4xx by the
    route, and 404/405 without it)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, data=b"{}", method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code not in (404, 405)
    except OSError:
        return False


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def git_describe(ref: str) -> str:
    """``<hash> <subject>`` of a commit ("" outside git or for an unknown ref)."""
    done = _git("log", "-1", "--format=%h %s", ref)
    return done.stdout.strip() if done.returncode == 0 else ""


def source_state() -> str:
    """The commit measured, and whether the checkout had changes beside it ("" outside git)."""
    head = git_describe("HEAD")
    if not head:
        return ""
    changed = _git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head + (" (with uncommitted changes)" if changed else "")


def raise_fd_limit(log: Callable[[str], None]) -> int:
    """W3 holds thousands of sockets in each process; children inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def machine() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "note": "load generator, simulator and relay share these cores",
    }


def versions(servers: dict[str, Server]) -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in ("tokenrelay", "uvicorn", "starlette", "httpx", "httpcore", "h11", "aiohttp", "uvloop", "httptools",
                 "orjson", "anyio"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    nginx_version = nginx.version()
    if nginx_version:
        out["nginx"] = nginx_version
    out.update(peers.versions())
    return out


__all__ = ["Bench", "WORKLOADS", "ROOT"]
