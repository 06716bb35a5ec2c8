"""The physical limit row: what the lab's link carries, and the least downtime CRIU allows.

No migration of M MiB stopped while it is copied can beat M / (link throughput) plus
CRIU's own freeze and restore of an empty process; the table shows how far each
contender is from that.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field

from tests.lab import Lab

from .contenders import SIDE
from .link import round_trip_ms

PROBE = "/dev/shm/livemig-bench.bin"
TCP_PORT = 27001


@dataclass
class Limits:
    ssh_mibps: float          # scp of random bytes between the hosts (OpenSSH, its default cipher)
    tcp_mibps: float          # the same bytes over plain TCP
    criu_floor: float         # criu dump + criu restore of a sleeping process, seconds
    probe_mib: int
    # the same of a tree of N sleeping processes, by N (the process-count axis: a tree's least
    # downtime without its memory); JSON keys are strings
    criu_floor_by_procs: dict[str, float] = field(default_factory=dict)
    rtt_ms: float = 0.0       # a line and its echo over ssh between the hosts (bench/link.py)

    def stopcopy_floor(self, mib: int, procs: int = 1) -> float:
        """Stop-and-copy's least downtime for mib: CRIU's floor plus the bytes over plain TCP."""
        return self.criu_floor_by_procs.get(str(procs), self.criu_floor) + mib / self.tcp_mibps


def measure(lab: Lab, src: str, dst: str, probe_mib: int = 256, procs: tuple[int, ...] = ()) -> Limits:
    lab.run(src, ["dd", "if=/dev/urandom", f"of={PROBE}", "bs=1M", f"count={probe_mib}", "status=none"])
    try:
        t = time.monotonic()
        lab.run(src, ["scp", "-q", PROBE, f"{dst}:/dev/null"], timeout=600)
        ssh = probe_mib / (time.monotonic() - t)
        sink = lab.popen(dst, ["python3", SIDE, "tcp-sink", lab.address(dst), str(TCP_PORT)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            lab.run(dst, ["python3", SIDE, "wait-listen", str(TCP_PORT), "30"])
            seconds = float(lab.text(src, ["python3", SIDE, "tcp-send", lab.address(dst), str(TCP_PORT), PROBE]))
        finally:
            sink.wait(timeout=60)
        tcp = probe_mib / seconds
    finally:
        lab.run(src, ["rm", "-f", PROBE], check=False)
    return Limits(ssh, tcp, _criu_floor(lab, src), probe_mib,
                  {str(n): _criu_floor(lab, src, n) for n in procs if n > 1}, round_trip_ms(lab, src, dst))


def _criu_floor(lab: Lab, host: str, procs: int = 1, reps: int = 3) -> float:
    """The best of reps: a sleeping process (procs > 1: a shell and procs - 1 sleeping
    children) frozen, dumped, and restored, all here."""
    best = float("inf")
    tree = ["sleep", "100000"] if procs == 1 else \
        ["sh", "-c", f"for i in $(seq {procs - 1}); do sleep 100000 & done; wait"]
    for _ in range(reps):
        img = "/img/floor"
        lab.run(host, ["mkdir", "-p", "-m", "700", img])
        pid = lab.text(host, ["python3", SIDE, "spawn", "/dev/null", *tree]).strip()
        lab.run(host, ["python3", SIDE, "wait-children", pid, str(procs - 1), "30"])
        try:
            t = time.monotonic()
            lab.run(host, ["criu", "dump", "-t", pid, "-D", img, "-o", "dump.log"])
            lab.run(host, ["criu", "restore", "-D", img, "-d", "-o", "restore.log"])
            best = min(best, time.monotonic() - t)
        finally:
            lab.run(host, ["pkill", "-9", "-s", pid], check=False)     # its session: the tree
            lab.run(host, ["rm", "-rf", img], check=False)
    return best
