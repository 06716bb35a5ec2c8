"""What CRIU's stack-pointer slip (livemig/pages/relazy.py) costs a move's downtime. The same
process is moved twice side by side in each run: once with a thread that waits with its stack
pointer on a page boundary (`memcounter --aligned-sp`: CRIU's lazy dump then writes all of its
memory into the images), and once without one.

    python -m bench.slip                      1024 MiB, --mode postcopy, 3 runs
    python -m bench.slip --mib 512 --mode hybrid --runs 5

Each sample is a fresh memcounter on a, moved to b with `livemig move --json`, its memory
checked there. It writes bench/results/<date>-slip.json: every sample (the report's downtime
and its parts, expected_downtime_seconds, relazied_bytes, images_in_memory_bytes,
image_files_bytes) and, per run, the slipping process's downtime over the plain one's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tests.lab import WORKLOAD, Lab

KEPT = ("mode", "downtime_seconds", "expected_downtime_seconds", "relazied_bytes", "images_in_memory_bytes",
        "image_files_bytes", "postcopy_pages")


def sample(lab: Lab, i: int, mib: int, mode: str, aligned: bool) -> dict:
    pid, port = 5800 + i, 7950 + i
    lab.run("a", ["python3", WORKLOAD, "run", "--daemon", "--pid", str(pid), "--port", str(port), "--mib", str(mib),
                  "--dirty-mibps", "8", "--hot-mib", "32", *(["--aligned-sp"] if aligned else [])], timeout=300)
    try:
        time.sleep(1)       # its thread waits in pause() by now
        res = lab.run("a", ["livemig", "move", "--pid", str(pid), "--json", "--mode", mode, "b"], check=False,
                      timeout=900)
        error = "" if res.returncode == 0 else res.stderr.decode().strip().splitlines()[-1]
        report = json.loads(res.stdout) if res.stdout.strip() else {}
        verified = {} if error else json.loads(lab.text("b", ["python3", WORKLOAD, "query", "verify",
                                                                "--port", str(port), "--wait", "10"]))
    finally:
        for h in ("a", "b"):
            lab.run(h, ["pkill", "-KILL", "-f", f"memcounter.py run .*--port {port} "], check=False)
    return {"aligned_sp": aligned, "mib": mib, "error": error,
            "memory_ok_after": verified.get("bad_pages") == 0 and verified.get("pages") == mib * 256,
            **{k: report.get(k) for k in KEPT},
            "downtime_parts": {d["name"]: d["seconds"] for d in report.get("downtime_parts", [])}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.slip", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--mode", default="postcopy", choices=["postcopy", "hybrid", "precopy"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    lab = Lab.up(2)
    samples: list[dict] = []
    try:
        for run in range(a.runs):
            for aligned in (True, False):
                samples.append({"run": run, **sample(lab, len(samples), a.mib, a.mode, aligned)})
                print(json.dumps(samples[-1]), flush=True)
    finally:
        Lab.down()
    ratios = []
    for run in range(a.runs):
        slip, plain = (next(s for s in samples if s["run"] == run and s["aligned_sp"] is x) for x in (True, False))
        if slip["downtime_seconds"] and plain["downtime_seconds"]:
            ratios.append(slip["downtime_seconds"] / plain["downtime_seconds"])
    result = {"args": vars(a), "samples": samples, "slip_over_plain_downtime": ratios,
              "slip_over_plain_downtime_median": statistics.median(ratios) if ratios else None}
    path = Path(a.out) / f"{time.strftime('%Y-%m-%dT%H-%M-%S')}-slip.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for s in samples:
        print(f"run {s['run']} {'aligned sp' if s['aligned_sp'] else 'plain':10} "
              + (f"downtime {s['downtime_seconds'] * 1000:6.0f} ms (expected {s['expected_downtime_seconds'] * 1000:.0f})"
                 f"  relazied {(s['relazied_bytes'] or 0) >> 20} MiB  parts {s['downtime_parts']}"
                 if not s["error"] else f"failed: {s['error']}"))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
