"""livemig drain in the three-host lab: a host emptied of runc, crun and podman containers and
process trees, onto b and c, every workload's state going on on its target; a drain
interrupted (Ctrl-C), and one killed outright, each run again until the host is empty."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.held import wait_stopped
from tests.test_bandwidth import WireWatch
from tests.test_containers import Counter
from tests.waiting import eventually

pytestmark = pytest.mark.lab

TOOL = "/opt/livemig/tests/workloads/container.py"
ENV = ["env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1"]
TARGETS = ("b", "c")


class Here:
    """The workloads a test drains off a: two trees, a runc, a crun and a podman container."""

    def __init__(self, lab):
        self.lab = lab
        self.small = lab.start_workload("a", mib=32, port=7811)
        self.busy = lab.start_workload("a", mib=64, dirty_mibps=4, port=7812)
        self.mem = lab.start_container_workload("a", mib=48, dirty_mibps=2, port=7801, container="dmem")
        self.crun = Counter(lab, "a", "crun", "dcount")
        self.web_first = int(lab.text("a", ["python3", TOOL, "serve", "--name", "dweb"]))
        self.asked = 0        # answers the podman server gave
        self.before = {w.port: w.query("a") for w in (self.small, self.busy, self.mem)}
        self.count_before = self.crun.count("a")

    def pids(self) -> list[str]:
        return [str(self.small.pid), str(self.busy.pid)]

    def where(self, runtime: str, name: str) -> list[str]:
        """The hosts whose runtime runs container name."""
        found = []
        for h in ("a", *TARGETS):
            argv = [*ENV, "podman", "container", "inspect", name] if runtime == "podman" else [runtime, "state", name]
            res = self.lab.run(h, argv, check=False)
            if res.returncode == 0 and "running" in res.stdout.decode().lower():
                found.append(h)
        return found

    def tree_hosts(self, work) -> list[str]:
        """The hosts where the tree's root runs (its PID may be another process's on another host)."""
        # (read by cat, whose own command line names no memcounter should it be that PID itself)
        return [h for h in ("a", *TARGETS)
                if b"memcounter" in self.lab.run(h, ["cat", f"/proc/{work.pid}/cmdline"], check=False).stdout]

    def assert_each_once_and_whole(self, on: dict[str, str] | None = None) -> dict[str, str]:
        """Every workload runs on exactly one host, counting on from where it was with every
        page intact; on: where each must be ({"dweb": "b", ...}); returns where each is."""
        seen = {}
        for name, runtime in (("dmem", "runc"), ("dcount", "crun"), ("dweb", "podman")):
            [seen[name]] = self.where(runtime, name)
        for w in (self.small, self.busy):
            [seen[str(w.pid)]] = self.tree_hosts(w)
        for w, key in ((self.small, str(self.small.pid)), (self.busy, str(self.busy.pid)), (self.mem, "dmem")):
            now = w.query(seen[key], wait=10)
            assert now["counter"] > self.before[w.port]["counter"], key        # went on from where it was
            check = w.query(seen[key], "verify")
            assert (check["bad_pages"], check["pages"]) == (0, w.mib * 256), key
        assert self.crun.count(seen["dcount"]) > self.count_before
        self.asked += 1
        got = int(self.lab.text(seen["dweb"], ["python3", TOOL, "ask", "--name", "dweb"]))
        assert got == self.web_first + self.asked          # the next number: its state came along
        if on is not None:
            assert seen == on
        return seen

    def remove(self) -> None:
        for h in ("a", *TARGETS):
            self.lab.run(h, [*ENV, "podman", "rm", "--force", "dweb"], check=False)
            self.lab.run(h, ["runc", "delete", "--force", "dmem"], check=False)
            self.lab.run(h, ["crun", "delete", "--force", "dcount"], check=False)
            self.lab.run(h, ["rm", "-rf", "/var/lib/ctr/dmem", "/var/lib/ctr/dcount"], check=False)


def drain(lab, *flags: str, code: int = 0) -> dict:
    res = lab.run("a", ["livemig", "drain", "--json", "--to", ",".join(TARGETS), *flags], check=False, timeout=900)
    assert res.returncode == code, res.stderr.decode()
    return json.loads(res.stdout)


def leftovers(lab) -> dict:
    """Images, CRIU processes and drain directories left on any host (drained.json, and its
    lock, are the record of what drains moved: meant to stay)."""
    found = lab.leftovers(("a", *TARGETS))
    return {h: ([x for x in files if not x.startswith("drained.json")], criu) for h, (files, criu) in found.items()}


def stopped_drain(lab, point: str, *flags: str) -> tuple[subprocess.Popen, list[str]]:
    mover = lab.popen("a", ["env", f"LIVEMIG_TEST_STOP_AT={point}", "livemig", "drain", "--to", ",".join(TARGETS),
                            *flags], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return mover, wait_stopped(lab, mover, point, within=600, named="livemig drain")


@pytest.fixture
def here(lab3):
    w = Here(lab3)
    yield w
    w.remove()


def test_a_drain_empties_the_host_and_a_dry_run_touches_nothing(lab3, here):
    plan = drain(lab3, "--pid", *here.pids(), "--dry-run")
    assert plan["dry_run"] and plan["empty"] and plan["moves"] == [] and not plan["unplaced"]
    placed = {p["workload"]: p for p in plan["placements"]}
    assert set(placed) == {"dmem", "dcount", "dweb", *here.pids()}
    assert {p["target"] for p in placed.values()} == set(TARGETS)        # both targets take some
    assert [p["memory_bytes"] for p in plan["placements"]] == sorted(p["memory_bytes"] for p in plan["placements"])
    assert plan["order"] == "smallest"                                   # the smallest first
    assert placed["dweb"]["runtime"] == "podman" and placed["dcount"]["runtime"] == "crun"
    assert here.assert_each_once_and_whole() == dict.fromkeys(placed, "a")   # nothing moved

    report = drain(lab3, "--pid", *here.pids())
    assert report["empty"] and not report["unplaced"] and report["parallel"] == 2
    assert sorted(m["workload"] for m in report["moves"]) == sorted(placed)
    assert all(m["outcome"] == "moved" and m["report"]["outcome"] == "moved" for m in report["moves"])
    went = {m["workload"]: m["target"] for m in report["moves"]}
    here.assert_each_once_and_whole(on=went)
    assert leftovers(lab3) == {h: ([], []) for h in ("a", *TARGETS)}

    # run again: nothing is here; each is said to have moved earlier, and it is not a failure
    again = drain(lab3, "--pid", *here.pids())
    assert again["empty"] and again["moves"] == [] and again["placements"] == []
    assert sorted((e["workload"], e["target"]) for e in again["earlier"]) == sorted(went.items())
    # a name that is nowhere: one line, exit 2, nothing touched
    res = lab3.run("a", ["livemig", "drain", "--to", "b", "--only", "nosuch"], check=False)
    assert res.returncode == 2 and "no container 'nosuch' here" in res.stderr.decode()


def moves_held(lab, mover: subprocess.Popen, within: float = 600) -> list[str]:
    """The PIDs of a drain's moves, once two of them stopped at their test point."""
    deadline = time.monotonic() + within
    while True:
        held = [line.split()[0] for line in lab.text("a", ["ps", "-eo", "pid=,stat=,args="]).splitlines()
                if "livemig.source.onemove" in line and line.split()[1].startswith("T")]
        if len(held) == 2:
            return held
        assert mover.poll() is None, f"the drain ended: {mover.stderr.read().decode()}"
        assert time.monotonic() < deadline, "the drain's moves never stopped"
        time.sleep(0.05)


