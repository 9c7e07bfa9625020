"""Results: each goal with its figure, the Markdown and JSON files, the chart, the README table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENRELAY = ("tokenrelay-text", "tokenrelay-sse", "tokenrelay-v1")
OTHERS = ("nginx", "floor-relay", "nginx+tokenrelay-sse", "nginx+tokenrelay-v1", "baseline-text", "baseline-v1", "litellm",
          "litellm-workers", "portkey")


def _get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _goal(workload: str, goal: str, target: str, result: Any, met: bool | None, unit: str = "",
          peers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"workload": workload, "goal": goal, "target": target, "result": result, "unit": unit,
            "met": met, "peers": {k: v for k, v in (peers or {}).items() if v is not None}}


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal of the benchmark, with this run's figure next to it (and the others').

    Each goal is one a noisy 2-core box can decide: a bound on a figure that stayed put from run
    to run (W0's added median, W3's memory per stream), or a ratio to nginx measured in the same
    run in CPU time, which another process on the box does not inflate (W2). Only a full run is
    graded: ``--quick`` and ``--smoke`` are too small to decide anything, so their goals carry
    figures with ``met`` None.
    """
    w = results["workloads"]
    graded = results.get("sizes", "full") == "full"
    goals: list[dict[str, Any]] = []

    def add(workload: str, goal: str, target: str, result: Any, met: bool | None, unit: str = "",
            peers: dict[str, Any] | None = None) -> None:
        goals.append(_goal(workload, goal, target, result, met if graded else None, unit, peers))

    if "W0" in w:
        r = w["W0"]["results"]
        peers = {n: _get(r, n, "added_ttft_ms", "p50") for n in OTHERS}
        for name in TOKENRELAY:
            added = _get(r, name, "added_ttft_ms", "p50")
            if added is not None:
                add("W0", "added median TTFT ≤ 0.4 ms", name, added, added <= 0.4, "ms", peers)
    if "W1" in w:
        r = w["W1"]["results"]
        nginx_median = _get(r, "nginx", "added_ttft_ms", "p50")
        median_peers = {n: _get(r, n, "added_ttft_ms", "p50") for n in OTHERS}
        p99_peers = {n: _get(r, n, "added_ttft_ms", "p99") for n in OTHERS}
        gap_peers = {n: _get(r, n, "added_gap_ms", "p99") for n in OTHERS}
        for name in TOKENRELAY:
            median = _get(r, name, "added_ttft_ms", "p50")
            if median is not None and nginx_median is not None:
                limit = nginx_median + 0.5
                add("W1", "added median TTFT ≤ nginx's added median + 0.5 ms", name, median, median <= limit,
                    "ms", median_peers)
            p99 = _get(r, name, "added_ttft_ms", "p99")
            if p99 is not None:
                add("W1", "added p99 TTFT (median of the waves) ≤ 2 ms", name, p99, p99 <= 2.0, "ms", p99_peers)
            gap = _get(r, name, "added_gap_ms", "p99")
            if gap is not None:
                add("W1", "inter-chunk gap p99 within 1 ms of direct", name, gap, abs(gap) <= 1.0, "ms", gap_peers)
    if "W2" in w:
        r = w["W2"]["results"]
        concurrencies = [str(c) for c in w["W2"]["params"]["concurrency"]]

        def worst_cpu_ratio(name: str) -> float | None:
            """The highest, over the concurrencies, of relay CPU per token ÷ nginx's."""
            ratios = []
            for c in concurrencies:
                own, nginx = _get(r, name, c, "cpu_s_per_mtok"), _get(r, "nginx", c, "cpu_s_per_mtok")
                if own is not None and nginx:
                    ratios.append(own / nginx)
            return round(max(ratios), 2) if len(ratios) == len(concurrencies) else None

        peers = {n: worst_cpu_ratio(n) for n in OTHERS if n != "nginx"}
        for name in TOKENRELAY:
            ratio = worst_cpu_ratio(name)
            if ratio is not None:
                add("W2", "relay CPU per token ≤ 1.25× nginx's at every concurrency (highest shown)", name,
                    ratio, ratio <= 1.25, "× nginx", peers)
    if "W3" in w:
        r = w["W3"]["results"]
        for name, f in r.items():
            if name.startswith(("direct", "floor")):
                continue  # the floors, shown in the table
            streams = f["streams"]
            held = f["completed"] == streams and f["stalled_streams"] == 0
            figure = f"{f['completed']}/{streams} completed, {f['stalled_streams']} stalled"
            # Where the simulator and the load generator alone (direct) could not hold that
            # many streams on this box, the relay's figure says nothing about the relay.
            direct = r.get(f"direct ×{streams}")
            if direct is not None and (direct["completed"] < streams or direct["stalled_streams"]):
                add("W3", f"{streams} streams held, none stalled", name,
                    f"{figure} (not decidable here: the simulator alone stalled {direct['stalled_streams']})", None)
            else:
                add("W3", f"{streams} streams held, none stalled", name, figure, held)
            floors = {floor: _get(r, f"{floor} ×{streams}", "kb_per_stream") for floor in ("floor", "floor-relay")}
            add("W3", "≤ 20 KB relay memory per open stream", name, f["kb_per_stream"], f["kb_per_stream"] <= 20, "KB",
                floors)
    if "W4" in w:
        for name, f in w["W4"]["results"].items():
            bounded = f["upstream_paced"] and f["kb_per_slow_stream"] <= 256
            add("W4", f"{f['readers']} slow readers: upstream paced, relay memory ≤ 256 KB each", name,
                f"+{f['kb_per_slow_stream']} KB per stream, upstream finished {f['upstream_finished']}", bounded)
        for name, f in w["W4"].get("stalled", {}).items():
            # Counted from when the requests were written: the slack covers uploading their
            # 6 MB questions and filling the kernel's buffers before the relay's writes wait.
            in_time = (f["dropped"] == f["upstream_closed"] == f["readers"] and f["dropped_after_s"] is not None
                       and f["dropped_after_s"] <= f["send_timeout_s"] + 3)
            add("W4", f"{f['readers']} readers that never read: dropped after the send timeout "
                      f"({f['send_timeout_s']:g} s), upstream closed", name,
                f"{f['dropped']} dropped after {f['dropped_after_s']} s; RSS {f['relay_rss_idle_mb']} → "
                f"{f['relay_rss_stalled_mb']} → {f['relay_rss_after_mb']} MB", in_time)
    if w.get("W6", {}).get("results"):
        r = w["W6"]
        name = "tokenrelay-sse on Redis"
        added = r["added_ttft_ms"]
        if added is not None:
            add("W6", "added median TTFT over the same route without Redis ≤ 0.5 ms", name, added, added <= 0.5, "ms")
        if r["cpu_ratio"] is not None:
            add("W6", "relay CPU per token ≤ 1.3× the same route without Redis, every concurrency (highest shown)",
                name, r["cpu_ratio"], r["cpu_ratio"] <= 1.3, "×")
        if r.get("redis_calls_per_piece") is not None:
            # A call is one command the relay sends (a round trip); the commands a script
            # runs inside Redis are shown in the W6 table, not graded (docs/resume.md).
            add("W6", "Redis calls (commands the relay sends) per relayed piece ≤ 1 (highest shown)", name,
                r["redis_calls_per_piece"], r["redis_calls_per_piece"] <= 1, "")
        counts = r["redis_connections"]
        add("W6", "Redis connections independent of the number of readers", name,
            " → ".join(f"{n} readers: {c}" for n, c in counts.items()), len(set(counts.values())) == 1)
    if "W5" in w:
        # Information, never graded: on 2 cores the load generator and the simulator take
        # the core a second worker would need.
        p = w["W5"]["params"]
        goals.append(_goal("W5", f"--workers {p['workers']}: tokens/s against one worker (information)",
                           "tokenrelay-text", w["W5"]["scaling"], None, "×", {"cores": p["cores"]}))
    return goals


