"""Emptying a host (issue 29): `livemig drain` against the same workloads moved one after
another by `livemig move`, and by the seeds' procedure, side by side in one run.

    python -m bench.drain                        every contender once, on the veth as it is
    python -m bench.drain --reps 2 --link 1g     on a 1 Gbit/s link (bench/link.py), twice each
    python -m bench.drain --link unshaped,1g     each link profile in turn
    python -m bench.drain --contenders "drain,livemig move one at a time"

The lab: three namespaced hosts; a is drained onto b and c. For every contender, six fresh
workloads start on a (WORKLOADS: four runc containers running memcounter, 64 to 1024 MiB,
and two bare process trees, one of a parent and a child; some of them dirtying), and:

- `drain`: `livemig drain --to b,c --pid P Q --json` as it ships (smallest first, one move per CPU);
- `drain --order largest`, `drain --parallel 1`, `drain --parallel 3`: the same, one choice
  changed, to say which order and how many at once are best;
- `livemig move one at a time`: `livemig move --json` of each workload in turn, in the
  drain's order, each to the target the drain would place it on (`livemig drain --dry-run`, asked
  before the clock starts): each moves alone, so each one's downtime here is its downtime
  "when moved alone", the baseline of the drain's third goal;
- `seeds one at a time`: the seeds' procedure (tests/lab/by_hand.py: runc checkpoint, or
  criu dump, tar --zstd, scp, unpack, runc restore from a bundle already on the target, or
  criu restore), each workload in turn to the same targets.

Measured for each: the time until the host is empty (from the start of the first command to
the end of the last move; the drain's own total_seconds and moving_seconds beside it); each
workload's downtime as livemig reports it (the seeds': the procedure's whole time, frozen
throughout) and as the workload saw it (memcounter's longest stall overlapping its own move);
when each workload was off a; the bytes on a's wire (its network counters, SSH included). Each
workload is then checked on its target (the counter went on, every page verified) and a is
checked empty (no container, no memcounter, nothing in livemig's image root). The link's rates
(scp, plain TCP: bench/limits.py) are measured first, for "the memory over the link's rate".

It writes bench/results/<UTC date>-drain.json (the machine, the link's limits, every raw
sample: each drain's whole report, each move's, every stall) and -drain.md, and prints a table
of medians (min-max) with issue 29's goals and whether each is met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tests.lab import Lab, LabError, Workload, by_hand

from . import limits, link, output
from .contenders import SIDE

TARGETS = ("b", "c")
HOSTS = ("a", *TARGETS)
LIMIT = 1200            # seconds one command may take before it is stopped (SIGTERM: livemig rolls back)
SETTLE = 2.0            # seconds the workloads run before the clock starts: their start's stalls are behind
STALL_SLACK = 0.5       # a stall that began this long after its move's end is not the move's


@dataclass(frozen=True)
class Spec:
    """One workload of the bench: memcounter in a runc container, or a bare tree of procs
    memcounters (a parent and procs - 1 children), each holding mib and dirtying dirty_mibps."""
    name: str
    kind: str                 # "runc" or "tree"
    mib: int                  # each process's
    dirty_mibps: float        # each process's
    port: int                 # the root's; its children answer on the next ones
    procs: int = 1
    pid: int = 0              # a tree's root: restored onto its own PID, one free on every host

    @property
    def total_mib(self) -> int:
        return self.mib * self.procs

    @property
    def ports(self) -> list[int]:
        return list(range(self.port, self.port + self.procs))

    @property
    def key(self) -> str:
        """What the drain names it by: the container's name, or the tree's root PID."""
        return self.name if self.kind == "runc" else str(self.pid)


# 4 runc containers and 2 process trees, 64 MiB to 1 GiB, 2368 MiB in all; four of them dirtying
WORKLOADS = (
    Spec("dr1024", "runc", 1024, 8.0, 7821),
    Spec("dr512", "runc", 512, 0.0, 7822),
    Spec("dr256", "runc", 256, 4.0, 7823),
    Spec("dr64", "runc", 64, 1.0, 7824),
    Spec("tree384", "tree", 192, 2.0, 7825, procs=2, pid=4611),     # a parent and a child, 192 MiB each
    Spec("tree128", "tree", 128, 0.0, 7827, pid=4621),
)

DRAIN = "drain"
SEQUENTIAL = "livemig move one at a time"
SEEDS = "seeds one at a time"
CONTENDERS: dict[str, tuple[str, ...] | None] = {
    DRAIN: (),
    "drain --order largest": ("--order", "largest"),
    "drain --parallel 1": ("--parallel", "1"),
    "drain --parallel 3": ("--parallel", "3"),
    SEQUENTIAL: None,
    SEEDS: None,
}
GOAL_OVER_SEQUENTIAL = 1 / 1.5     # the time to empty, at most the sequential moves' divided by 1.5
GOAL_OVER_LINK = 1.3               # ... and within 1.3 times the memory over the link's rate
GOAL_OVER_ALONE = 1.5              # no workload's downtime over 1.5 times its own moved alone


# --- the lab side ---------------------------------------------------------------------------------
def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _netdev(lab: Lab, host: str) -> int:
    return int(lab.text(host, ["python3", SIDE, "netdev"]).strip())


def _livemig(lab: Lab, argv: list[str]) -> tuple[dict, int, str]:
    """livemig ARGV on a, stopped by SIGTERM past LIMIT: its JSON, its exit code, and its
    stderr's last lines."""
    res = lab.run("a", ["timeout", "-s", "TERM", str(LIMIT), "livemig", *argv], check=False, timeout=LIMIT + 600)
    err = res.stderr.decode(errors="replace").strip()
    return json.loads(res.stdout), res.returncode, "\n".join(err.splitlines()[-5:])


