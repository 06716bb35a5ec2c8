"""bench/drain.py's arithmetic: medians of the time to empty and of each workload's downtime,
over the runs that emptied the host whole; issue 29's ratios within one link, against the
sequential moves of the same run; and the table that says whether each goal is met."""

import pytest

from bench.drain import DRAIN, SEEDS, SEQUENTIAL, best, goals, ratios, summary, table

LIMITS = {"unshaped": {"ssh_mibps": 200.0, "tcp_mibps": 1000.0, "rtt_ms": 0.1}}


def sample(contender, seconds, downtimes, ok=True, rep=0, link="unshaped", memory_mib=1000, tool=None, ended=None):
    """downtimes: workload -> app-seen seconds; tool: the same as livemig says (default the app's)."""
    works = [{"name": w, "host": "b", "mib": 100, "downtime_app": d, "downtime_tool": (tool or downtimes)[w],
              "ended": (ended or {}).get(w, seconds), "ok": ok} for w, d in downtimes.items()]
    return {"contender": contender, "rep": rep, "link": link, "ok": ok, "error": "" if ok else "boom",
            "seconds": seconds, "drain_total_seconds": seconds if contender.startswith(DRAIN) else None,
            "drain_moving_seconds": seconds - 1 if contender.startswith(DRAIN) else None,
            "memory_bytes": memory_mib << 20, "wire_bytes": 500 << 20, "workloads": works}


def test_medians_over_the_runs_that_emptied_the_host_whole():
    rows = {r["contender"]: r for r in summary([
        sample(DRAIN, 10.0, {"dr1024": 0.2, "dr64": 0.1}, ended={"dr1024": 8.0, "dr64": 10.0}),
        sample(DRAIN, 12.0, {"dr1024": 0.4, "dr64": 0.3}, rep=1, ended={"dr1024": 8.0, "dr64": 12.0}),
        sample(DRAIN, 99.0, {"dr1024": 9.0, "dr64": 9.0}, ok=False, rep=2),
        sample(SEQUENTIAL, 20.0, {"dr1024": 0.2, "dr64": 0.1}),
    ])}
    d = rows[DRAIN]
    assert (d["runs"], d["failed"]) == (2, 1)               # the failed run counted, never averaged in
    assert d["seconds"] == (11.0, 10.0, 12.0)
    assert d["drain_moving_seconds"] == (10.0, 9.0, 11.0)
    assert d["downtime_app"]["dr1024"] == (pytest.approx(0.3), 0.2, 0.4)
    assert d["mean_off_seconds"] == (9.5, 9.0, 10.0)         # (8 + 10) / 2 and (8 + 12) / 2
    assert d["targets"] == {"dr1024": ["b"], "dr64": ["b"]}
    assert d["placed_mib"] == {"b": (200, 200, 200)}
    assert rows[SEQUENTIAL]["drain_total_seconds"] is None


def test_goals_are_ratios_to_the_sequential_moves_and_the_link_within_the_same_link():
    samples = [sample(DRAIN, 10.0, {"big": 0.30, "small": 0.10}, memory_mib=7000),
               sample(SEQUENTIAL, 20.0, {"big": 0.25, "small": 0.05}, tool={"big": 0.2, "small": 0.1}),
               sample(SEEDS, 40.0, {"big": 5.0, "small": 1.0}),
               # another link's sequential moves: never this link's baseline
               sample(SEQUENTIAL, 1.0, {"big": 9.0, "small": 9.0}, link="1g")]
    [r] = [x for x in ratios(summary(samples), LIMITS) if x["link"] == "unshaped"]
    assert r["over_sequential"] == 0.5
    assert r["over_link_tcp"] == 10.0 / (7000 / 1000.0) and r["over_link_scp"] == 10.0 / (7000 / 200.0)
    assert r["worst_over_alone_app"] == (2.0, "small")       # 0.10 / 0.05, not big's 1.2
    assert r["worst_over_alone_tool"] == (pytest.approx(1.5), "big")
    said = goals([r])
    assert "x0.50" in said[0] and ": met)" in said[0]
    assert "x1.43 (goal <= 1.3: NOT met); at scp's rate: x0.29 (met)" in said[1]     # 10 s against 7 s at TCP's rate
    assert "x2.00 (small)" in said[2] and "NOT met" in said[2]


def test_no_ratio_without_the_sequential_moves_and_only_drains_have_ratios():
    rat = ratios(summary([sample(DRAIN, 10.0, {"w": 0.1}), sample(SEEDS, 30.0, {"w": 3.0})]), LIMITS)
    assert [x["contender"] for x in rat] == [DRAIN]
    assert rat[0]["over_sequential"] is None and rat[0]["worst_over_alone_app"] is None
    assert "time to empty over the sequential `livemig move`s': - " in goals(rat)[0]


def test_the_table_has_a_row_per_contender_and_a_column_per_contender_per_workload():
    samples = [sample(DRAIN, 10.0, {"dr1024": 0.3}), sample(DRAIN, 14.0, {"dr1024": 0.5}, rep=1),
               sample(SEQUENTIAL, 20.0, {"dr1024": 0.25}), sample(SEEDS, 40.0, {"dr1024": 5.0})]
    text = table(samples, LIMITS)
    assert "Link unshaped: scp 200 MiB/s, plain TCP 1000 MiB/s" in text
    assert f"| {DRAIN} | 2 | 12.0 (10.0-14.0) | 12.0 (10.0-14.0) | 11.0 (9.0-13.0) | 12.0 (10.0-14.0) | 1000 | b 100 | 500 |" in text
    assert f"| {SEQUENTIAL} | 1 | 20.0 | - | - |" in text
    assert "| x0.60 | x12.00 | x2.40 | x1.60 dr1024 (x1.60 dr1024) |" in text
    assert "| dr1024 | 1024 | 8 | 400 (300-500) b | 250 b | 5000 b |" in text
    header = next(line for line in text.splitlines() if line.startswith("| contender"))
    rule = text.splitlines()[text.splitlines().index(header) + 1]
    assert header.count("|") == rule.count("|")
    assert "NOT met" in text       # x1.60 over alone


def test_best_names_the_drain_that_did_best_by_each_measure():
    rows = summary([sample(DRAIN, 12.0, {"w": 0.4}, ended={"w": 11.0}),
                    sample("drain --order smallest", 10.0, {"w": 0.6}, ended={"w": 4.0}),
                    sample("drain --parallel 1", 14.0, {"w": 0.2}, ended={"w": 7.0}),
                    sample(SEQUENTIAL, 20.0, {"w": 0.2})])
    [line] = best(rows, ratios(rows, LIMITS))
    assert line == ("unshaped: the least time to empty: drain --order smallest (10.00 s); the least mean time until "
                    "a workload is off: drain --order smallest (4.00 s); the least worst downtime over alone: "
                    "drain --parallel 1 (1.00)")
