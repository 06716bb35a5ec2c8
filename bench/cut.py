"""What a cut link costs a post-copy: the same move with and without every SSH session to
the target killed mid-post-copy, side by side, as the moved service's client lives it.

    python -m bench.cut                    1 GiB dirtying 100 MiB/s, capped at 16 MiB/s, 2 reps
    python -m bench.cut --mib 512 --reps 3 --max-bandwidth 32M

Each repetition moves memcounter from a to b with `livemig move --mode postcopy`, capped so
that post-copy lasts long enough to be cut on any machine, while a client asks it for the
next integer on both hosts; once b has answered three times, the cut (or nothing). It
writes bench/results/<date>-cut.json: every sample (the report's post-copy time, wire
bytes, reconnects, and the client's answers) and the ratios, cut against uncut.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import time
from pathlib import Path

from tests.clients import Client
from tests.lab import Lab


def sample(lab: Lab, cut: bool, i: int, mib: int, dirty: float, cap: str) -> dict:
    port, pid = 7700 + i, 4400 + i
    work = lab.start_workload("a", mib=mib, dirty_mibps=dirty, pid=pid, port=port)
    try:
        with Client(lab, port, every=0.2) as client:
            mover = lab.popen("a", ["livemig", "move", "--json", "--pid", str(pid), "--mode", "postcopy",
                                    "--max-bandwidth", cap, "b"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            while len([a for a in client.answers if a.host == "b"]) < 3 and mover.poll() is None:
                time.sleep(0.2)
            at = time.monotonic()
            if cut:
                lab.run("b", ["pkill", "-KILL", "-x", "sshd-session"])
            out, _ = mover.communicate(timeout=600)
        report = json.loads(out)
        verified = work.query("b", "verify")      # the copy's memory, every page
    finally:
        for h in ("a", "b"):
            lab.run(h, ["kill", "-KILL", str(pid)], check=False)
    after = [a for a in client.answers if a.at >= at]
    on_b = [a for a in after if a.host == "b"]
    return {"cut": cut, "exit_code": mover.returncode, "outcome": report["outcome"],
            "reconnects": report["reconnects"], "reconnect_seconds": report["reconnect_seconds"],
            "postcopy_seconds": report["postcopy_seconds"], "wire_bytes": report["wire_bytes"],
            "answers_after": len(after), "answers_on_a_after": len(after) - len(on_b),
            "longest_wait_for_b_after": max((y.at - x.at for x, y in itertools.pairwise(on_b)), default=None),
            "answers_taken_back": len(client.taken_back()), "bad_pages_on_b": verified["bad_pages"]}


def ratios(samples: list[dict]) -> dict:
    """Cut against uncut, medians of each: what the cut cost."""
    def median(cut: bool, key: str) -> float:
        return statistics.median(s[key] for s in samples if s["cut"] == cut)
    return {key: median(True, key) / median(False, key)
            for key in ("postcopy_seconds", "wire_bytes", "longest_wait_for_b_after")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cut", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--dirty", type=float, default=100.0, help="MiB/s the workload rewrites (default 100)")
    ap.add_argument("--max-bandwidth", default="16M", help="the move's cap (default 16M)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    lab = Lab.up(2)
    samples: list[dict] = []
    try:
        for rep in range(a.reps):
            for cut in (False, True):
                samples.append(sample(lab, cut, len(samples), a.mib, a.dirty, a.max_bandwidth))
                print(json.dumps(samples[-1]), flush=True)
    finally:
        Lab.down()
    result = {"args": vars(a), "samples": samples, "cut_over_uncut": ratios(samples)}
    path = Path(a.out) / f"{time.strftime('%Y-%m-%dT%H-%M-%S')}-cut.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["cut_over_uncut"]), f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