def start(lab: Lab) -> dict[str, Workload]:
    """Every workload, fresh, on a."""
    works = {}
    for w in WORKLOADS:
        if w.kind == "runc":
            works[w.name] = lab.start_container_workload("a", mib=w.mib, dirty_mibps=w.dirty_mibps, port=w.port,
                                                         container=w.name)
        else:
            works[w.name] = lab.start_workload("a", mib=w.mib, dirty_mibps=w.dirty_mibps, pid=w.pid, port=w.port,
                                               children=w.procs - 1)
    return works


def remove(lab: Lab) -> None:
    """Every workload gone from every host, and what moves and drains keep under livemig's
    image root (a failed move's logs/ aside): the next contender starts as the first did."""
    for h in HOSTS:
        for w in WORKLOADS:
            if w.kind == "runc":
                lab.run(h, ["runc", "delete", "--force", w.name], check=False)
                lab.run(h, ["rm", "-rf", f"/var/lib/ctr/{w.name}"], check=False)
            else:
                lab.run(h, ["pkill", "-KILL", "-P", str(w.pid)], check=False)      # its children
                lab.run(h, ["kill", "-KILL", str(w.pid)], check=False)
                lab.run(h, ["python3", SIDE, "wait-exit", str(w.pid), "60"], check=False)
        for w in WORKLOADS:
            for port in w.ports:
                lab.run(h, ["python3", SIDE, "wait-free", str(port), "60"], check=False)
        lab.run(h, ["find", "/var/lib/livemig", "-mindepth", "1", "-maxdepth", "1", "!", "-name", "logs",
                    "-exec", "rm", "-rf", "{}", "+"], check=False)


def containers_on(lab: Lab, host: str) -> list[str]:
    """Every container runc, crun and podman run on host (a drain would move them all)."""
    names = []
    for argv in (["runc", "list", "-q"], ["crun", "list", "-q"],
                 ["env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1", "podman", "ps", "-a", "--format", "{{.Names}}"]):
        names += lab.text(host, argv, check=False).split()
    return names


