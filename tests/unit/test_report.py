"""The report: its JSON keeps every figure, its summary reads as a sentence."""

import json

from livemig.report import Report, RoundReport


def test_json_has_every_field_and_the_compression_ratio_per_round():
    r = Report(pid=42, source="a", target="b", mode="stopcopy", mode_reason="no soft-dirty",
               outcome="moved", downtime_seconds=0.5, target_pid=42)
    r.rounds.append(RoundReport("dump", pages_written=1000, bytes_raw=4_096_000, bytes_wire=1_024_000,
                                frozen_seconds=0.4, seconds=0.45))
    d = json.loads(r.to_json())
    assert d["mode"] == "stopcopy" and d["outcome"] == "moved" and d["downtime_seconds"] == 0.5
    assert d["rounds"][0]["compression_ratio"] == 4.0 and d["rounds"][0]["pages_written"] == 1000
    for key in ("mode_reason", "precopy_stop_reason", "final_dump_frozen_seconds", "restore_seconds",
                "total_seconds", "warnings", "error", "failed_phase"):
        assert key in d


def test_summary_names_the_outcome_and_the_downtime():
    r = Report(pid=42, source="a", target="b", mode="postcopy", outcome="moved", downtime_seconds=0.136,
               target_pid=42)
    assert r.summary().splitlines()[0] == "moved: PID 42 a -> b, mode postcopy"
    assert "downtime 136 ms" in r.summary()
    failed = Report(pid=42, source="a", target="b", outcome="rolled back", error="boom", failed_phase="restore")
    assert "error in restore: boom" in failed.summary()
