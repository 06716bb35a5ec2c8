"""The ways a workload gets from one lab host to the other, each measured the same way.

A contender moves a running memcounter (tests/workloads/memcounter.py) from src to dst
and returns a Sample. What the application saw (the longest stall it lived through)
comes from the workload itself; bytes on the wire from the source host's network
counters, so that every contender is counted alike, SSH's own overhead included.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field

from tests.lab import Lab, Workload, by_hand

SIDE = "/opt/livemig/bench/lab_side.py"
LAZY_PORT = 27000


@dataclass
class Sample:
    contender: str
    mib: int
    dirty_mibps: float
    rep: int
    workload: str = "process"          # or "runc": memcounter in a runc container; "N processes": a tree
    procs: int = 1                     # processes sharing the memory and the dirtying: a parent, procs - 1 children
    link: str = "unshaped"             # the link profile it ran on (bench/link.py)
    ok: bool = False                   # the workload runs on dst, counter on, memory intact
    downtime_app: float = 0.0          # the longest stall the workload lived through
    downtime_tool: float = 0.0         # frozen on the source -> running on the target, as timed here
    total: float = 0.0                 # start of the move -> every page on the target
    bytes_raw: int | None = None       # what the tool sent before compression (None: not known)
    bytes_wire: int = 0                # what crossed the link, both ways
    rounds: list[int] = field(default_factory=list)   # bytes on the wire per round (livemig)
    peak_rss_bytes: int | None = None  # the source-side process at its peak
    cpu_seconds: float | None = None   # on the source: the tool and what it ran
    steps: dict[str, float] = field(default_factory=dict)
    fetch_seconds: float | None = None  # post-copy: target running -> every page there
    fetch_bytes: int | None = None     # post-copy: the page bytes that came in that time
    fetch_wire_bytes: int | None = None    # ... and what they came to on the wire (scp's rate is a wire rate)
    throttle_percent: int = 0          # livemig's auto-converge: how hard, at the switchover
    max_bandwidth: int | None = None   # the cap every contender kept to, bytes a second (--max-bandwidth)
    peak_wire_bytes_per_s: float | None = None   # livemig: the most it sent over a second, as it counted
    tracking: str = ""                 # livemig pre-copy: how it found changed pages (precopy_tracking)
    compression_level: int | None = None     # livemig: the zstd level its streams used (chosen per move)
    expected_downtime: float | None = None   # livemig: its last estimate before the freeze
    asked_after_resume: int | None = None    # livemig: pages the target asked the source for once it ran
    error: str = ""


def _netdev(lab: Lab, host: str) -> int:
    return int(lab.text(host, ["python3", SIDE, "netdev"]).strip())


def _usage(lab: Lab, host: str, out: str) -> dict:
    return json.loads(lab.text(host, ["cat", out]))


def _finish(lab: Lab, work: Workload, s: Sample, dst: str, since: float, before: dict, wire0: int,
            src: str) -> Sample:
    s.bytes_wire = _netdev(lab, src) - wire0
    after = work.query(dst, wait=30)
    # a tree: the longest stall any of its processes lived through, and every one's memory intact
    ports = [work.port + i for i in range(work.children + 1)]
    s.downtime_app = max(work.stall_between(dst, since, port) for port in ports)
    s.ok = (after["host"] == dst and after["counter"] > before["counter"]
            and all(work.query(dst, "verify", port=port)["bad_pages"] == 0 for port in ports))
    return s


# CRIU's lazy-pages daemon asks for one page per fault, and a workload that rewrites its
# memory fast faults all the time: at 2 GiB dirtying 100 MiB/s, post-copy fetched under
# 1 MiB/s (issue 9). Past this a livemig run is stopped as a service manager would stop it
# (SIGTERM: it rolls back, as for Ctrl-C), and counts as failed, "over LIVEMIG_LIMIT s".
LIVEMIG_LIMIT = 300


def livemig(mode: str, *flags: str):
    """livemig move --mode MODE [FLAGS], its JSON report read for the tool-side figures."""
    def run(lab: Lab, work: Workload, src: str, dst: str, s: Sample) -> Sample:
        before, wire0, since = work.query(src), _netdev(lab, src), time.time()
        what = [work.container] if work.container else ["--pid", str(work.pid)]
        cap = ["--max-bandwidth", str(s.max_bandwidth)] if s.max_bandwidth else []
        mover = lab.popen(src, ["livemig", "move", "--mode", mode, "--json", *flags, *cap, *what, dst],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = mover.communicate(timeout=LIVEMIG_LIMIT)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGINT: a bench started in the background (nohup, &) passes SIGINT on
            # ignored, and Python then never turns it into KeyboardInterrupt
            lab.run(src, ["pkill", "-TERM", "-f", "livemig move"], check=False)
            out, err = mover.communicate(timeout=600)
            s.error = (f"still moving {LIVEMIG_LIMIT} s after it began: stopped (SIGTERM), exit code "
                       f"{mover.returncode}")
            return s
        if mover.returncode != 0:
            s.error = err.decode(errors="replace").strip().splitlines()[-1:][0] if err.strip() else "failed"
            return s
        r = json.loads(out)
        s.downtime_tool, s.total = r["downtime_seconds"], r["total_seconds"]
        s.bytes_raw = sum(x["bytes_raw"] for x in r["rounds"]) + r["image_files_bytes"]
        s.rounds = [x["bytes_wire"] for x in r["rounds"]]
        s.peak_rss_bytes, s.cpu_seconds = r["source_peak_rss_bytes"], r["source_cpu_seconds"]
        s.peak_wire_bytes_per_s = r["peak_wire_bytes_per_s"]
        s.steps = {"restore": r["restore_seconds"], "final dump frozen": r["final_dump_frozen_seconds"]}
        if r.get("fill_seconds"):
            s.steps["fill"] = r["fill_seconds"]     # pre-copy by hashes: pages into the copy
            s.steps["fill while running"] = r.get("fill_while_running_seconds", 0.0)   # of it, off the downtime
        if r.get("throttle_steps"):
            s.throttle_percent = r["throttle_steps"][-1]["percent"]
        s.tracking, s.expected_downtime = r.get("precopy_tracking", ""), r.get("expected_downtime_seconds")
        s.compression_level = r.get("compression_level")
        s.asked_after_resume = r.get("postcopy_pages_on_demand")
        if r.get("postcopy_seconds"):
            s.fetch_seconds, s.fetch_bytes = r["postcopy_seconds"], r["postcopy_pages"] * 4096
            s.fetch_wire_bytes = r["rounds"][-1]["bytes_wire"]      # the lazy final dump's round
        return _finish(lab, work, s, dst, since, before, wire0, src)
    return run


def seeds(lab: Lab, work: Workload, src: str, dst: str, s: Sample) -> Sample:
    """The seeds' procedure, as an operator types it (tests/lab/by_hand.py): criu dump, tar
    --zstd, scp, unpack, criu restore; the workload frozen from the dump's start to the
    restore's end. The source's steps run under `usage`, for their CPU time."""
    before, wire0, since = work.query(src), _netdev(lab, src), time.time()
    usage = {}

    def measured(label: str, host: str, argv: list[str]) -> list[str]:
        if host != src:
            return argv
        usage[label] = f"/img/seeds-{label}.usage"
        return ["python3", SIDE, "usage", usage[label], *argv]
    if work.container:   # the seeds' runc procedure restores from a bundle already there (over NFS)
        lab.run(dst, work.bundle_argv())
    try:
        hand = by_hand.migrate(lab, work.pid, src, dst, "seeds", wrap=measured, timeout=3600,
                               container=(work.container, work.bundle) if work.container else None,
                               max_bandwidth=s.max_bandwidth)
        if work.container:
            lab.run(src, ["rm", "-rf", work.bundle])
        s.cpu_seconds = sum(_usage(lab, src, path)["cpu_seconds"] for path in usage.values())
    finally:
        lab.run(src, ["rm", "-f", *usage.values()], check=False)
    s.steps, s.bytes_raw = hand.steps, hand.image_bytes
    s.downtime_tool = s.total = hand.total
    return _finish(lab, work, s, dst, since, before, wire0, src)


# CRIU's daemon fetches one request at a time through the tunnel, and a workload that
# keeps faulting keeps it slow: at 2 GiB dirtying 10 MiB/s it ran for over 6 minutes.
# Past this the run counts as failed, its figure "over HAND_FETCH_LIMIT s".
HAND_FETCH_LIMIT = 300


def hand_lazy(lab: Lab, work: Workload, src: str, dst: str, s: Sample) -> Sample:
    """The best a skilled user gets by hand: a lazy dump serving pages on the source, the
    other images copied with scp, and the target's lazy-pages daemon fetching the pages
    through an ssh -L tunnel while the restored workload already runs."""
    img, port = "/img/lazy", str(LAZY_PORT)
    before, wire0, since = work.query(src), _netdev(lab, src), time.time()
    for h in (src, dst):
        lab.run(h, ["mkdir", "-p", "-m", "700", img])
    tunnel = daemon = dump = None
    for h in (src, dst):   # the port must be free: a listener left there would take the pages
        lab.run(h, ["python3", SIDE, "wait-free", port, "30"])
    try:
        t0 = time.monotonic()
        dump = lab.text(src, ["python3", SIDE, "spawn", "/img/lazy-dump.out", "criu", "dump", "-t", str(work.pid),
                              "-D", img, "-o", "dump.log", "--lazy-pages", "--address", "127.0.0.1",
                              "--port", port]).strip()
        lab.run(src, ["python3", SIDE, "wait-listen", port, "600", dump])
        s.steps["dump"] = time.monotonic() - t0
        t = time.monotonic()
        # (capped like the rest; the tunnel that carries the lazy pages after is not: ssh -L has no cap)
        limit = ["-l", str(s.max_bandwidth * 8 // 1000)] if s.max_bandwidth else []
        lab.run(src, ["scp", "-q", "-r", *limit, img, f"{dst}:/img/"], timeout=3600)
        s.steps["copy"] = time.monotonic() - t
        t = time.monotonic()
        tunnel = lab.text(dst, ["python3", SIDE, "spawn", "/dev/null", "ssh", "-N", "-o", "ExitOnForwardFailure=yes",
                                "-L", f"127.0.0.1:{port}:127.0.0.1:{port}", src]).strip()
        lab.run(dst, ["python3", SIDE, "wait-listen", port, "60", tunnel])
        daemon = lab.text(dst, ["python3", SIDE, "spawn", "/img/lazy-daemon.out", "criu", "lazy-pages",
                                "--page-server", "--address", "127.0.0.1", "--port", port, "-D", img,
                                "-o", "lazy-pages.log"]).strip()
        lab.run(dst, ["python3", SIDE, "wait-file", f"{img}/lazy-pages.socket", "60"])
        lab.run(dst, ["criu", "restore", "-D", img, "-d", "--lazy-pages", "-o", "restore.log"], timeout=600)
        s.steps["restore"] = time.monotonic() - t
        s.downtime_tool = time.monotonic() - t0
        try:
            lab.run(dst, ["python3", SIDE, "wait-exit", daemon, str(HAND_FETCH_LIMIT)],
                    timeout=HAND_FETCH_LIMIT + 60)
        except Exception:  # noqa: BLE001 - whichever way the wait failed, this is what it means
            raise RuntimeError(f"the lazy-pages daemon was still fetching pages {HAND_FETCH_LIMIT} s "
                               "after the restore") from None
        lab.run(src, ["python3", SIDE, "wait-exit", dump, "600"], timeout=700)
        s.total = time.monotonic() - t0
        s.steps["pages"] = s.total - s.downtime_tool
        # the daemon logs no count: every page of the workload's memory is the estimate
        s.fetch_seconds, s.fetch_bytes = s.steps["pages"], work.mib * 2**20
        s.fetch_wire_bytes = s.fetch_bytes      # through an ssh tunnel, uncompressed, as scp's
    finally:
        # on success these are gone already; after a failure none may linger, holding the port
        for host, pid in ((dst, tunnel), (dst, daemon), (src, dump)):
            if pid is not None:
                lab.run(host, ["kill", pid], check=False)
        for h in (src, dst):
            lab.run(h, ["rm", "-rf", img, "/img/lazy-dump.out", "/img/lazy-daemon.out"], check=False)
    return _finish(lab, work, s, dst, since, before, wire0, src)


CONTENDERS = {
    "seeds": seeds,
    "lazy by hand": hand_lazy,
    # the pages into the target's memory, placed while the copy runs (a fill)
    "livemig stopcopy": livemig("stopcopy"),
    # the pages into image files that CRIU's restore reads back: the copy whole before it runs
    "livemig stopcopy --no-fill": livemig("stopcopy", "--no-fill"),
    # without soft-dirty (the namespaced lab): pre-copy by userfaultfd write-protection
    # (livemig/pages/wptrack.py), the pages sent by digest
    "livemig precopy": livemig("precopy"),
    # the same by page hashes (livemig/pages/pagehash.py): every round and the final pass read it all
    "livemig precopy --no-write-protect": livemig("precopy", "--no-write-protect"),
    # auto-converge off: what it is worth where a workload outruns pre-copy (a container's own
    # cgroup is throttled; the lab's process trees share theirs, and never are)
    "livemig precopy --no-throttle": livemig("precopy", "--no-throttle"),
    "livemig postcopy": livemig("postcopy"),
}
# CRIU lazy by hand, through runc, would take runc's page server and a tunnel: not built
FOR_CONTAINERS = ("seeds", "livemig stopcopy", "livemig stopcopy --no-fill", "livemig precopy", "livemig precopy --no-throttle", "livemig postcopy")