def left_on(lab: Lab) -> dict:
    """What is still on a (containers, memcounters), and what moves left in livemig's image
    root or as criu processes anywhere (drained.json, the record of what drains moved, and its
    lock are meant to stay: tests/test_drain.py's leftovers() says the same)."""
    found = lab.leftovers(HOSTS)
    files = {h: [x for x in names if not x.startswith("drained.json")] for h, (names, _) in found.items()}
    return {"containers": containers_on(lab, "a"),
            "memcounters": lab.text("a", ["pgrep", "-f", "memcounter.py run"], check=False).split(),
            "image_root": {h: names for h, names in files.items() if names},
            "criu": {h: criu for h, (_, criu) in found.items() if criu}}


def placement(lab: Lab) -> dict:
    """Where the drain would send each workload, and in what order: its dry run (nothing moves)."""
    pids = [str(w.pid) for w in WORKLOADS if w.kind == "tree"]
    plan, code, err = _livemig(lab, ["drain", "--to", ",".join(TARGETS), "--pid", *pids, "--dry-run", "--json"])
    if code != 0 or not plan.get("empty"):
        raise LabError(f"drain --dry-run exited {code}, unplaced {plan.get('unplaced')}: {err}")
    return plan


def by_key() -> dict[str, Spec]:
    return {w.key: w for w in WORKLOADS}


def drain(lab: Lab, flags: tuple[str, ...], s: dict) -> dict[str, dict]:
    """One drain of every workload; each workload's move, by name: target, window, downtime."""
    pids = [str(w.pid) for w in WORKLOADS if w.kind == "tree"]
    t0, since = time.monotonic(), time.time()
    s["since"] = since
    report, code, err = _livemig(lab, ["drain", "--to", ",".join(TARGETS), "--pid", *pids, "--json", *flags])
    s["seconds"] = time.monotonic() - t0
    s["report"], s["exit_code"] = report, code
    s["drain_total_seconds"], s["drain_moving_seconds"] = report.get("total_seconds"), report.get("moving_seconds")
    s["memory_bytes"] = sum(p["memory_bytes"] for p in report.get("placements", []))
    if code != 0:
        s["error"] = f"drain exited {code}: {err}"
    moves = {}
    specs = by_key()
    for m in report.get("moves", []):
        r = m.get("report") or {}
        w = specs.get(m["workload"])
        if w is None:
            s["error"] = s["error"] or f"the drain moved {m['workload']}, not one of the bench's"
            continue
        began = _epoch(r["started_at"]) if r.get("started_at") else since
        ended = _epoch(r["ended_at"]) if r.get("ended_at") else time.time()
        moves[w.name] = {"target": m["target"], "outcome": m["outcome"], "exit_code": m["exit_code"],
                         "error": m.get("error", ""), "began": began - since, "ended": ended - since,
                         "downtime_tool": m.get("downtime_seconds"), "mode": r.get("mode"),
                         "wire_bytes": r.get("wire_bytes")}
    return moves


def one_after_another(lab: Lab, contender: str, works: dict[str, Workload], plan: dict, s: dict) -> dict[str, dict]:
    """Each workload moved alone, in the drain's order, to the drain's target for it: by
    `livemig move` or by the seeds' procedure."""
    specs = by_key()
    order = [(specs[p["workload"]], p["target"]) for p in plan["placements"]]
    s["memory_bytes"] = sum(p["memory_bytes"] for p in plan["placements"])
    if contender == SEEDS:      # their runc procedure restores from a bundle already there (over their NFS)
        for w, target in order:
            if w.kind == "runc":
                lab.run(target, works[w.name].bundle_argv())
    moves: dict[str, dict] = {}
    t0, since = time.monotonic(), time.time()
    s["since"] = since
    try:
        for w, target in order:
            began = time.time()
            m = moves[w.name] = {"target": target, "began": began - since}
            if contender == SEEDS:
                try:
                    hand = by_hand.migrate(lab, works[w.name].pid, "a", target, name=f"drain-{w.name}",
                                           container=(w.name, f"/var/lib/ctr/{w.name}") if w.kind == "runc" else None)
                except LabError as e:
                    m.update(outcome="failed", exit_code=1, error=str(e).strip()[-500:])
                else:
                    m.update(outcome="moved", exit_code=0, downtime_tool=hand.total, steps=hand.steps,
                             archive_bytes=hand.archive_bytes, image_bytes=hand.image_bytes)
            else:
                what = [w.name] if w.kind == "runc" else ["--pid", str(w.pid)]
                r, code, err = _livemig(lab, ["move", "--json", *what, target])
                m.update(outcome=r.get("outcome"), exit_code=code, downtime_tool=r.get("downtime_seconds"),
                         mode=r.get("mode"), wire_bytes=r.get("wire_bytes"), report=r,
                         error="" if code == 0 else r.get("error") or err)
            m["ended"] = time.time() - since
            if m["exit_code"] != 0:
                s["error"] = f"{w.name}: {m.get('error') or m['outcome']}"
                break
    finally:
        s["seconds"] = time.monotonic() - t0
    return moves


