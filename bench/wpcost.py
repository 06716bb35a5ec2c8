"""What pre-copy's watching costs the workload, side by side in one run: a writer watched by
write-protection (livemig/pages/wptrack.py), by page hashes, and not at all (bench/wpwatch.py,
on lab host a).

    .venv/bin/python -m bench.wpcost [--mib 2048] [--seconds 10] [--reps 3]

Two writers each repetition: one as fast as it can (the worst case: it writes every page
again between two rounds, so each round's protection costs it a fault per page), and one at
10 MiB/s (2560 pages a second: the benchmark's dirtying workload). The slowdown is the
writes a second watched against unwatched, medians over the repetitions. It writes
bench/results/<UTC date>-wpcost.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tests.lab import Lab

from .output import machine

TOOL = "/opt/livemig/bench/wpwatch.py"
RATES = {"as fast as it can": 0, "10 MiB/s": 2560}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wpcost")
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    run_on = machine()
    lab = Lab.up()
    runs = []
    for rep in range(a.reps):
        for name, rate in RATES.items():
            out = json.loads(lab.text("a", ["python3", TOOL, str(a.mib), str(a.seconds), str(rate)],
                                      timeout=3600))
            runs += [{"rep": rep, "writer": name, **r} for r in out]
            print(rep, name, out, flush=True)
    table = []
    for name in RATES:
        base = statistics.median(r["writes_per_s"] for r in runs if r["writer"] == name and r["way"] == "none")
        for way in ("write-protect", "page hashes"):
            rate = statistics.median(r["writes_per_s"] for r in runs if r["writer"] == name and r["way"] == way)
            table.append({"writer": name, "watched by": way, "writes_per_s": rate, "unwatched_writes_per_s": base,
                          "slowdown": 1 - rate / base})
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime())
    path = Path(a.out) / f"{stamp}-wpcost.json"
    path.write_text(json.dumps({"machine": run_on, "mib": a.mib, "seconds": a.seconds, "reps": a.reps,
                                "runs": runs, "table": table}, indent=2) + "\n")
    print("| writer | watched by | writes/s | unwatched | slowdown |\n| --- | --- | --- | --- | --- |")
    for t in table:
        print(f"| {t['writer']} | {t['watched by']} | {t['writes_per_s']:.0f} | {t['unwatched_writes_per_s']:.0f} "
              f"| {t['slowdown']:.1%} |")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
