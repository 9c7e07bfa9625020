"""``python -m bench``: run the benchmark (see bench/README.md)."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from .procs import ROOT
from .sizes import PRESETS


@click.command()
@click.option("--quick", "size", flag_value="quick", help="A smaller run (about a minute).")
@click.option("--smoke", "size", flag_value="smoke", help="A seconds-long run that only proves the bench works.")
@click.option("--full", "size", flag_value="full", default=True,
              help="The full run (about 35 minutes with --peers on 2 cores).  [default]")
@click.option("--peers", is_flag=True, help="Also measure LiteLLM's proxy and Portkey's gateway (installed into "
              "bench/.peers/ on first use).")
@click.option("--before", multiple=True, metavar="GITREF",
              help="Also run tokenrelay as of this git commit, side by side (targets @REF-text, @REF-sse, @REF-v1); "
                   "repeatable.")
@click.option("--targets", default=None, metavar="direct,tokenrelay-text,…",
              help="Measure only these targets (direct is always measured: it is the floor).")
@click.option("--only", default=None, metavar="W0,W2,…", help="Run only these workloads.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write <date>.md/.json/.png.  [default: bench/results for a full run, "
                   "bench/results/tmp otherwise]")
@click.option("--readme/--no-readme", default=None,
              help="Update the README's benchmark table.  [default: only for a full run into bench/results]")
def main(size: str, peers: bool, before: tuple[str, ...], targets: str | None, only: str | None, out_dir: Path | None, readme: bool | None) -> None:
    """Measure what tokenrelay adds to a stream: against the simulator directly, nginx, a
    minimal Starlette + httpx relay, and (--peers) LiteLLM and Portkey — workloads W0–W6."""
    from .report import update_readme, write_all
    from .run import WORKLOADS, Bench

    sizes = PRESETS[size]
    default_out = ROOT / "bench" / "results"
    if out_dir is None:
        out_dir = default_out if size == "full" else default_out / "tmp"
    workloads = tuple(w.strip().upper() for w in only.split(",")) if only else WORKLOADS
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise click.BadParameter(f"unknown workload(s) {', '.join(unknown)}", param_hint="--only")
    stem = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    if size != "full":
        stem += f"-{size}"

    def log(message: str) -> None:
        click.echo(message, err=True)

    started = time.monotonic()
    bench = Bench(sizes=sizes, out_dir=out_dir, log_dir=out_dir / "logs" / stem, with_peers=peers, before=before, only=workloads,
                  log=log)
    try:
        log(f"starting servers (logs in {bench.log_dir}) …")
        bench.start()
        if targets:
            keep = {"direct", *(t.strip() for t in targets.split(","))}
            unknown_targets = keep - set(bench.targets)
            if unknown_targets:
                raise click.BadParameter(f"no target(s) {', '.join(sorted(unknown_targets))} in this run "
                                         f"(there are: {', '.join(bench.targets)})", param_hint="--targets")
            bench.targets = {k: v for k, v in bench.targets.items() if k in keep}
        log("targets: " + ", ".join(bench.targets))
        results = _run(bench.run())
    finally:
        bench.stop()
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    results["command"] = "python -m bench " + " ".join(sys.argv[1:])
    paths = write_all(results, out_dir, stem)
    for kind, path in paths.items():
        log(f"{kind}: {path}")
    if readme if readme is not None else (size == "full" and out_dir == default_out):
        if update_readme(ROOT / "README.md", results, paths["md"].name):
            log("README.md: benchmark table updated")
    if size != "full":
        # Too small to decide a goal: it proves the bench runs and shows the figures.
        log(f"figures written in {results['wall_seconds']} s; goals are graded only on a full run")
        return
    met = sum(1 for g in results["goals"] if g["met"] is True)
    judged = sum(1 for g in results["goals"] if g["met"] is not None)
    log(f"{met} of {judged} goals met ({len(results['goals']) - judged} shown as information) "
        f"in {results['wall_seconds']} s")


def _run(coro):  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    main()