def drain_with_moves_held(lab, pids: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """A drain whose first two moves (two at once) stopped frozen and dumped, nothing sent."""
    mover = lab.popen("a", ["env", "LIVEMIG_TEST_MOVES_STOP_AT=transfer", "livemig", "drain", "--json", "--to",
                            ",".join(TARGETS), "--parallel", "2", "--pid", *pids],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return mover, moves_held(lab, mover)


def test_a_drain_interrupted_or_killed_rolls_back_its_moves_under_way_and_goes_on_when_run_again(lab3, here):
    # Ctrl-C once its first move is done (one at a time: none other under way), then again
    mover, stopped = stopped_drain(lab3, "drain-moved", "--pid", *here.pids(), "--parallel", "1")
    lab3.run("a", ["kill", "-INT", *stopped])
    lab3.run("a", ["kill", "-CONT", *stopped])
    os.kill(mover.pid, signal.SIGCONT)     # nsenter stopped itself with its child (job control)
    assert mover.wait(timeout=300) == 130, mover.stderr.read().decode()
    first = here.assert_each_once_and_whole()
    [gone] = [k for k, h in first.items() if h != "a"]
    assert gone in ("dcount", "dweb")                      # the smallest went first (some 3 MiB each)
    assert leftovers(lab3) == {h: ([], []) for h in ("a", *TARGETS)}

    # Ctrl-C while two moves are frozen and dumped: each is told, and rolls back
    mover, held = drain_with_moves_held(lab3, here.pids())
    lab3.run("a", ["pkill", "-INT", "-f", "livemig drain --json"])
    lab3.run("a", ["kill", "-CONT", *held])
    out, err = mover.communicate(timeout=300)
    assert mover.returncode == 130, err.decode()
    report = json.loads(out)
    assert [(m["outcome"], m["exit_code"]) for m in report["moves"]] == [("rolled back", 130)] * 2, report["moves"]
    assert not report["empty"]
    assert here.assert_each_once_and_whole() == first
    assert leftovers(lab3) == {h: ([], []) for h in ("a", *TARGETS)}

    # killed outright with two moves frozen: they die with it, a SIGINT each, and roll back
    mover, held = drain_with_moves_held(lab3, here.pids())
    lab3.run("a", ["pkill", "-KILL", "-f", "livemig drain --json"])
    mover.wait(timeout=60)
    lab3.run("a", ["kill", "-CONT", *held])
    eventually(lambda: lab3.text("a", ["pgrep", "-f", "livemig.source.onemove"], check=False),
               lambda out: not out.strip(), within=300)
    assert here.assert_each_once_and_whole() == first
    [(killeds, _)] = [leftovers(lab3)["a"]]
    assert [x.startswith("drain-") for x in killeds] == [True]    # its own directory: the next drain sweeps it
    assert leftovers(lab3) == {"a": (killeds, []), "b": ([], []), "c": ([], [])}

    # run again: it goes on where it stopped
    report = drain(lab3, "--pid", *here.pids())
    assert report["empty"], report
    assert {m["workload"] for m in report["moves"]} == {k for k, h in first.items() if h == "a"}
    assert [(e["workload"], e["target"]) for e in report["earlier"]] == [(gone, first[gone])]
    final = here.assert_each_once_and_whole()
    assert "a" not in final.values()
    assert leftovers(lab3) == {h: ([], []) for h in ("a", *TARGETS)}


BUDGET = 4 << 20         # "4M": far below what the lab's link and CPUs move, so the budget binds


def test_a_drains_moves_keep_to_one_budget_together_on_the_wire(lab3):
    works = [lab3.start_workload("a", mib=48, dirty_mibps=1, port=port) for port in (7821, 7822)]
    before = {w.port: w.query("a") for w in works}
    with WireWatch(lab3, "a") as wire:
        # level 1 pinned: capped, a move chooses a level that sends far less of memcounter's pages,
        # and the premise (some 48 MiB on the wire: 12 s at the budget) counts them at half their size
        report = drain(lab3, "--pid", *(str(w.pid) for w in works), "--parallel", "2", "--max-bandwidth", "4M",
                       "--compression-level", "1")
    assert report["empty"] and report["max_bandwidth_bytes_per_s"] == BUDGET
    sent = sum(m["report"]["wire_bytes"] for m in report["moves"])
    assert sent > 32 << 20                                  # the premise: the budget binds for seconds
    assert max(m["started_seconds"] for m in report["moves"]) < 1.0      # both at once
    # together they kept to it: no second of a's sending went over it by more than 10 %, and
    # the moves took at least what the budget allows for what they sent
    rates = wire.rates()
    assert len([r for r in rates if r > BUDGET / 4]) >= 5, rates
    assert max(rates) <= 1.1 * BUDGET, rates
    assert report["moving_seconds"] >= (sent - 2 * (64 << 10)) / BUDGET
    for w in works:
        [on] = [m["target"] for m in report["moves"] if m["workload"] == str(w.pid)]
        now = w.query(on, wait=10)
        assert now["counter"] > before[w.port]["counter"]
        assert w.query(on, "verify")["bad_pages"] == 0
        lab3.run(on, ["kill", str(w.pid)])
    assert leftovers(lab3) == {h: ([], []) for h in ("a", *TARGETS)}


def test_a_move_refused_once_the_drain_planned_it_is_tried_again_on_each_target_and_stays_whole(lab3):
    work = lab3.start_workload("a", mib=16, pid=4701, port=7831)
    before = work.query("a")
    mover = lab3.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=drain-planned", "livemig", "drain", "--json", "--to",
                             ",".join(TARGETS), "--pid", "4701"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stopped = wait_stopped(lab3, mover, "drain-planned", within=300, named="livemig drain")
    # planned, then its PID taken on both targets (as another move's copy there could take it)
    for h in TARGETS:
        lab3.start_workload(h, mib=1, pid=4701, port=7832)
    lab3.run("a", ["kill", "-CONT", *stopped])
    os.kill(mover.pid, signal.SIGCONT)     # nsenter stopped itself with its child (job control)
    out, err = mover.communicate(timeout=600)
    assert mover.returncode == 11, err.decode()
    report = json.loads(out)
    tries = [(m["target"], m["exit_code"]) for m in report["moves"]]
    assert {t for t, _ in tries} == set(TARGETS) and {c for _, c in tries} == {3}, tries   # each target, refused
    assert not report["empty"]
    now = work.query("a")                                      # it runs on here, whole
    assert now["counter"] > before["counter"] and work.query("a", "verify")["bad_pages"] == 0
    res = lab3.run("a", ["livemig", "recover", "--list"], check=False)
    assert res.returncode == 0 and "nothing to recover" in res.stdout.decode()
    for h in TARGETS:
        lab3.run(h, ["kill", "4701"])
    # with the PID free again, run again: it moves
    report = drain(lab3, "--pid", "4701")
    assert report["empty"] and [m["outcome"] for m in report["moves"]] == ["moved"]
    [on] = [m["target"] for m in report["moves"]]
    assert work.query(on, "verify")["bad_pages"] == 0
    lab3.run(on, ["kill", "4701"])
    assert leftovers(lab3) == {h: ([], []) for h in ("a", *TARGETS)}
