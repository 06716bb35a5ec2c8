"""Auto-converge in the namespaced lab: a runc container running memcounter that dirties
memory faster than pre-copy (by page hashes, here) sends it. Throttled through its cgroup's
CPU quota in QEMU's steps, pre-copy converges; without the throttle it does not. The
throttle is lifted at the switchover (the target's copy is never throttled), on a
rollback, and by `livemig recover` after a livemig killed outright.

That the workload outruns pre-copy holds by construction, not by the machine's speed: the
move is capped at CAP (about 2048 of its pages a second: they compress to half), and the
workload rewrites 25 MiB/s of random pages (6400 a second), three times as many, so
without the throttle nearly every page is rewritten during a round and the rounds cannot
shrink. It works for each page it writes (--cpu-per-page), so that its CPU quota slows its
dirtying in proportion: from the throttle's 80 % on it rewrites fewer pages than a round
sends, and the rounds must shrink; at the kernel's smallest quota (1 ms in 250) the work
alone caps its writes below that on any CPU up to three times this one's speed."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.test_containers import move
from tests.test_move import leftovers
from tests.test_stopcopy_faults import stopped_at

pytestmark = pytest.mark.lab

TOOL = "/opt/livemig/tests/workloads/container.py"
WORKLOAD = "/opt/livemig/tests/workloads/memcounter.py"
CONVERGED = ("the pages left fit the downtime limit", "the last round wrote few pages")
# level 1 pinned: the pages cross at half their size, as the docstring counts (capped, a move
# would choose a level that sends far less of memcounter's: wire/compression.py)
CAP = ("--max-bandwidth", "4M", "--compression-level", "1")


class Dirtier:
    """memcounter in a runc container, on the lab host's network: by default 16 MiB (a round
    of all of it takes 2 s at CAP), 25 MiB/s of random page writes, each page written hashed
    four times over (about a tenth of a CPU here)."""

    def __init__(self, lab, name: str, port: int, host: str = "a", mib: int = 16, dirty_mibps: float = 25,
                 cpu_per_page: int = 4):
        self.lab, self.name, self.port, self.bundle = lab, name, port, f"/var/lib/ctr/{name}"
        lab.run(host, ["python3", TOOL, "memcounter", "--name", name, "--bundle", self.bundle, "--mib", str(mib),
                       "--dirty-mibps", str(dirty_mibps), "--port", str(port),
                       "--cpu-per-page", str(cpu_per_page)], timeout=600)
        self.query(host, wait=120)

    def query(self, host: str, what: str = "get", wait: float = 0.0) -> dict:
        return json.loads(self.lab.text(host, ["python3", WORKLOAD, "query", what, "--port", str(self.port),
                                               "--wait", str(wait)], timeout=600))

    def quota(self, host: str) -> int:
        """Its cgroup's CPU quota in microseconds a period, -1 for none (cgroup v1 or v2)."""
        v1 = self.lab.run(host, ["cat", f"/sys/fs/cgroup/cpu/{self.name}/cpu.cfs_quota_us"], check=False)
        if v1.returncode == 0:
            return int(v1.stdout)
        q = self.lab.text(host, ["cat", f"/sys/fs/cgroup/{self.name}/cpu.max"]).split()[0]
        return -1 if q == "max" else int(q)

    def status(self, host: str) -> str | None:
        res = self.lab.run(host, ["runc", "state", self.name], check=False)
        return json.loads(res.stdout)["status"] if res.returncode == 0 else None

    def moved_intact(self, src: str, dst: str, before: dict, res) -> dict:
        assert res.returncode == 0, res.stderr.decode()
        report = json.loads(res.stdout)
        now = self.query(dst, wait=10)
        assert now["host"] == dst and now["counter"] > before["counter"]
        assert self.query(dst, "verify")["bad_pages"] == 0
        assert self.status(src) is None and self.status(dst) == "running"
        assert self.quota(dst) == -1          # the copy runs at full speed there
        return report

    def remove(self, host: str) -> None:
        self.lab.run(host, ["runc", "delete", "--force", self.name], check=False)
        self.lab.run(host, ["rm", "-rf", self.bundle])


