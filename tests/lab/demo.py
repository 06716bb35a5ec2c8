"""The README's first command: bring the lab up, move a counting workload a -> b, show the downtime.

The move is the seeds' procedure (criu dump, zstd archive, scp, criu restore),
the baseline livemig is built to beat; `livemig move` takes its place here once
the migration engine lands.
"""

from __future__ import annotations

import sys
import time

from . import Lab, by_hand

DEMO_PID = 4242  # a bare process restores onto its own PID, so pick one free on b


def demo(mib: int = 256, keep: bool = False, out=sys.stdout) -> int:
    t = time.monotonic()
    lab = Lab.up(2)
    print(f"lab up in {time.monotonic() - t:.1f} s: " +
          ", ".join(f"{h.name} ({h.address})" for h in lab.hosts), file=out)
    try:
        work = lab.start_workload("a", mib=mib, dirty_mibps=8, pid=DEMO_PID)
        time.sleep(1)
        before = work.query("a")
        print(f"workload: PID {work.pid} on a, {mib} MiB, dirtying 8 MiB/s, counter at {before['counter']}",
              file=out)
        t0 = time.time()
        moved = by_hand.migrate(lab, work.pid, "a", "b")
        after = work.query("b", wait=10)
        check = work.query("b", "verify")
        downtime = work.stall_between("b", t0)
        steps = ", ".join(f"{k} {v:.2f} s" for k, v in moved.steps.items())
        print(f"moved a -> b (criu dump, tar --zstd, scp, criu restore): {steps}", file=out)
        print(f"  {moved.image_bytes / 2**20:.0f} MiB of images, {moved.archive_bytes / 2**20:.0f} MiB sent",
              file=out)
        print(f"downtime seen by the workload: {downtime:.2f} s", file=out)
        ok = after["host"] == "b" and after["counter"] > before["counter"] and check["bad_pages"] == 0
        print(f"on {after['host']}: counter {after['counter']} (continued from {before['counter']}), "
              f"{check['bad_pages']} of {check['pages']} pages differ from what they must hold", file=out)
        print("OK: the workload kept its state" if ok else "FAILED: the workload lost its state", file=out)
        return 0 if ok else 1
    finally:
        if not keep:
            problems = Lab.down()
            print("lab down" + (": " + "; ".join(problems) if problems else ", nothing left behind"), file=out)
