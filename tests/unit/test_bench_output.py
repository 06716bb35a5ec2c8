"""The benchmark's arithmetic: medians with their spread, ratios to the seeds' procedure
from the same run only, and the client benchmark's percentiles."""

from bench.clients import percentile
from bench.output import summary, table


def sample(contender, downtime, ok=True, mib=64, dirty=10.0, rep=0):
    return {"contender": contender, "mib": mib, "dirty_mibps": dirty, "rep": rep, "ok": ok,
            "downtime_app": downtime, "downtime_tool": downtime, "total": downtime * 2, "bytes_raw": None,
            "bytes_wire": 1 << 20, "rounds": [], "peak_rss_bytes": None, "cpu_seconds": 0.5, "steps": {},
            "error": ""}


def result(samples):
    return {"limits": {"ssh_mibps": 100.0, "tcp_mibps": 1000.0, "criu_floor": 0.05, "probe_mib": 64},
            "contenders": ["seeds", "livemig postcopy"], "samples": samples}


def test_medians_spread_and_ratios_to_the_seeds_in_the_same_scenario():
    r = result([sample("seeds", 1.0), sample("seeds", 1.4, rep=1), sample("seeds", 1.2, rep=2),
                sample("livemig postcopy", 0.2), sample("livemig postcopy", 0.3, rep=1),
                sample("livemig postcopy", 9.0, ok=False, rep=2)])
    rows = {x["contender"]: x for x in summary(r)}
    assert rows["seeds"]["downtime_app"] == (1.2, 1.0, 1.4) and rows["seeds"]["less_downtime_than_seeds"] == 1.0
    # the failed run is counted as failed, never averaged in
    assert rows["livemig postcopy"]["runs"] == 2 and rows["livemig postcopy"]["failed"] == 1
    assert rows["livemig postcopy"]["less_downtime_than_seeds"] == 1.2 / 0.25
    assert rows["seeds"]["stopcopy_floor"] == 0.05 + 64 / 1000
    text = table(r)
    assert "| 64 | 10 | livemig postcopy (1 failed) | 250 (200-300) |" in text and "x4.8" in text


def test_no_ratio_without_a_baseline_in_that_scenario():
    rows = summary(result([sample("livemig postcopy", 0.2, mib=512), sample("seeds", 1.0, mib=64)]))
    assert next(x for x in rows if x["mib"] == 512)["less_downtime_than_seeds"] is None


def test_post_copy_fetch_rate_against_the_ssh_link_is_compared_on_the_wire():
    # scp's rate is of random bytes, on the wire; the pages compress 2:1 here, so the rate in
    # page bytes would read twice what the link gave
    fast = {**sample("livemig postcopy", 0.2), "fetch_seconds": 0.8, "fetch_bytes": 64 << 20,
            "fetch_wire_bytes": 32 << 20}
    slow = {**sample("livemig postcopy", 0.2, rep=1), "fetch_seconds": 1.6, "fetch_bytes": 64 << 20,
            "fetch_wire_bytes": 32 << 20}
    r = result([sample("seeds", 1.0), fast, slow])
    rows = {x["contender"]: x for x in summary(r)}
    assert rows["livemig postcopy"]["fetch_mibps"] == (30.0, 20.0, 40.0)
    assert rows["livemig postcopy"]["fetch_page_mibps"] == (60.0, 40.0, 80.0)
    assert rows["seeds"]["fetch_mibps"] is None     # nothing fetched after the resume
    assert "| 30 (30%) |" in table(r)


def test_a_container_is_its_own_scenario_with_its_own_baseline():
    boxed = [{**sample("seeds", 2.0), "workload": "runc"}, {**sample("livemig postcopy", 0.5), "workload": "runc"}]
    # the bare process's samples (older runs have no "workload" at all) do not mix in
    rows = summary(result([sample("seeds", 1.0), sample("livemig postcopy", 0.1), *boxed]))
    by = {(x["workload"], x["contender"]): x for x in rows}
    assert by[("runc", "livemig postcopy")]["less_downtime_than_seeds"] == 4.0
    assert by[("process", "livemig postcopy")]["less_downtime_than_seeds"] == 10.0
    assert "| runc | 64 | 10 | livemig postcopy | 500 |" in table(result(boxed))


def test_a_cut_s_cost_is_the_ratio_of_medians_cut_over_uncut():
    from bench.cut import ratios
    samples = [{"cut": c, "postcopy_seconds": t, "wire_bytes": w, "longest_wait_for_b_after": g}
               for c, t, w, g in [(False, 30, 100, 2), (False, 34, 100, 2), (True, 40, 110, 3), (True, 36, 130, 3)]]
    assert ratios(samples) == {"postcopy_seconds": 38 / 32, "wire_bytes": 120 / 100, "longest_wait_for_b_after": 1.5}


def test_the_client_benchmark_s_percentiles_are_nearest_rank():
    waits = [0.1 * i for i in range(1, 11)]
    assert (percentile(waits, 50), percentile(waits, 99), percentile([0.3], 99)) == (waits[4], waits[9], 0.3)


def test_a_tree_has_rows_of_its_own_with_its_own_baseline_floor_and_plot(tmp_path):
    from bench.output import plots
    tree = "40 processes"
    r = result([sample("seeds", 1.0), sample("livemig postcopy", 0.2),
                {**sample("seeds", 3.0), "workload": tree, "procs": 40},
                {**sample("livemig postcopy", 0.6), "workload": tree, "procs": 40}])
    r["limits"]["criu_floor_by_procs"] = {"40": 0.5}
    rows = {(x["workload"], x["contender"]): x for x in summary(r)}
    assert rows[(tree, "livemig postcopy")]["procs"] == 40
    assert rows[(tree, "livemig postcopy")]["less_downtime_than_seeds"] == 3.0 / 0.6     # its own baseline
    assert rows[(tree, "seeds")]["stopcopy_floor"] == 0.5 + 64 / 1000                   # a tree's CRIU floor
    assert rows[("process", "seeds")]["stopcopy_floor"] == 0.05 + 64 / 1000
    assert "| 40 processes | 64 | 10 | livemig postcopy | 600 |" in table(r)
    made = plots(r, tmp_path / "run")
    assert [p.name for p in made] == ["run-downtime.png", "run-rounds.png", "run-procs.png"]
    assert all(p.stat().st_size > 0 for p in made)


def test_each_link_profile_has_its_own_rows_baseline_and_limits():
    r = result([sample("seeds", 1.0), sample("livemig postcopy", 0.2),
                {**sample("seeds", 8.0), "link": "100m"}, {**sample("livemig postcopy", 0.4), "link": "100m"}])
    r["links"] = ["unshaped", "100m"]
    r["limits_by_link"] = {"unshaped": r["limits"], "100m": {**r["limits"], "ssh_mibps": 11.0, "tcp_mibps": 11.5,
                                                            "rtt_ms": 20.4}}
    rows = {(x["link"], x["contender"]): x for x in summary(r)}
    assert rows[("100m", "livemig postcopy")]["less_downtime_than_seeds"] == 8.0 / 0.4     # its own link's seeds
    assert rows[("100m", "seeds")]["stopcopy_floor"] == 0.05 + 64 / 11.5                   # its own link's rate
    text = table(r)
    assert "Link 100m: ssh (scp) 11 MiB/s, plain TCP 12 MiB/s, a round trip over ssh 20.4 ms" in text
    assert "| 100m | process | 64 | 10 | livemig postcopy | 400 |" in text