def test_auto_converge_throttles_a_container_that_outruns_pre_copy_until_it_converges(lab):
    ctr = Dirtier(lab, "fast1", 7821)
    before = ctr.query("a")
    report = ctr.moved_intact("a", "b", before, move(lab, "a", "b", "--max-downtime", "0.4", *CAP, "fast1"))
    assert report["mode"] == "precopy" and report["throttle"] == "ready"
    steps = report["throttle_steps"]
    # QEMU's steps: 20 %, then 10 % more at each round that still did not converge
    assert [s["percent"] for s in steps] == [min(99, 20 + 10 * i) for i in range(len(steps))]
    # (the baseline is the CPU the workload used unthrottled: how much that is depends on the
    # CPU's speed, so only that one was measured)
    assert all(s["quota_cpus"] < s["baseline_cpus"] for s in steps) and steps[0]["baseline_cpus"] > 0
    rounds = [r for r in report["rounds"] if r["kind"] == "hashes"]
    assert [r["throttle"] for r in rounds][:steps[0]["after_round"]] == [0] * steps[0]["after_round"]
    assert rounds[-1]["throttle"] == steps[-1]["percent"]
    unthrottled = rounds[steps[0]["after_round"] - 1]["pages_written"]
    assert report["precopy_stop_reason"] in CONVERGED, (report["precopy_stop_reason"], report["rounds"])
    # converged within 0.4 s at the cap: at most about 800 of the 4096 pages every round held
    assert rounds[-1]["pages_written"] < unthrottled / 3, [r["pages_written"] for r in rounds]
    throttled_final = report["rounds"][-1]["pages_written"]

    # the same workload back, with --no-throttle: pre-copy levels off at nearly every page,
    # and the final dump would send several times as much: over the 0.4 s promised, the move
    # is refused before the freeze (exit code 10), and the container runs on where it was
    before = ctr.query("b")
    res = move(lab, "b", "a", "--max-downtime", "0.4", "--no-throttle", *CAP, "fast1")
    assert res.returncode == 10, res.stderr.decode()
    assert "over --max-downtime 400 ms" in res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["outcome"] == "failed", report["outcome"]      # the source never touched
    assert report["final_dump_frozen_seconds"] == 0 and report["downtime_seconds"] == 0
    assert report["throttle"] == "off" and report["throttle_steps"] == []
    assert report["precopy_stop_reason"] not in CONVERGED
    assert report["expected_downtime_seconds"] > 0.4
    assert report["rounds"][-1]["pages_written"] > 3 * throttled_final, (report["rounds"][-1], throttled_final)
    now = ctr.query("b", wait=10)
    assert now["host"] == "b" and now["counter"] > before["counter"]
    assert ctr.query("b", "verify")["bad_pages"] == 0
    assert ctr.status("b") == "running" and ctr.status("a") is None
    ctr.remove("b")
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}


def test_a_process_tree_in_a_shared_cgroup_is_never_throttled_and_the_report_says_why(lab):
    work = lab.start_workload("a", mib=64, pid=4731, port=7822)
    res = lab.run("a", ["livemig", "move", "--json", "--pid", str(work.pid), "b"], check=False, timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    # the lab host's processes (its sshd, livemig itself) share the tree's cgroup
    assert report["throttle"].startswith("unavailable:") and "holds other processes" in report["throttle"]
    assert work.query("b")["counter"] > 0
    lab.run("b", ["kill", str(work.pid)])


def test_a_throttle_outlives_a_killed_livemig_only_until_recover(lab):
    ctr = Dirtier(lab, "fast2", 7823)
    mover, stopped = stopped_at(lab, "throttled", *CAP, "fast2", mode="precopy")
    assert ctr.quota("a") > 0                                      # throttled now
    lab.run("a", ["kill", "-KILL", *stopped])
    os.kill(mover.pid, signal.SIGCONT)
    mover.wait(timeout=30)
    assert ctr.quota("a") > 0 and ctr.status("a") == "running"    # slowed, never stopped
    res = lab.run("a", ["livemig", "recover", "--json"], check=False, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    [settled] = json.loads(res.stdout)["settled"]
    assert settled["outcome"] == "rolled back" and "throttle is lifted" in settled["detail"], settled
    assert ctr.quota("a") == -1 and ctr.query("a", "verify")["bad_pages"] == 0
    # the agent on b forgets the move without its coordinator; nothing of it is left there
    deadline = time.monotonic() + 60
    while leftovers(lab) != {"a": ([], []), "b": ([], [])}:
        assert time.monotonic() < deadline, leftovers(lab)
        time.sleep(0.5)
    ctr.remove("a")


def test_ctrl_c_while_throttled_rolls_back_and_lifts_the_throttle(lab):
    ctr = Dirtier(lab, "fast3", 7824)
    before = ctr.query("a")
    mover, stopped = stopped_at(lab, "throttled", *CAP, "fast3", mode="precopy")
    assert ctr.quota("a") > 0
    lab.run("a", ["kill", "-INT", *stopped])       # waits, pending, until it runs again
    lab.run("a", ["kill", "-CONT", *stopped])
    os.kill(mover.pid, signal.SIGCONT)
    err = mover.stderr.read().decode()
    assert mover.wait(timeout=120) == 130 and "Traceback" not in err, err
    assert ctr.quota("a") == -1 and ctr.status("a") == "running" and ctr.status("b") is None
    now = ctr.query("a")
    assert now["counter"] > before["counter"] and ctr.query("a", "verify")["bad_pages"] == 0
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    ctr.remove("a")