def checked(lab: Lab, works: dict[str, Workload], before: dict[str, int], moves: dict[str, dict],
            since: float) -> list[dict]:
    """Each workload where its move put it: its stalls (read before verify, whose own pass
    over the memory stalls it), its counter gone on, every page verified."""
    out = []
    for w in WORKLOADS:
        m = moves.get(w.name, {})
        host = m.get("target", "a") if m.get("exit_code") == 0 else "a"
        x = {"name": w.name, "kind": w.kind, "mib": w.total_mib, "dirty_mibps": w.dirty_mibps * w.procs,
             "procs": w.procs, "host": host, **{k: v for k, v in m.items() if k != "target"},
             "ok": False, "downtime_app": None, "error": m.get("error", "") if m else "not moved"}
        try:
            got = [works[w.name].query(host, wait=30, port=p) for p in w.ports]
            x["stalls"] = [[st for st in g["stalls"] if st[1] > since] for g in got]
            x["longest_stall"] = max((b - a for g in x["stalls"] for a, b in g), default=0.0)
            if m.get("exit_code") == 0:
                lo, hi = since + m["began"], since + m["ended"] + STALL_SLACK
                x["downtime_app"] = max((b - a for g in x["stalls"] for a, b in g if b > lo and a < hi), default=0.0)
            x["counter_went_on"] = all(g["host"] == host and g["counter"] > before[f"{w.name}:{p}"]
                                       for g, p in zip(got, w.ports))
            x["bad_pages"] = sum(works[w.name].query(host, "verify", port=p)["bad_pages"] for p in w.ports)
            x["ok"] = host != "a" and x["counter_went_on"] and x["bad_pages"] == 0
            if not x["ok"] and not x["error"]:
                x["error"] = f"on {host}: counter went on {x['counter_went_on']}, bad pages {x['bad_pages']}"
        except (LabError, KeyError, ValueError) as e:
            x["error"] = x["error"] or f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        out.append(x)
    return out


def sample(lab: Lab, contender: str, rep: int, link_name: str) -> dict:
    """One contender's run on fresh workloads: everything it measured."""
    s: dict = {"contender": contender, "rep": rep, "link": link_name, "ok": False, "error": "", "seconds": None,
               "drain_total_seconds": None, "drain_moving_seconds": None, "memory_bytes": None, "wire_bytes": None}
    remove(lab)
    try:
        if stray := containers_on(lab, "a"):
            raise LabError(f"containers on a before the bench's start: {stray} (a drain would move them)")
        works = start(lab)
        time.sleep(SETTLE)
        before = {f"{w.name}:{p}": works[w.name].query("a", port=p)["counter"] for w in WORKLOADS for p in w.ports}
        plan = None if CONTENDERS[contender] is not None else placement(lab)
        s["placement"] = plan and [{k: p[k] for k in ("workload", "runtime", "target", "memory_bytes")}
                                   for p in plan["placements"]]
        wire0 = _netdev(lab, "a")
        try:
            moves = (drain(lab, CONTENDERS[contender], s) if CONTENDERS[contender] is not None
                     else one_after_another(lab, contender, works, plan, s))
        except (LabError, AssertionError, ValueError) as e:       # its JSON unreadable, or out of contract
            s["error"] = f"{type(e).__name__}: {str(e).strip()[-500:]}"
            moves = {}
        s["wire_bytes"] = _netdev(lab, "a") - wire0
        s["workloads"] = checked(lab, works, before, moves, s.get("since", time.time()))
        s["left"] = left_on(lab)
        left = s["left"]["containers"] or s["left"]["memcounters"] or s["left"]["image_root"] or s["left"]["criu"]
        if left and not s["error"]:
            s["error"] = f"left behind: {s['left']}"
        bad = [x for x in s["workloads"] if not x["ok"]]
        if bad and not s["error"]:
            s["error"] = f"{bad[0]['name']}: {bad[0]['error']}"
        s["ok"] = not s["error"]
    except (LabError, AssertionError, ValueError, KeyError) as e:
        s["error"] = s["error"] or f"{type(e).__name__}: {str(e).strip()[-500:]}"
    finally:
        remove(lab)
    return s


