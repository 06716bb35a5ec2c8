"""What a move does to memory a pre-fork tree shares copy-on-write: the target's total PSS
against the source's before the move, for each of livemig's modes and for CRIU by hand,
side by side in one run, on the same tree.

    python -m bench.cow                          512 MiB shared by a parent and 8 children
    python -m bench.cow --mib 256 --children 4

The tree (tests/workloads/prefork.py): a parent fills --mib MiB, then forks --children
children that only read it, so that every page is shared by all of them. Each contender
moves a fresh tree from a to b; the tree's PSS (the kernel's proportional share: a page
shared by n processes counts 1/n in each) is summed over its processes, on a before the
move and on b after it, and every process's memory is checked on b. livemig's report adds
its downtime, the bytes it sent, and what it kept shared by putting it into the images. It writes
bench/results/<date>-cow.json: every sample and, per contender, the ratio of the target's
PSS to the source's (1.0: the sharing kept; children + 1: none of it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tests.lab import Lab, by_hand

PREFORK = "/opt/livemig/tests/workloads/prefork.py"
CONTENDERS = {"criu by hand": None,
              "livemig stopcopy": ("--mode", "stopcopy"),
              "livemig stopcopy into image files": ("--mode", "stopcopy", "--no-fill"),
              "livemig postcopy": ("--mode", "postcopy"),
              "livemig precopy (page hashes)": ("--mode", "precopy")}


def _asked(lab: Lab, host: str, port: int, wait: float = 30) -> dict:
    return json.loads(lab.text(host, ["python3", PREFORK, "query", "--port", str(port), "--wait", str(wait)]))


def sample(lab: Lab, contender: str, i: int, mib: int, children: int) -> dict:
    pid, port = 5600 + 20 * i, 7900 + i
    lab.run("a", ["python3", PREFORK, "run", "--daemon", "--pid", str(pid), "--port", str(port),
                  "--mib", str(mib), "--children", str(children)], timeout=300)
    try:
        deadline = time.monotonic() + 120
        while not (tree := _asked(lab, "a", port))["children_ok"]:    # every child has read it all once
            if time.monotonic() > deadline:
                raise RuntimeError("the pre-fork tree's children never said their memory was intact")
            time.sleep(0.5)
        pids = [tree["root"], *tree["children"]]
        before = lab.pss_bytes("a", pids)
        t0 = time.monotonic()
        flags = CONTENDERS[contender]
        report: dict = {}
        if flags is None:
            by_hand.migrate(lab, pid, "a", "b", name=f"cow{i}")
            error = ""
        else:
            res = lab.run("a", ["livemig", "move", "--pid", str(pid), "--json", *flags, "b"], check=False, timeout=900)
            error = "" if res.returncode == 0 else res.stderr.decode().strip().splitlines()[-1]
            report = json.loads(res.stdout) if res.stdout.strip() else {}
        seconds = time.monotonic() - t0
        time.sleep(6)      # every child has read its memory again, on b
        after_tree = _asked(lab, "b", port) if not error else {}
        after = lab.pss_bytes("b", pids) if not error else 0
    finally:
        for h in ("a", "b"):
            lab.run(h, ["pkill", "-KILL", "-f", f"prefork.py run .*--port {port} "], check=False)
    return {"contender": contender, "mib": mib, "children": children, "error": error, "seconds": seconds,
            "pss_before_bytes": before, "pss_after_bytes": after,
            "pss_after_over_before": after / before if before and after else None,
            "memory_ok_after": bool(after_tree.get("memory_ok")) and bool(after_tree.get("children_ok")),
            # livemig's own account (none by hand, whose move is all downtime): what keeping the
            # sharing cost, and where the pages went
            **{k: report.get(k) for k in ("pages_into", "downtime_seconds", "downtime_parts", "wire_bytes", "shared_kept_bytes",
                                          "shared_sent_bytes")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cow", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--children", type=int, default=8)
    ap.add_argument("--only", nargs="*", choices=list(CONTENDERS), help="these contenders only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    lab = Lab.up(2)
    samples: list[dict] = []
    try:
        for contender in a.only or CONTENDERS:
            samples.append(sample(lab, contender, len(samples), a.mib, a.children))
            print(json.dumps(samples[-1]), flush=True)
    finally:
        Lab.down()
    result = {"args": vars(a), "samples": samples,
              "pss_after_over_before": {s["contender"]: s["pss_after_over_before"] for s in samples}}
    path = Path(a.out) / f"{time.strftime('%Y-%m-%dT%H-%M-%S')}-cow.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for s in samples:
        ratio = s["pss_after_over_before"]
        print(f"{s['contender']:36} PSS {s['pss_before_bytes'] >> 20:5} -> {s['pss_after_bytes'] >> 20:5} MiB"
              f"  x{ratio:.2f}" if ratio else f"{s['contender']:36} failed: {s['error']}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
