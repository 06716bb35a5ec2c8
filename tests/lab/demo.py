"""The README's first command: bring the lab up, live-migrate a counting workload a -> b with
livemig, show the downtime and that its state survived; then move it back the way the
container guides do by hand (the baseline livemig is built to beat), for comparison."""

from __future__ import annotations

import sys
import time

from . import Lab, by_hand

DEMO_PID = 4242  # a bare process restores onto its own PID, so pick one free on both hosts


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

        print(f"\n$ livemig move --pid {work.pid} b      (run on a)", file=out)
        t0 = time.time()
        res = lab.run("a", ["livemig", "move", "--pid", str(work.pid), "b"], check=False)
        print(res.stderr.decode().rstrip() + "\n" + res.stdout.decode().rstrip(), file=out)
        if res.returncode != 0:
            print("FAILED: livemig move did not move the workload", file=out)
            return 1
        moved = work.query("b", wait=10)
        check = work.query("b", "verify")
        livemig_gap = work.stall_between("b", t0)
        ok = moved["host"] == "b" and moved["counter"] > before["counter"] and check["bad_pages"] == 0
        print(f"on {moved['host']}: counter {moved['counter']} (continued from {before['counter']}), "
              f"{check['bad_pages']} of {check['pages']} pages differ from what they must hold; "
              f"downtime the workload saw: {livemig_gap * 1000:.0f} ms", file=out)

        print("\nand back to a by hand (criu dump, tar --zstd, scp, criu restore), for comparison:", file=out)
        t1 = time.time()
        steps = by_hand.migrate(lab, work.pid, "b", "a")
        back = work.query("a", wait=10)
        hand_gap = work.stall_between("a", t1)
        ok = ok and back["counter"] > moved["counter"] and work.query("a", "verify")["bad_pages"] == 0
        print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in steps.steps.items()), file=out)
        print(f"  downtime the workload saw: {hand_gap * 1000:.0f} ms", file=out)

        print(f"\ndowntime: livemig {livemig_gap * 1000:.0f} ms, by hand {hand_gap * 1000:.0f} ms "
              f"({hand_gap / livemig_gap:.1f}x less with livemig)", file=out)
        print("OK: the workload kept its count and its memory" if ok else
              "FAILED: the workload lost its state", file=out)
        return 0 if ok else 1
    finally:
        if not keep:
            problems = Lab.down()
            print("lab down" + (": " + "; ".join(problems) if problems else ", nothing left behind"), file=out)