# --- the arithmetic (tests/unit/test_bench_drain.py) -----------------------------------------------
def _stat(vals: list) -> tuple[float, float, float] | None:
    vals = [v for v in vals if v is not None]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None


def summary(samples: list[dict]) -> list[dict]:
    """One row per link and contender, of the samples that emptied the host with every workload
    intact: medians (min-max) of the time to empty and the rest, and of each workload's downtimes."""
    rows = []
    for lk, name in dict.fromkeys((s["link"], s["contender"]) for s in samples):
        every = [s for s in samples if (s["link"], s["contender"]) == (lk, name)]
        ok = [s for s in every if s["ok"]]
        per = {w: [x for s in ok for x in s["workloads"] if x["name"] == w]
               for w in dict.fromkeys(x["name"] for s in ok for x in s["workloads"])}
        rows.append({
            "link": lk, "contender": name, "runs": len(ok), "failed": len(every) - len(ok),
            "seconds": _stat([s["seconds"] for s in ok]),
            "drain_total_seconds": _stat([s["drain_total_seconds"] for s in ok]),
            "drain_moving_seconds": _stat([s["drain_moving_seconds"] for s in ok]),
            "wire_bytes": _stat([s["wire_bytes"] for s in ok]),
            "memory_bytes": _stat([s["memory_bytes"] for s in ok]),
            # how long a workload waited to be off a, on average: what the order trades
            "mean_off_seconds": _stat([statistics.mean(x["ended"] for x in s["workloads"]) for s in ok]),
            "downtime_app": {w: _stat([x["downtime_app"] for x in xs]) for w, xs in per.items()},
            "downtime_tool": {w: _stat([x["downtime_tool"] for x in xs]) for w, xs in per.items()},
            "targets": {w: sorted({x["host"] for x in xs}) for w, xs in per.items()},
            # the workloads' MiB each target took (the placement's balance)
            "placed_mib": {t: _stat([sum(x["mib"] for x in s["workloads"] if x["host"] == t) for s in ok])
                           for t in sorted({x["host"] for s in ok for x in s["workloads"]})},
        })
    return rows


def _worst(row: dict, alone: dict, key: str) -> tuple[float, str] | None:
    """The largest ratio of a workload's median downtime here to its own moved alone, and whose."""
    ratios = [(row[key][w][0] / alone[key][w][0], w) for w in row[key]
              if row[key][w] and alone[key].get(w) and alone[key][w][0] > 0]
    return max(ratios) if ratios else None


def ratios(rows: list[dict], limits_by_link: dict[str, dict]) -> list[dict]:
    """Each drain's figures against issue 29's goals, within its link: its time to empty over
    the sequential moves' and over the memory at the link's rate (plain TCP's, and scp's),
    and the worst of its workloads' downtimes over their own moved alone."""
    out = []
    for row in rows:
        if not row["contender"].startswith(DRAIN) or not row["seconds"]:
            continue
        alone = next((r for r in rows if r["link"] == row["link"] and r["contender"] == SEQUENTIAL), None)
        lim = limits_by_link.get(row["link"], {})
        secs = row["seconds"][0]
        over_link = {}
        for rate in ("tcp_mibps", "ssh_mibps"):
            if row["memory_bytes"] and lim.get(rate):
                over_link[rate] = secs / (row["memory_bytes"][0] / 2**20 / lim[rate])
        out.append({
            "link": row["link"], "contender": row["contender"],
            "over_sequential": secs / alone["seconds"][0] if alone and alone["seconds"] else None,
            "over_link_tcp": over_link.get("tcp_mibps"), "over_link_scp": over_link.get("ssh_mibps"),
            "worst_over_alone_app": _worst(row, alone, "downtime_app") if alone else None,
            "worst_over_alone_tool": _worst(row, alone, "downtime_tool") if alone else None,
        })
    return out


