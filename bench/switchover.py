"""What a container's switchover costs beside its memory, by runtime, against what livemig
expected before the freeze: the figures behind options.RATES.per_container and beside_trial
(source/downtime.py's switchover).

    python -m bench.switchover                      every workload, twice each way
    python -m bench.switchover --workloads runc postgres --reps 3

Each workload starts on lab host a with little memory, so that what its downtime measures is
the switchover itself: its runtime's pause and checkpoint, its restore (namespaces, mounts,
network made again), the requests around them and its resume.
- runc, crun: memcounter (64 MiB) in a runc or crun container on the host's network;
- runc-own-network: the held-connection server in a runc container in a network namespace of
  its own, on a macvlan link (its network made again, and kept quiet until it runs: quiet.py);
- podman: the same server in a podman container on a macvlan network, as bench.clients starts it;
- postgres: Debian's PostgreSQL in a runc container whose user and network namespaces are its
  own (tests/services.py), as bench.clients moves it.
Each is moved a -> b -> a, --reps times, each move after a dry run the same way (which takes the
trial, where the runtime has one: trial_freeze_seconds and trial_restore_seconds). A sample is
one move: livemig's downtime and its parts, the estimate its report kept, and its dry run's
trial and estimate.

It writes bench/results/<UTC date>-switchover.json (every sample, and per workload the
median and largest downtime, the largest of the downtime less its trial's freeze and restore,
and the largest estimate over measured and smallest) and prints a table of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tests import services as sv
from tests.lab import Lab

from . import clients
from .output import machine

TOOL = clients.CONTAINER_TOOL
WORKLOADS = ("runc", "crun", "runc-own-network", "podman", "postgres")
ADDRESS, MAC, PORT = clients.PODMAN["address"], "02:42:c6:12:00:96", clients.PODMAN["port"]


def start(lab: Lab, workload: str) -> list[str]:
    """The workload on a: what names it to livemig (podman's and PostgreSQL's as bench.clients
    starts them)."""
    if workload in ("podman", "postgres"):
        return clients.start(lab, workload)
    name = f"sw-{workload}"
    if workload in ("runc", "crun"):
        lab.run("a", ["python3", TOOL, "memcounter", "--runtime", workload, "--name", name, "--bundle",
                      f"/var/lib/ctr/{name}", "--mib", "64", "--dirty-mibps", "0", "--port", "7931"])
    else:
        lab.run("a", ["python3", TOOL, "linked", "--runtime", "runc", "--name", name, "--bundle",
                      f"/var/lib/ctr/{name}", "--ip", f"{ADDRESS}/24", "--mac", MAC, "--port", str(PORT)])
    time.sleep(1)       # listening
    return [name]


def stop(lab: Lab, workload: str, what: list[str]) -> None:
    for h in ("a", "b"):
        if workload == "podman":
            lab.run(h, [*clients.PODMAN_ENV, "podman", "rm", "--force", what[0]], check=False)
            lab.run(h, [*clients.PODMAN_ENV, "podman", "network", "rm", "--force", clients.PODMAN["network"]],
                    check=False)
        else:
            lab.run(h, ["crun" if workload == "crun" else "runc", "delete", "--force", what[0]], check=False)
            lab.run(h, ["rm", "-rf", f"/var/lib/ctr/{what[0]}"], check=False)
    if workload == "postgres":
        sv.clear(lab)


def livemig(lab: Lab, src: str, dst: str, what: list[str], *flags: str) -> dict:
    res = lab.run(src, [*clients.PODMAN_ENV, "livemig", "move", "--json", *flags, *what, dst], check=False, timeout=900)
    report = json.loads(res.stdout) if res.stdout.strip().startswith(b"{") else {}
    if res.returncode != 0:
        report["failed"] = res.stderr.decode(errors="replace").strip()[-300:]
    return report


def run(lab: Lab, workload: str, reps: int) -> list[dict]:
    samples = []
    lab.run("c", ["ip", "neigh", "flush", "to", ADDRESS], check=False)
    what = start(lab, workload)
    try:
        for i in range(reps * 2):
            src, dst = ("a", "b") if i % 2 == 0 else ("b", "a")
            plan = livemig(lab, src, dst, what, "--dry-run")
            moved = livemig(lab, src, dst, what)
            samples.append({
                "workload": workload, "move": i, "from": src, "to": dst, "failed": moved.get("failed", ""),
                "mode": moved.get("mode"), "downtime_seconds": moved.get("downtime_seconds"),
                "downtime_parts": moved.get("downtime_parts", []),
                "expected_downtime_seconds": moved.get("expected_downtime_seconds"),
                "plan_expected_downtime_seconds": plan.get("expected_downtime_seconds"),
                "trial": plan.get("trial"), "trial_freeze_seconds": plan.get("trial_freeze_seconds"),
                "trial_restore_seconds": plan.get("trial_restore_seconds"), "report": moved})
            if moved.get("failed"):
                break
    finally:
        stop(lab, workload, what)
    return samples


def summary(samples: list[dict]) -> dict:
    out = {}
    for w in dict.fromkeys(s["workload"] for s in samples):
        ok = [s for s in samples if s["workload"] == w and not s["failed"] and s["downtime_seconds"]]
        if not ok:
            out[w] = {"moved": 0}
            continue
        down = [s["downtime_seconds"] for s in ok]
        tried = [s["downtime_seconds"] - s["trial_freeze_seconds"] - s["trial_restore_seconds"] for s in ok
                 if s["trial_freeze_seconds"] is not None and s["trial_restore_seconds"] is not None]
        ratio = [s["expected_downtime_seconds"] / s["downtime_seconds"] for s in ok if s["expected_downtime_seconds"]]
        out[w] = {"moved": len(ok), "of": len([s for s in samples if s["workload"] == w]),
                  "downtime_median": statistics.median(down), "downtime_max": max(down),
                  "beside_trial_max": max(tried) if tried else None,
                  "estimate_over_measured_min": min(ratio) if ratio else None,
                  "estimate_over_measured_max": max(ratio) if ratio else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.switchover")
    ap.add_argument("--workloads", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--reps", type=int, default=2, help="moves each way")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    run_on = machine()
    lab = Lab.up(3)
    samples: list[dict] = []
    for workload in a.workloads:
        samples += run(lab, workload, a.reps)
    result = {"args": vars(a), "machine": run_on, "summary": summary(samples), "samples": samples}
    out = Path(a.out) / f"{time.strftime('%Y-%m-%dT%H-%M-%S', time.gmtime())}-switchover.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| workload | moved | downtime median | max | beside its trial, max | estimate / measured |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for w, s in result["summary"].items():
        if not s.get("moved"):
            print(f"| {w} | 0 | | | | |")
            continue
        beside = f"{s['beside_trial_max'] * 1000:.0f} ms" if s["beside_trial_max"] is not None else "no trial"
        print(f"| {w} | {s['moved']}/{s['of']} | {s['downtime_median'] * 1000:.0f} ms | {s['downtime_max'] * 1000:.0f} ms "
              f"| {beside} | {s['estimate_over_measured_min']:.2f} to {s['estimate_over_measured_max']:.2f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