# --- files -----------------------------------------------------------------------------


def write_all(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    chart(results, paths["png"])
    paths["md"].write_text(markdown(results, chart_name=paths["png"].name))
    return paths


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _met(met: bool | None) -> str:
    return {True: "✅ met", False: "❌ not met", None: "—"}[met]


def goals_table(results: dict[str, Any]) -> str:
    """One row per goal and route; a goal's wording and the other targets' figures are written
    on its first row only, so the table reads as goal → tokenrelay's routes → the others."""
    lines = ["| workload | goal | route | figure | | others in the same run |", "|---|---|---|---|---|---|"]
    previous: tuple[str, str] | None = None
    goals: list[dict[str, Any]] = results.get("goals", [])
    # Grouped by goal, in the order the goals first appear (a workload may list them per route).
    first_seen: dict[tuple[str, str], int] = {}
    for i, g in enumerate(goals):
        first_seen.setdefault((g["workload"], g["goal"]), i)
    for g in sorted(goals, key=lambda g: first_seen[(g["workload"], g["goal"])]):
        first = (g["workload"], g["goal"]) != previous
        previous = (g["workload"], g["goal"])
        peers = ", ".join(f"{k} {_fmt(v)}" for k, v in g["peers"].items()) if first else ""
        result = f"{_fmt(g['result'])} {g['unit']}".strip()
        workload, goal = (g["workload"], g["goal"]) if first else ("", "")
        lines.append(f"| {workload} | {goal} | {g['target']} | {result} | {_met(g['met'])} | {peers} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any], *, chart_name: str) -> str:
    m = results["machine"]
    w = results["workloads"]
    out = [
        f"# Benchmark run {results['date']} ({results['sizes']})",
        "",
        f"Machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_gb']} GB, {m['os']}, Python {m['python']}. "
        f"{m['note'].capitalize()}: every figure is from one run on this box, and ratios matter more than "
        "absolute numbers.",
        f"Load average at start {', '.join(f'{x:.2f}' for x in results['load']['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in results['load'].get('loadavg_end', []))}; CPU used by other work on the "
        "machine during each workload is listed with it.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        *([f"Source: {results['source']}."] if results.get("source") else []),
        "",
        "## Goals",
        "",
        goals_table(results),
        "",
    ]
    if results.get("notes"):
        out += ["Notes:", ""] + [f"- {n}" for n in results["notes"]] + [""]
    out += [f"![TTFT and tokens/s against concurrency]({chart_name})", ""]
    if "W0" in w:
        p = w["W0"]["params"]
        shape = (f"{p['rounds']} direct/target pairs per target in {p['blocks']} block{'s' if p['blocks'] > 1 else ''}" if "blocks" in p
                 else f"{p['rounds']} interleaved rounds")
        out += [f"## W0 sequential per-request overhead ({shape}, "
                f"{p['model']}; other load {w['W0']['other_cpu_cores']} cores)", "",
                "added: the target's TTFT minus that of the direct requests paired with it.", "",
                "| route | TTFT p50 ms | TTFT p90 ms | added p50 ms | added p90 ms | errors |", "|---|---|---|---|---|---|"]
        for name, f in w["W0"]["results"].items():
            out.append(f"| {name} | {_fmt(f['ttft_ms']['p50'], 3)} | {_fmt(f['ttft_ms']['p90'], 3)} | "
                       f"{_fmt(f['added_ttft_ms']['p50'], 3)} | {_fmt(f['added_ttft_ms']['p90'], 3)} | {f['errors']} |")
        out.append("")
    if "W1" in w:
        p = w["W1"]["params"]
        out += [f"## W1 latency under load ({p['streams']} concurrent streams × {p['tokens']} tokens × "
                f"{p['interval_ms']:g} ms, {p['waves']} wave(s), arrivals {p['arrivals']}; "
                f"other load {w['W1']['other_cpu_cores']} cores)", "",
                "p99 is over all streams of a route; \"waves\" is the median of each wave's p99 (in brackets "
                "the lowest and highest), which the added figures compare (a machine-wide stall lands on one "
                "wave only).", "",
                "| route | TTFT p50 ms | added p50 ms | TTFT p99 ms | TTFT p99 ms, waves | added p99 ms | gap p50 ms | "
                "gap p99 ms | gap p99 ms, waves | gap max ms | added gap p99 ms | streams | errors |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, f in w["W1"]["results"].items():
            spread = f["ttft_ms"].get("p99_wave_range")
            out.append(f"| {name} | {_fmt(f['ttft_ms']['p50'])} | {_fmt(f['added_ttft_ms']['p50'])} | "
                       f"{_fmt(f['ttft_ms']['p99'])} | {_fmt(f['ttft_ms'].get('p99_waves'))}"
                       + (f" ({_fmt(spread[0])}–{_fmt(spread[1])})" if spread else "") + " | "
                       f"{_fmt(f['added_ttft_ms']['p99'])} | {_fmt(f['gap_ms']['p50'])} | {_fmt(f['gap_ms']['p99'])} | "
                       f"{_fmt(f['gap_ms'].get('p99_waves'))} | "
                       f"{_fmt(f['gap_ms']['max'])} | {_fmt(f['added_gap_ms']['p99'])} | {f['streams']} | {f['errors']} |")
        out.append("")
    if "W2" in w:
        p = w["W2"]["params"]
        cs = [str(c) for c in p["concurrency"]]
        rounds = p.get("rounds", 1)
        split = f", in {rounds} interleaved rounds" if rounds > 1 else ""
        out += [f"## W2 throughput ({p['tokens']} tokens per stream, no delay, {p['seconds_each']:g} s at each "
                f"concurrency{split}; other load {w['W2']['other_cpu_cores']} cores)", "",
                "tokens/s (ratio to direct) · CPU seconds of the relay per million tokens · simulator CPU %", "",
                "| route | " + " | ".join(f"c={c}" for c in cs) + " |", "|---|" + "---|" * len(cs)]
        for name, by_c in w["W2"]["results"].items():
            cells = []
            for c in cs:
                f = by_c[c]
                cells.append(f"{f['tokens_per_s']:.0f} ({_fmt(f['ratio_to_direct'])}) · {_fmt(f['cpu_s_per_mtok'], 1)} s"
                             f" · sim {f['sim_cpu_pct']:.0f}%" + (f" · {f['errors']} err" if f["errors"] else ""))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    if "W3" in w:
        p = w["W3"]["params"]
        out += [f"## W3 many open streams ({' and '.join(map(str, p['streams']))} streams, a token every "
                f"{p['interval_ms']:g} ms, {p['tokens']} tokens, {p['opened_per_s']:g} opened per second; "
                f"stall = {p['stall']}; "
                f"other load {w['W3']['other_cpu_cores']} cores)", "",
                "Memory is the serving process's: the relay's, or on the direct rows the simulator's.", "",
                "| route | completed | stalled | max open | gap p99 ms | gap max ms | RSS idle → at most open → peak MB | "
                "KB per open stream |", "|---|---|---|---|---|---|---|---|"]
        for name, f in w["W3"]["results"].items():
            out.append(f"| {name} | {f['completed']}/{f['streams']} | {f['stalled_streams']} | {f['max_open_streams']} | "
                       f"{_fmt(f['gap_ms']['p99'])} | {_fmt(f['gap_ms']['max'])} | {f['relay_rss_idle_mb']} → "
                       f"{f['rss_at_most_open_mb']} → {f['relay_rss_peak_mb']} | {f['kb_per_stream']} |")
        out.append("")
    if "W4" in w:
        p = w["W4"]["params"]
        out += [f"## W4 slow readers ({p['readers']} clients reading {p['read']}; the model writes {p['tokens']} "
                f"tokens with no delay; {p['seconds']:g} s; other load {w['W4']['other_cpu_cores']} cores)", "",
                "| route | answer KB | tokens read | upstream streams finished | relay RSS idle → peak MB | "
                "KB per slow stream |", "|---|---|---|---|---|---|"]
        for name, f in w["W4"]["results"].items():
            out.append(f"| {name} | {f['answer_kb']} | {f['tokens_read']} | {f['upstream_finished']} | "
                       f"{f['relay_rss_idle_mb']} → {f['relay_rss_peak_mb']} | {f['kb_per_slow_stream']} |")
        out.append("")
        if w["W4"].get("stalled"):
            out += [f"Readers that send their request and never read, against a relay with "
                    f"TOKENRELAY_SEND_TIMEOUT={p.get('send_timeout', 0):g}:", "",
                    "| route | readers | dropped | after s | upstream requests closed | relay RSS idle → stalled → after MB |",
                    "|---|---|---|---|---|---|"]
            for name, f in w["W4"]["stalled"].items():
                out.append(f"| {name} | {f['readers']} | {f['dropped']} | {f['dropped_after_s']} | {f['upstream_closed']} | "
                           f"{f['relay_rss_idle_mb']} → {f['relay_rss_stalled_mb']} → {f['relay_rss_after_mb']} |")
            out.append("")
    if "W5" in w:
        p = w["W5"]["params"]
        out += [f"## W5 --workers scaling ({p['route']}, W2 at c={p['concurrency']}, {p['cores']} cores shared with "
                f"the load generator and the simulator; other load {w['W5']['other_cpu_cores']} cores)", "",
                f"Simulator: {p.get('sim_pinned') or 'not pinned'}.", "",
                "| workers | processes | tokens/s | relay CPU s per million tokens | relay CPU % | simulator CPU % |",
                "|---|---|---|---|---|---|"]
        for label, f in w["W5"]["results"].items():
            out.append(f"| {label} | {f['processes']} | {f['tokens_per_s']:.0f} | {f['cpu_s_per_mtok']} | "
                       f"{f['relay_cpu_pct']} | {f['sim_cpu_pct']} |")
        out += ["", f"Scaling: {_fmt(w['W5']['scaling'])}×.", ""]
    if w.get("W6", {}).get("results"):
        p = w["W6"]["params"]
        r = w["W6"]["results"]
        cs = [str(c) for c in p["concurrency"]]
        out += [f"## W6 resumable streams on Redis (the SSE route on two fresh relays, its streams in memory and "
                f"on a real redis-server; other load {w['W6']['other_cpu_cores']} cores)", "",
                f"Time to first token: {p['pairs']} sequential pairs, the two relays alternating first. Latency "
                f"under load: {p['w1']}, one wave. Throughput: {p['tokens']} tokens per stream with no delay, "
                f"{p['seconds_each']:g} s at each concurrency. Redis calls: commands the relay sent, counted by "
                f"Redis's MONITOR in windows of their own (it slows Redis); commands: every command Redis ran, "
                f"those inside the relay's scripts included (INFO commandstats, in the CPU windows).", "",
                "| streams kept | TTFT p50 ms | under load: TTFT p99 ms, gap p99 ms | "
                + " | ".join(f"c={c}: CPU s per million tokens · Redis calls · commands per piece" for c in cs)
                + " |", "|---|---|---|" + "---|" * len(cs)]
        for k, f in r.items():
            cells = [f"{_fmt(f[c]['cpu_s_per_mtok'], 1)} · {_fmt(f[c].get('redis_calls_per_piece'), 3)} · "
                     f"{_fmt(f[c]['redis_commands_per_piece'], 3)}" for c in cs]
            out.append(f"| {k} | {_fmt(f['ttft_ms_p50'], 3)} | {_fmt(f['w1']['ttft_ms']['p99'])}, "
                       f"{_fmt(f['w1']['gap_ms']['p99'])} | " + " | ".join(cells) + " |")
        counts = w["W6"]["redis_connections"]
        out += ["", "Redis's connected clients while one stream runs, by readers attached to it: "
                + ", ".join(f"{n} → {c}" for n, c in counts.items()) + ".", ""]
    out += ["## Commands", ""] + [f"- {name}: `{cmd}`" for name, cmd in results["commands"].items()] + [""]
    return "\n".join(out)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w2 = results["workloads"].get("W2")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if w2:
        cs = w2["params"]["concurrency"]
        for name, by_c in w2["results"].items():
            ttft = [by_c[str(c)]["ttft_ms_p50"] for c in cs]
            tps = [by_c[str(c)]["tokens_per_s"] for c in cs]
            style = "-" if name.startswith(("tokenrelay", "direct")) else "--"
            ax1.plot(cs, [t if t is not None else float("nan") for t in ttft], style, marker="o", label=name)
            ax2.plot(cs, tps, style, marker="o", label=name)
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_xlabel("concurrent streams")
            ax.grid(True, alpha=0.3)
        ax1.set_yscale("log")
        ax1.set_ylabel("time to first token, median (ms)")
        ax2.set_ylabel("tokens/s, all streams")
        ax2.legend(fontsize=7, loc="best")
        ax1.set_title(f"W2: TTFT ({w2['params']['tokens']} tokens/stream, no delay)", fontsize=9)
        ax2.set_title("W2: throughput", fontsize=9)
    fig.suptitle(f"tokenrelay benchmark {results['date'][:10]} — {results['machine']['cores']} cores, "
                 "one box", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def readme_table(results: dict[str, Any], md_name: str) -> str:
    """The README's short table: the goals of the latest full run."""
    return "\n".join([
        README_START,
        f"Latest full run ({results['date'][:10]}, {results['machine']['cores']} cores shared by load generator, "
        f"simulator and relay; details in [bench/results/{md_name}](bench/results/{md_name})):",
        "",
        goals_table(results),
        README_END,
    ])


def update_readme(readme: Path, results: dict[str, Any], md_name: str) -> bool:
    """Replace the table between the markers; False when the README has no markers."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    readme.write_text(head + readme_table(results, md_name) + tail)
    return True