def _met(v: float | None, at_most: float) -> str:
    return "-" if v is None else "met" if v <= at_most else "NOT met"


def goals(rat: list[dict]) -> list[str]:
    """Issue 29's three goals, for the drain as it ships, on each link."""
    lines = []
    for r in rat:
        if r["contender"] != DRAIN:
            continue
        app, tool = r["worst_over_alone_app"], r["worst_over_alone_tool"]
        lines += [
            f"{r['link']}: time to empty over the sequential `livemig move`s': " + _x(r["over_sequential"])
            + f" (goal <= {GOAL_OVER_SEQUENTIAL:.2f}, i.e. 1.5 times faster: {_met(r['over_sequential'], GOAL_OVER_SEQUENTIAL)})",
            f"{r['link']}: time to empty over the memory at the link's TCP rate: " + _x(r["over_link_tcp"])
            + f" (goal <= {GOAL_OVER_LINK:g}: {_met(r['over_link_tcp'], GOAL_OVER_LINK)}); at scp's rate: "
            + _x(r["over_link_scp"]) + f" ({_met(r['over_link_scp'], GOAL_OVER_LINK)})",
            f"{r['link']}: worst downtime over the same workload's moved alone, as the app saw it: "
            + ("-" if app is None else f"x{app[0]:.2f} ({app[1]})")
            + f" (goal <= {GOAL_OVER_ALONE:g}: {_met(app and app[0], GOAL_OVER_ALONE)}); livemig's figure: "
            + ("-" if tool is None else f"x{tool[0]:.2f} ({tool[1]})")
            + f" ({_met(tool and tool[0], GOAL_OVER_ALONE)})",
        ]
    return lines


def best(rows: list[dict], rat: list[dict]) -> list[str]:
    """Per link, which of the drains (order, moves at once) did best by each measure: what the
    drain's defaults are to be chosen by."""
    lines = []
    for lk in dict.fromkeys(r["link"] for r in rows):
        drains = [r for r in rows if r["link"] == lk and r["contender"].startswith(DRAIN) and r["seconds"]]
        worst = {q["contender"]: q["worst_over_alone_app"][0] for q in rat
                 if q["link"] == lk and q["worst_over_alone_app"]}
        said = []
        for what, of in (("the least time to empty", lambda r: r["seconds"][0]),
                         ("the least mean time until a workload is off", lambda r: r["mean_off_seconds"][0]),
                         ("the least worst downtime over alone", lambda r, worst=worst: worst.get(r["contender"]))):
            known = [r for r in drains if of(r) is not None]
            if known:
                r = min(known, key=of)
                said.append(f"{what}: {r['contender']} ({of(r):.2f}" + (")" if "downtime" in what else " s)"))
        if said:
            lines.append(f"{lk}: " + "; ".join(said))
    return lines


