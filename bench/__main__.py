"""The downtime benchmark: livemig against the seeds' procedure and a skilled hand, side by side.

    python -m bench                        the full matrix (sizes 64, 512, 2048 MiB x dirty 0, 10, 100 MiB/s, 3 reps)
    python -m bench --quick                one size, one rep: what CI runs to keep this working
    python -m bench --sizes 64,512 --dirty 0,10 --reps 5 --containers ""
    python -m bench --max-bandwidth 50M    every contender within one cap (livemig's own, scp -l)
    python -m bench --sizes 1024 --dirty 10 --procs 1,10,40 --containers ""   cost against the process count
    python -m bench --sizes 512 --dirty 10 --links unshaped,1g,100m --containers ""   on shaped links

It brings the namespaced lab up, measures the link and CRIU's floor, then for each
repetition and scenario starts one workload and moves it back and forth between the hosts,
once per contender, in an order that rotates each repetition. The workload is memcounter,
as a bare process at every size (with --procs, also as a tree of N processes holding the same
memory between them, each dirtying its share) and, at the --containers sizes, in a runc container. It writes
bench/results/<date>.json (every raw figure), .md (the table) and .png (the plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from livemig.wire.bandwidth import parse_rate
from tests.lab import Lab

from . import limits, link, output
from .contenders import CONTENDERS, FOR_CONTAINERS, SIDE, Sample

WORKLOAD_PID = 4343   # a bare process restores onto its own PID: one free on both hosts


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB, dirty 10 MiB/s, one rep")
    ap.add_argument("--sizes", default="64,512,2048", help="workload sizes in MiB (default 64,512,2048)")
    ap.add_argument("--dirty", default="0,10,100", help="dirty rates in MiB/s (default 0,10,100)")
    ap.add_argument("--containers", default="512",
                    help="sizes in MiB at which memcounter also runs in a runc container (default 512; '' for none)")
    ap.add_argument("--procs", default="1",
                    help="process counts: the same memory and dirty rate spread over a tree of N processes, a parent "
                         "and N - 1 children (default 1; e.g. 1,10,40)")
    ap.add_argument("--links", default="unshaped",
                    help=f"link profiles to run on, in turn (default unshaped; of: {', '.join(link.PROFILES)}; "
                         "see bench/link.py)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every scenario (default 3)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"which, comma-separated (default all: {', '.join(CONTENDERS)})")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where results go")
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    ap.add_argument("--max-bandwidth", metavar="RATE",
                    help="every contender within this many bytes a second: livemig's --max-bandwidth, scp -l "
                         "for the seeds (K, M, G: powers of 1024; default: no cap)")
    a = ap.parse_args(argv)
    try:
        cap = parse_rate(a.max_bandwidth) if a.max_bandwidth else None
    except ValueError as e:
        print(f"bench: --max-bandwidth: {e}", file=sys.stderr)
        return 2
    sizes = [int(x) for x in _floats("64" if a.quick else a.sizes)]
    dirty = _floats("10" if a.quick else a.dirty)
    in_containers = [int(x) for x in _floats("64" if a.quick else a.containers)]
    procs = [int(x) for x in _floats("1" if a.quick else a.procs)]
    if not procs or min(procs) < 1 or any(mib < n for mib in sizes for n in procs):
        print("bench: --procs: counts of 1 or more, and no more than the smallest size's MiB", file=sys.stderr)
        return 2
    reps = 1 if a.quick else a.reps
    names = [n.strip() for n in a.contenders.split(",")]
    links = [n.strip() for n in ("unshaped" if a.quick else a.links).split(",")]
    if unknown_link := next((n for n in links if n not in link.PROFILES), None):
        print(f"bench: no link profile {unknown_link!r} (there are: {', '.join(link.PROFILES)})", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        print(f"bench: no contender {unknown[0]!r} (there are: {', '.join(CONTENDERS)})", file=sys.stderr)
        return 2

    started = time.strftime("%Y-%m-%dT%H-%M-%S")
    lab = Lab.up(2)
    samples: list[Sample] = []
    by_link: dict[str, dict] = {}
    try:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        run_on = output.machine()

        def result_of(samples: list[Sample]) -> dict:
            return {"started": started, "machine": run_on, "lab": "netns", "quick": a.quick, "max_bandwidth": cap,
                    "sizes_mib": sizes, "procs": procs, "links": links, "container_sizes_mib": in_containers,
                    "dirty_mibps": dirty, "reps": reps, "contenders": names, "limits": by_link[links[0]],
                    "limits_by_link": by_link, "samples": [dataclasses.asdict(s) for s in samples]}
        scenarios = ([("process", mib, rate, n) for mib in sizes for rate in dirty for n in procs]
                     + [("runc", mib, rate, 1) for mib in in_containers for rate in dirty])
        for name in links:
            link.shape(lab, link.PROFILES[name])
            try:
                print(f"measuring the link ({name}) and CRIU's floor...", file=sys.stderr)
                lim = limits.measure(lab, "a", "b", probe_mib=64 if a.quick else 256, procs=tuple(procs))
                by_link[name] = dataclasses.asdict(lim)
                print(f"  ssh {lim.ssh_mibps:.0f} MiB/s, tcp {lim.tcp_mibps:.0f} MiB/s, a round trip over ssh "
                      f"{lim.rtt_ms:.1f} ms, criu dump+restore of an empty process {lim.criu_floor * 1000:.0f} ms"
                      + "".join(f", of {n} {lim.criu_floor_by_procs[str(n)] * 1000:.0f} ms" for n in procs if n > 1),
                      file=sys.stderr)
                # written after every scenario: a run that dies late keeps what it measured
                samples += run_matrix(lab, names, scenarios, reps, cap, link=name,
                                      on_scenario=lambda done, before=list(samples):
                                      output.write_json(result_of(before + done), out / started))
            finally:
                link.unshape(lab)
    finally:
        if not a.keep:
            Lab.down()
    result = result_of(samples)
    paths = output.write(result, out / started)
    print(output.table(result))
    print("\n" + "\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
    failed = [s for s in samples if not s.ok]
    for s in failed:
        print(f"bench: {s.contender} at {s.mib} MiB ({s.workload}), {s.dirty_mibps} MiB/s, rep {s.rep} failed: "
              f"{s.error or 'the workload lost its state'}", file=sys.stderr)
    return 1 if failed else 0


def run_matrix(lab: Lab, names: list[str], scenarios: list[tuple[str, int, float, int]], reps: int,
               max_bandwidth: int | None = None, on_scenario=None, link: str = "unshaped") -> list[Sample]:
    """Every contender on every scenario (workload kind, MiB, dirty MiB/s, processes), reps
    times, each within max_bandwidth bytes a second if given, on the link profile named (shaped
    already); on_scenario(samples so far) after each."""
    samples = []
    for rep in range(reps):
        for kind, mib, rate, procs in scenarios:
            order = names[rep % len(names):] + names[:rep % len(names)]   # no contender always first
            # ... but CRIU lazy by hand last: when it runs out of time (HAND_FETCH_LIMIT)
            # the scenario ends there, and nobody else's run is lost with it
            order = [n for n in order if n != "lazy by hand"] + [n for n in order if n == "lazy by hand"]
            if kind == "runc":
                order = [n for n in order if n in FOR_CONTAINERS]
                work = lab.start_container_workload("a", mib=mib, dirty_mibps=rate)
            else:      # a tree: each process its share of the memory and of the dirtying
                work = lab.start_workload("a", mib=mib // procs, dirty_mibps=rate / procs, pid=WORKLOAD_PID,
                                          children=procs - 1)
            label = kind if procs == 1 else f"{procs} processes"
            where = "a"
            try:
                time.sleep(1)
                for name in order:
                    there = "b" if where == "a" else "a"
                    s = Sample(name, mib, rate, rep, workload=label, procs=procs, link=link, max_bandwidth=max_bandwidth)
                    print(f"rep {rep + 1}/{reps}, {link}, {mib} MiB ({label}), {rate:g} MiB/s: {name} {where} -> {there}",
                          file=sys.stderr)
                    try:
                        CONTENDERS[name](lab, work, where, there, s)
                    except Exception as e:  # noqa: BLE001 - one failed run is a figure too: recorded, not fatal
                        s.error = f"{type(e).__name__}: {e}"[:300]
                    samples.append(s)
                    print(f"  app-seen downtime {s.downtime_app * 1000:.0f} ms, total {s.total:.2f} s, "
                          f"{s.bytes_wire / 2**20:.1f} MiB on the wire" + ("" if s.ok else "  FAILED"),
                          file=sys.stderr)
                    if not s.ok:
                        break      # where the workload is now is not known for sure
                    where = there
                    time.sleep(0.5)
            finally:
                _remove(lab, work)
            if on_scenario:
                on_scenario(samples)
    return samples


def _remove(lab: Lab, work) -> None:
    """Gone for good from both hosts: the next scenario's workload needs its PID, its port
    and its container's name."""
    for h in ("a", "b"):
        if work.container:
            lab.run(h, ["runc", "delete", "--force", work.container], check=False)
            lab.run(h, ["rm", "-rf", work.bundle], check=False)
        else:
            lab.run(h, ["kill", "-9", str(work.pid)], check=False)
            if work.children:       # its children, whose argv is the root's (forked, never exec'd)
                lab.run(h, ["pkill", "-9", "-f", f"memcounter.py run .*--port {work.port} "], check=False)
            lab.run(h, ["python3", SIDE, "wait-exit", str(work.pid), "60"], check=False)
        for port in range(work.port, work.port + work.children + 1):
            lab.run(h, ["python3", SIDE, "wait-free", str(port), "60"], check=False)


if __name__ == "__main__":
    sys.exit(main())
