"""What the trial restore (livemig/trial.py) costs the workload, by its memory: the freeze its
dump takes (the report's trial_freeze_seconds, the time CRIU's dump ran: an upper bound), the
longest stall the workload itself lived through meanwhile (memcounter notes each over 50 ms),
and the target's restore, thrown away; on lab hosts a -> b, each a dry run (which always tries).

    .venv/bin/python -m bench.trial [--mib 256,1024,2048] [--reps 3]

Whether a move runs the trial by default was to rest on its freeze at 2 GiB: over 50 ms, it
is asked for (--trial). The workload dirties 10 MiB/s, as the benchmark's does. It writes
bench/results/<UTC date>-trial.json and prints a table (medians over the repetitions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tests.lab import Lab

from .output import machine


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trial")
    ap.add_argument("--mib", default="256,1024,2048")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    run_on = machine()
    lab = Lab.up()
    runs = []
    for mib in (int(x) for x in a.mib.split(",")):
        work = lab.start_workload("a", mib=mib, dirty_mibps=10, pid=5901, port=7901)
        try:
            for rep in range(a.reps):
                since = float(lab.text("a", ["date", "+%s.%N"]))
                res = lab.run("a", ["livemig", "move", "--json", "--dry-run", "--pid", str(work.pid), "b"],
                              timeout=600)
                plan = json.loads(res.stdout)
                time.sleep(0.2)     # (a stall is noted once it is over)
                runs.append({"mib": mib, "rep": rep, "trial": plan["trial"],
                             "freeze_s": plan["trial_freeze_seconds"], "restore_s": plan["trial_restore_seconds"],
                             "stall_s": work.stall_between("a", since)})
                print(runs[-1], flush=True)
        finally:
            lab.run("a", ["kill", str(work.pid)], check=False)
            lab.run("a", ["sh", "-c", f"while kill -0 {work.pid} 2>/dev/null; do sleep 0.05; done"], check=False)
    table = []
    for mib in sorted({r["mib"] for r in runs}):
        mine = [r for r in runs if r["mib"] == mib]
        table.append({"mib": mib, **{k: statistics.median(r[k] for r in mine)
                                     for k in ("freeze_s", "stall_s", "restore_s")},
                      "freeze_max_s": max(r["freeze_s"] for r in mine)})
    stem = Path(a.out) / time.strftime("%Y-%m-%dT%H-%M-%S-trial", time.gmtime())
    path = stem.with_suffix(".json")
    path.write_text(json.dumps({"machine": run_on, "reps": a.reps, "runs": runs, "table": table}, indent=2) + "\n")
    print("| memory | trial freeze (median, max) | longest stall seen by the workload | trial restore |\n"
          "| --- | --- | --- | --- |")
    for t in table:
        stall = f"{t['stall_s'] * 1000:.0f} ms" if t["stall_s"] else "none over 50 ms"
        print(f"| {t['mib']} MiB | {t['freeze_s'] * 1000:.0f} ms, {t['freeze_max_s'] * 1000:.0f} ms | {stall} "
              f"| {t['restore_s'] * 1000:.0f} ms |")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
