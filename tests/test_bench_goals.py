"""The benchmark's grader (bench/report.py): each goal of a full run decided from the figures
it names, nothing graded on a smaller run, and each goal's peers written once in the table."""

from __future__ import annotations

from typing import Any

from bench.report import check_targets, goals_table


def _results(sizes: str) -> dict[str, Any]:
    def w2(cpu: dict[str, float]) -> dict[str, Any]:
        return {c: {"cpu_s_per_mtok": v, "tokens_per_s": 1000.0} for c, v in cpu.items()}

    return {
        "sizes": sizes,
        "workloads": {
            "W0": {"results": {"tokenrelay-text": {"added_ttft_ms": {"p50": 0.35}},
                               "tokenrelay-sse": {"added_ttft_ms": {"p50": 0.45}},
                               "nginx": {"added_ttft_ms": {"p50": 0.08}}}},
            "W1": {"results": {"nginx": {"added_ttft_ms": {"p50": 0.1, "p99": 0.4}, "added_gap_ms": {"p99": 0.0}},
                               "tokenrelay-v1": {"added_ttft_ms": {"p50": 0.7, "p99": 2.5},
                                                 "added_gap_ms": {"p99": -0.5}}}},
            "W2": {"params": {"concurrency": [1, 16]},
                   "results": {"nginx": w2({"1": 10.0, "16": 8.0}),
                               "tokenrelay-text": w2({"1": 12.0, "16": 9.0}),
                               "tokenrelay-sse": w2({"1": 12.0, "16": 12.0})}},
            "W3": {"results": {"tokenrelay-sse ×10000": {"streams": 10000, "completed": 10000, "stalled_streams": 0,
                                                          "kb_per_stream": 21.5}}},
            "W5": {"params": {"workers": 2, "cores": 2}, "scaling": 0.9},
        },
    }



def test_a_full_run_grades_each_goal_on_its_own_figure() -> None:
    goals = check_targets(_results("full"))
    by = {(g["workload"], g["target"], g["goal"]): g for g in goals}
    assert by[("W0", "tokenrelay-text", "added median TTFT ≤ 0.4 ms")]["met"] is True
    assert by[("W0", "tokenrelay-sse", "added median TTFT ≤ 0.4 ms")]["met"] is False
    w1 = {g["goal"]: g["met"] for g in goals if g["workload"] == "W1"}
    assert w1 == {"added median TTFT ≤ nginx's added median + 0.5 ms": False,  # 0.7 > 0.1 + 0.5
                  "added p99 TTFT (median of the waves) ≤ 2 ms": False,
                  "inter-chunk gap p99 within 1 ms of direct": True}
    w2 = {g["target"]: g for g in goals if g["workload"] == "W2"}
    assert w2["tokenrelay-text"]["result"] == 1.2 and w2["tokenrelay-text"]["met"] is True  # worst of 1.2, 1.125
    assert w2["tokenrelay-sse"]["result"] == 1.5 and w2["tokenrelay-sse"]["met"] is False
    w3 = [g for g in goals if g["workload"] == "W3"]
    assert [g["met"] for g in w3] == [True, False]  # held, but 21.5 KB > 20
    [w5] = [g for g in goals if g["workload"] == "W5"]
    assert w5["met"] is None and w5["result"] == 0.9  # information only


def test_streams_the_simulator_alone_could_not_hold_are_not_graded() -> None:
    results = _results("full")
    results["workloads"]["W3"]["results"]["direct ×10000"] = {"streams": 10000, "completed": 10000,
                                                               "stalled_streams": 3510, "kb_per_stream": 21.5}
    held = next(g for g in check_targets(results) if g["goal"] == "10000 streams held, none stalled")
    assert held["met"] is None and "the simulator alone stalled 3510" in held["result"]


def test_a_quick_or_smoke_run_grades_nothing() -> None:
    for sizes in ("quick", "smoke"):
        goals = check_targets(_results(sizes))
        assert goals and all(g["met"] is None for g in goals)


def test_the_table_names_each_goal_and_its_peers_once() -> None:
    results = _results("full")
    results["goals"] = check_targets(results)
    table = goals_table(results)
    w0_rows = [line for line in table.splitlines() if "tokenrelay-text" in line or "tokenrelay-sse" in line]
    w0_rows = [row for row in w0_rows if "0.35" in row or "0.45" in row]
    assert len(w0_rows) == 2
    assert "nginx 0.08" in w0_rows[0] and "nginx" not in w0_rows[1]
    assert table.count("added median TTFT ≤ 0.4 ms") == 1