def _x(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


def _s(v: tuple | None) -> str:
    if v is None:
        return "-"
    return f"{v[0]:.1f} ({v[1]:.1f}-{v[2]:.1f})" if v[2] - v[1] >= 0.05 else f"{v[0]:.1f}"


def _ms(v: tuple | None) -> str:
    if v is None:
        return "-"
    med, lo, hi = (x * 1000 for x in v)
    return f"{med:.0f} ({lo:.0f}-{hi:.0f})" if hi - lo >= 1 else f"{med:.0f}"


def table(samples: list[dict], limits_by_link: dict[str, dict]) -> str:
    """The Markdown tables: per contender, the time to empty and the goals' ratios; per
    workload, its downtime under each contender."""
    rows = summary(samples)
    rat = {(r["link"], r["contender"]): r for r in ratios(rows, limits_by_link)}
    lines = []
    for lk in dict.fromkeys(r["link"] for r in rows):
        lim = limits_by_link.get(lk, {})
        here = [r for r in rows if r["link"] == lk]
        lines += [f"Link {lk}: scp {lim.get('ssh_mibps', 0):.0f} MiB/s, plain TCP {lim.get('tcp_mibps', 0):.0f} MiB/s"
                  + (f", a round trip over ssh {lim['rtt_ms']:.1f} ms" if lim.get("rtt_ms") else "")
                  + ". Medians (min-max) over the repetitions that emptied a with every workload intact.", "",
                  ("| contender | runs | time to empty s | drain's total_seconds | drain's moving_seconds | "
                  "mean time until a workload is off a, s | memory MiB | MiB to each target | MiB on a's wire | over sequential "
                  f"(goal <= {GOAL_OVER_SEQUENTIAL:.2f}) | over memory / TCP rate (goal <= {GOAL_OVER_LINK:g}) | "
                  "over memory / scp rate | worst downtime over alone, app (tool) |"),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in here:
            q = rat.get((lk, r["contender"]), {})
            app, tool = q.get("worst_over_alone_app"), q.get("worst_over_alone_tool")
            worst = "-" if app is None else (f"x{app[0]:.2f} {app[1]} (" + ("-" if tool is None else
                                                                            f"x{tool[0]:.2f} {tool[1]}") + ")")
            mem = "-" if r["memory_bytes"] is None else f"{r['memory_bytes'][0] / 2**20:.0f}"
            wire = "-" if r["wire_bytes"] is None else f"{r['wire_bytes'][0] / 2**20:.0f}"
            placed = ", ".join(f"{t} {v[0]:.0f}" for t, v in r["placed_mib"].items() if v) or "-"
            lines.append(f"| {r['contender']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
                         + f" | {r['runs']} | {_s(r['seconds'])} | {_s(r['drain_total_seconds'])} | "
                         f"{_s(r['drain_moving_seconds'])} | {_s(r['mean_off_seconds'])} | {mem} | {placed} | {wire} | "
                         f"{_x(q.get('over_sequential'))} | {_x(q.get('over_link_tcp'))} | "
                         f"{_x(q.get('over_link_scp'))} | {worst} |")
        names = [r["contender"] for r in here]
        works = list(dict.fromkeys(w for r in here for w in r["downtime_app"]))
        for key, what in (("downtime_app", "seen by the app (its longest stall during its move)"),
                          ("downtime_tool", "as the tool reports it (the seeds': their whole procedure)")):
            lines += ["", f"Each workload's downtime {what}, ms; the target it went to:", "",
                      "| workload | MiB | dirty MiB/s | " + " | ".join(names) + " |",
                      "| --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
            spec = {w.name: w for w in WORKLOADS}
            for w in works:
                sp = spec.get(w)
                size = "-" if sp is None else f"{sp.total_mib}"
                dirty = "-" if sp is None else f"{sp.dirty_mibps * sp.procs:g}"
                cells = [(_ms(r[key].get(w)) + (f" {','.join(r['targets'][w])}" if r["targets"].get(w) else ""))
                         if w in r[key] else "-" for r in here]
                lines.append(f"| {w}{'' if sp is None or sp.procs == 1 else f' ({sp.procs} processes)'} | {size} | "
                             f"{dirty} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += goals(list(rat.values())) + best(rows, list(rat.values()))
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------------
def enough_memory(need_mib: int) -> tuple[bool, int]:
    """Whether the machine (whose memory the lab hosts share) has need_mib available now."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            have = int(line.split()[1]) // 1024
            return have >= need_mib, have
    return False, 0


def memory_needed_mib() -> int:
    """At the most: every workload on a and its copy on a target (a fill's room: 1.25 times),
    the biggest one's images and archive on both hosts (the seeds' /img is a tmpfs), and 2 GiB
    for the hosts, their livemigs and CRIU."""
    total = sum(w.total_mib for w in WORKLOADS)
    biggest = max(w.total_mib for w in WORKLOADS)
    return int(total * 2.25 + biggest * 3 + 2048)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=1, help="repetitions of every contender (default 1)")
    ap.add_argument("--link", default="unshaped",
                    help=f"link profiles, comma-separated, each in turn (default unshaped; of: {', '.join(link.PROFILES)})")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"which, comma-separated (default all: {', '.join(CONTENDERS)})")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    links = [x.strip() for x in a.link.split(",") if x.strip()]
    names = [x.strip() for x in a.contenders.split(",") if x.strip()]
    if bad := next((x for x in links if x not in link.PROFILES), None):
        print(f"bench.drain: no link profile {bad!r} (there are: {', '.join(link.PROFILES)})", file=sys.stderr)
        return 2
    if bad := next((x for x in names if x not in CONTENDERS), None):
        print(f"bench.drain: no contender {bad!r} (there are: {', '.join(CONTENDERS)})", file=sys.stderr)
        return 2
    need = memory_needed_mib()
    fits, have = enough_memory(need)
    if not fits:
        print(f"bench.drain: needs about {need} MiB of memory available, the machine has {have}", file=sys.stderr)
        return 2
    began, started = time.monotonic(), time.gmtime()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y-%m-%dT%H-%M-%S', started)}-drain.json"
    result = {"started": time.strftime("%Y-%m-%dT%H-%M-%SZ", started), "machine": output.machine(),
              "memory_available_mib": have, "memory_needed_mib": need, "lab": "netns", "hosts": list(HOSTS),
              "args": vars(a), "links": links, "contenders": names,
              "workloads": [dataclasses.asdict(w) for w in WORKLOADS], "limits_by_link": {}, "samples": []}

    def save() -> None:
        result["run_seconds"] = time.monotonic() - began
        result["summary"] = summary(result["samples"])
        result["ratios"] = ratios(result["summary"], result["limits_by_link"])
        path.write_text(json.dumps(result, indent=1) + "\n")

    Lab.down()      # a lab left up may carry another checkout: ours is mounted at /opt/livemig
    lab = Lab.up(len(HOSTS))
    try:
        for lk in links:
            link.shape(lab, link.PROFILES[lk], HOSTS)
            try:
                print(f"measuring the link ({lk})...", file=sys.stderr)
                lim = limits.measure(lab, "a", "b", probe_mib=256)
                result["limits_by_link"][lk] = dataclasses.asdict(lim)
                print(f"  scp {lim.ssh_mibps:.0f} MiB/s, tcp {lim.tcp_mibps:.0f} MiB/s, a round trip over ssh "
                      f"{lim.rtt_ms:.1f} ms", file=sys.stderr)
                for rep in range(a.reps):
                    for name in names[rep % len(names):] + names[:rep % len(names)]:   # no contender always first
                        t = time.monotonic()
                        print(f"rep {rep + 1}/{a.reps}, {lk}: {name}...", file=sys.stderr, flush=True)
                        s = sample(lab, name, rep, lk)
                        result["samples"].append(s)
                        save()          # after every sample: a run that dies late keeps what it measured
                        secs = "-" if s["seconds"] is None else f"{s['seconds']:.1f}"
                        print(f"  empty in {secs} s; downtimes (app) " + ", ".join(
                            f"{x['name']} {'-' if x['downtime_app'] is None else round(x['downtime_app'] * 1000)}"
                            for x in s.get("workloads", [])) + f" ms; this contender took {time.monotonic() - t:.0f} s"
                            + ("" if s["ok"] else f"  FAILED: {s['error']}"), file=sys.stderr, flush=True)
            finally:
                link.unshape(lab, HOSTS)
    finally:
        Lab.down()
    save()
    text = table(result["samples"], result["limits_by_link"])
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nthe run took {result['run_seconds'] / 60:.1f} minutes\n-> {path}")
    return 0 if all(s["ok"] for s in result["samples"]) else 1


if __name__ == "__main__":
    sys.exit(main())
