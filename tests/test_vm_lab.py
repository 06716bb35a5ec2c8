"""The VM lab: a kernel with soft-dirty, so that real iterative pre-copy is proven here.

Everything runs under TCG emulation on our machines: slow, so the workloads are small.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livemig import criu
from tests import test_faithful as faithful
from tests.clients import Client
from tests.held import end_if_held, go_on, wait_stopped

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[1]


def test_vm_lab_cli_up_down_leaves_nothing():
    # first in this module: it must not pull the shared vm_lab from under the tests after it
    from tests.lab import Lab, vm
    Lab.down()
    up = subprocess.run([sys.executable, "-m", "tests.lab", "up", "--kind", "vm"], cwd=REPO,
                        capture_output=True, timeout=900, check=False)
    assert up.returncode == 0, up.stderr.decode()
    assert json.loads(up.stdout)["kind"] == "vm" and vm._lab_qemus()
    down = subprocess.run([sys.executable, "-m", "tests.lab", "down"], cwd=REPO, capture_output=True, timeout=300, check=False)
    assert down.returncode == 0, down.stderr.decode()
    assert vm._lab_qemus() == [] and not vm.LAB_DIR.exists()


def test_vms_reach_each_other_and_track_dirty_pages(vm_lab):
    assert vm_lab.kind == "vm" and vm_lab.state.accel in ("tcg", "kvm")
    assert [(h.name, h.address) for h in vm_lab.hosts] == [("a", "198.18.0.1"), ("b", "198.18.0.2")]
    assert vm_lab.text("a", ["ssh", "b", "hostname"]).strip() == "b"
    assert vm_lab.text("b", ["ssh", "a", "hostname"]).strip() == "a"
    for h in ("a", "b"):
        assert "is supported" in vm_lab.text(h, ["criu", "check", "--feature", "mem_dirty_track"])
    # the CLI speaks to the VM lab as to the namespaced one
    out = subprocess.run([sys.executable, "-m", "tests.lab", "exec", "b", "--", "hostname"], cwd=REPO,
                         capture_output=True, timeout=120, check=False)
    assert (out.returncode, out.stdout) == (0, b"b\n")


def stats(lab, host: str, path: str) -> criu.DumpStats:
    return criu.parse_stats(lab.run(host, ["cat", path]).stdout)


def test_two_pre_dumps_and_a_final_dump_restore_on_the_other_vm(vm_lab):
    """criu by hand: pre-dump, pre-dump, dump with the chain of parents; copy; restore on b."""
    work = vm_lab.start_workload("a", mib=32, dirty_mibps=1, pid=4701, hot_mib=8)    # dirties 8 MiB at most
    before = work.query("a")
    run = lambda *argv: vm_lab.run("a", list(argv), timeout=600)
    run("mkdir", "-p", "-m", "700", "/img/chain/1", "/img/chain/2", "/img/chain/3")
    run("criu", "pre-dump", "-t", str(work.pid), "-D", "/img/chain/1", "-o", "log", "--track-mem")
    run("criu", "pre-dump", "-t", str(work.pid), "-D", "/img/chain/2", "-o", "log", "--track-mem",
        "--prev-images-dir", "../1")
    run("criu", "dump", "-t", str(work.pid), "-D", "/img/chain/3", "-o", "log", "--track-mem",
        "--prev-images-dir", "../2")
    rounds = [stats(vm_lab, "a", f"/img/chain/{i}/stats-dump") for i in (1, 2, 3)]
    # the first round sends everything; the next ones only what was dirtied since
    assert rounds[0].pages_written >= 32 * 256
    assert rounds[1].pages_written < rounds[0].pages_written / 2
    assert rounds[2].pages_skipped_parent > 0 and rounds[2].pages_written < rounds[0].pages_written / 2
    run("scp", "-q", "-r", "/img/chain", "b:/img/")
    vm_lab.run("b", ["criu", "restore", "-D", "/img/chain/3", "-d", "-o", "restore.log"], timeout=600)
    after = work.query("b", wait=30)
    assert after["host"] == "b" and after["counter"] > before["counter"]
    assert work.query("b", "verify")["bad_pages"] == 0
    print(json.dumps({f"round {i + 1}": {"pages_written": r.pages_written, "frozen_s": round(r.frozen_time, 3)}
                      for i, r in enumerate(rounds)}))
    for h in ("a", "b"):
        vm_lab.run(h, ["rm", "-rf", "/img/chain"])
    vm_lab.run("b", ["kill", str(work.pid)])


def move(lab, pid: int, *args: str) -> dict:
    res = lab.run("a", ["livemig", "move", "--pid", str(pid), "--json", *args, "b"], check=False, timeout=1200)
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout)


def test_livemig_precopy_sends_rounds_while_the_workload_runs(vm_lab):
    work = vm_lab.start_workload("a", mib=48, dirty_mibps=1, pid=4702, hot_mib=12)    # dirties 12 MiB at most
    before = work.query("a")
    report = move(vm_lab, work.pid, "--mode", "precopy")
    kinds = [r["kind"] for r in report["rounds"]]
    assert kinds[-1] == "dump" and kinds.count("pre-dump") >= 2, report["rounds"]
    assert report["precopy_stop_reason"]
    # the final dump sends far less than the first round did
    assert report["rounds"][-1]["pages_written"] < report["rounds"][0]["pages_written"] / 2
    after = work.query("b", wait=30)
    assert after["counter"] > before["counter"] and work.query("b", "verify")["bad_pages"] == 0
    vm_lab.run("b", ["kill", str(work.pid)])


def test_livemig_auto_picks_hybrid_here(vm_lab):
    work = vm_lab.start_workload("a", mib=16, dirty_mibps=0.5, pid=4703, hot_mib=2)    # dirties 2 MiB at most
    before = work.query("a")
    report = move(vm_lab, work.pid)
    assert report["mode"] == "hybrid" and "track dirty pages" in report["mode_reason"]
    assert next(r["kind"] for r in report["rounds"]) == "pre-dump"
    # after the restore only the last dirty set comes over, not the whole memory again
    assert 0 < report["postcopy_pages"] < report["rounds"][0]["pages_written"] / 4, report
    after = work.query("b", wait=30)
    assert after["counter"] > before["counter"] and work.query("b", "verify")["bad_pages"] == 0
    vm_lab.run("b", ["kill", str(work.pid)])


def test_a_tree_comes_out_of_soft_dirty_pre_copy_and_hybrid_as_it_went_in(vm_lab):
    # tests/test_faithful.py's tree (stopped tasks, a zombie, signals pending, a socket set to
    # bind anywhere), through the modes only this kernel has: over to b by pre-copy, back by hybrid
    pid, port = 4720, 7720
    with faithful.states_tree(vm_lab, pid, port, faithful.FREE_V6):
        before = faithful.seen(vm_lab, "a", port)
        for src, dst, mode in (("a", "b", "precopy"), ("b", "a", "hybrid")):
            res = faithful.move(vm_lab, src, pid, dst, "--mode", mode)
            assert res.returncode == 0, res.stderr.decode()
            report = json.loads(res.stdout)
            assert report["outcome"] == "moved" and report["rounds"][0]["kind"] == "pre-dump"
            now = faithful.seen(vm_lab, dst, port)
            faithful.assert_as_it_went_in(now, before)
            assert f"[{faithful.FREE_V6}]:{port + 1}" in faithful.listening(vm_lab, dst)
            before = now


def test_a_pre_fork_tree_keeps_its_sharing_through_soft_dirty_pre_copy_and_hybrid(vm_lab):
    # tests/test_faithful.py's pre-fork tree (every page shared by a parent and its children):
    # soft-dirty pre-copy's final dump is CRIU's own, into image files; hybrid's is lazy, but
    # only for the pages written since the last round: the rest CRIU restores from the
    # pre-dump's images, and shares (what a lazy page shares goes into the images: pages/cow.py)
    pid, port = 4730, 7730
    with faithful.prefork_tree(vm_lab, pid, port, mib=16, children=2) as tree:
        pids = [tree["root"], *tree["children"]]
        before = vm_lab.pss_bytes("a", pids)
        for src, dst, mode in (("a", "b", "precopy"), ("b", "a", "hybrid")):
            res = faithful.move(vm_lab, src, pid, dst, "--mode", mode)
            assert res.returncode == 0, res.stderr.decode()
            report = json.loads(res.stdout)
            assert report["rounds"][0]["kind"] == "pre-dump"
            assert report["pages_into"] == ("post-copy" if mode == "hybrid" else "image files")
            assert vm_lab.pss_bytes(dst, pids) <= before * 1.05        # shared as it was
            tree = faithful.prefork_read_again(vm_lab, dst, port, tree)
            assert tree["memory_ok"]


def cut_from_a(lab) -> None:
    """Every SSH session a holds to b killed (the coordinator's link cut), the harness's own
    to b (from the machine, through QEMU's network) left: the client asks on."""
    def sessions() -> tuple[list[str], str]:
        out = lab.text("b", ["ss", "-Htnp", "state", "established", "( sport = :22 )"])
        return sorted({pid for line in out.splitlines() if " 198.18.0.1:" in line
                       for pid in re.findall(r"pid=(\d+)", line)}), out

    pids, out = sessions()
    assert pids, out
    # the coordinator is stopped: it opens none meanwhile, so every one of its sessions goes
    for _ in range(10):
        lab.run("b", ["kill", "-KILL", *pids], check=False)     # (one may have ended by itself)
        time.sleep(0.2)
        pids, out = sessions()
        if not pids:
            return
    raise AssertionError(f"sessions from a still on b after SIGKILL: {out}")


@pytest.mark.parametrize("fault, pid", [("cut", 4706), ("agent", 4707), ("sigkill", 4708)])
def test_hybrid_s_post_copy_broken_here_goes_forward_and_ends_on_b(vm_lab, fault, pid):
    # auto's choice where the kernel tracks dirty pages: pre-copy rounds, then a lazy final
    # dump whose pages follow the resume. Held once the copy on b runs (its pages wait for
    # the coordinator, stopped), then a's SSH sessions to b are cut (the link is made again),
    # b's agent killed (a successor takes the copy over), or the coordinator killed (`livemig
    # recover` takes its page stream up); a client asks on both hosts all along
    port = 7700 + pid % 100
    work = vm_lab.start_workload("a", mib=24, dirty_mibps=1, pid=pid, hot_mib=6, port=port)
    before = work.query("a")
    with Client(vm_lab, port, every=0.5) as client:
        mover = vm_lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=running", "livemig", "move", "--json", "--mode",
                                   "hybrid", "--pid", str(pid), "b"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            stopped = wait_stopped(vm_lab, mover, "running", within=900)
            if fault == "cut":
                cut_from_a(vm_lab)
            elif fault == "agent":
                vm_lab.run("b", ["pkill", "-KILL", "-f", "livemig agent"])
            else:
                vm_lab.run("a", ["kill", "-KILL", *stopped])
            go_on(vm_lab, mover, stopped)
            out, err = mover.communicate(timeout=900)
        finally:
            end_if_held(vm_lab, mover)
        if fault == "sigkill":
            res = vm_lab.run("a", ["livemig", "recover", "--json"], check=False, timeout=600)
            [settled] = json.loads(res.stdout)["settled"]
            assert res.returncode == 0 and settled["outcome"] == "moved", settled
            assert "has every page now" in settled["detail"], settled
        else:
            assert mover.returncode == 0, err.decode()
            report = json.loads(out)
            said = {k: report[k] for k in ("reconnects", "postcopy_pages", "warnings", "downtime_seconds")}
            assert (report["mode"], report["outcome"], report["reconnects"]) == ("hybrid", "moved", 1), \
                (said, err.decode()[-3000:])
            assert report["rounds"][0]["kind"] == "pre-dump" and report["postcopy_pages"] > 0, report
        after = work.query("b", wait=60)
    assert not client.errors and not client.taken_back(), (client.errors, client.said())
    assert client.answers[-1].host == "b", client.said()
    assert after["host"] == "b" and after["counter"] > before["counter"]
    assert work.query("b", "verify")["bad_pages"] == 0
    assert vm_lab.run("a", ["kill", "-0", str(pid)], check=False).returncode != 0     # nothing runs on a
    vm_lab.run("b", ["kill", str(pid)])


def test_containers_pre_copy_here_runc_crun_and_podman(vm_lab):
    """With soft-dirty, each runtime pre-copies: runc and crun chain pre-dumps, podman takes
    its one pre-checkpoint; runc also comes back with hybrid (pre-copy, then lazy pages)."""
    from tests.test_containers import Counter, assert_moved

    def move_ctr(src: str, dst: str, *args: str):
        return vm_lab.run(src, ["livemig", "move", "--json", *args, dst], check=False, timeout=1200)

    for runtime, name in (("runc", "v1"), ("crun", "v2")):
        ctr = Counter(vm_lab, "a", runtime, name)
        before, t = ctr.count("a"), time.monotonic()
        report = assert_moved(vm_lab, ctr, "a", "b", before, t, move_ctr("a", "b", "--mode", "precopy", name))
        assert next(r["kind"] for r in report["rounds"]) == "pre-dump" and report["mode"] == "precopy"
        if runtime == "runc":
            before, t = ctr.count("b"), time.monotonic()
            report = assert_moved(vm_lab, ctr, "b", "a", before, t, move_ctr("b", "a", "--mode", "hybrid", name))
            assert report["mode"] == "hybrid" and report["rounds"][0]["kind"] == "pre-dump"
            ctr.remove("a")
        else:
            ctr.remove("b")
    # podman: auto picks its pre-checkpoint here, and the counter server answers the next number
    tool = "/opt/livemig/tests/workloads/container.py"
    env = ["env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1"]
    first = int(vm_lab.text("a", ["python3", tool, "serve", "--name", "web5"], timeout=600))
    res = move_ctr("a", "b", "web5")
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert (report["runtime"], report["mode"]) == ("podman", "precopy")
    assert [r["kind"] for r in report["rounds"]] == ["pre-dump", "dump"], report["rounds"]
    assert report["rounds"][0]["pages_written"] > 0
    assert int(vm_lab.text("b", ["python3", tool, "ask", "--name", "web5"], timeout=120)) == first + 1
    vm_lab.run("b", [*env, "podman", "rm", "--force", "web5"])


BUDGET = "4"    # seconds of downtime: what CRIU under TCG can meet at all (its rounds' fixed cost is 2 s)


def test_auto_converge_makes_pre_copy_converge_where_without_it_it_levels_off(vm_lab):
    """Issue 9, goal 2. memcounter in a runc container, 16 MiB rewritten at 20 MiB/s, moved at
    most 2 MiB/s (about 1024 of its pages a second: they compress to half): the workload
    rewrites five times as many pages as pre-copy sends, by construction and not by how fast
    TCG runs here (should the emulated CPU not keep up with its writes and their work, it
    still writes over 1024 pages a second while its work per page is under a millisecond),
    so unthrottled the rounds level off at nearly every page (4 s at the cap, and CRIU's
    fixed cost on top) and never meet the downtime budget. Throttled through the
    container's cgroup (cgroup v2 here) in QEMU's steps, the rounds shrink until the final
    dump fits it. The budget is TCG's: every CRIU run here has seconds of fixed cost."""
    from tests.test_autoconverge import CONVERGED, Dirtier
    ctr = Dirtier(vm_lab, "conv1", 7841, mib=16, dirty_mibps=20, cpu_per_page=1)

    def move_ctr(src: str, dst: str, *args: str):
        return vm_lab.run(src, ["livemig", "move", "--json", "--mode", "precopy", "--max-downtime", BUDGET,
                                "--max-bandwidth", "2M", "--compression-level", "1", *args, "conv1", dst],
                          check=False, timeout=1800)      # (level 1: the pages at half their size, as counted above)
    # unthrottled, the final dump would take longer than the budget promised: refused before the
    # freeze (exit code 10), the container running on where it was
    res = move_ctr("a", "b", "--no-throttle")
    assert res.returncode == 10, res.stderr.decode()
    free = json.loads(res.stdout)
    assert free["throttle"] == "off" and free["throttle_steps"] == []
    assert free["precopy_stop_reason"] not in CONVERGED, free["precopy_stop_reason"]
    assert free["expected_downtime_seconds"] > float(BUDGET) and free["outcome"] == "failed"
    assert ctr.status("a") == "running" and ctr.status("b") is None
    held = ctr.moved_intact("a", "b", ctr.query("a"), move_ctr("a", "b"))
    assert held["throttle"] == "ready" and held["throttle_steps"][0]["percent"] == 20
    assert held["precopy_stop_reason"] in CONVERGED, (held["precopy_stop_reason"], held["rounds"])
    pre = [r for r in held["rounds"] if r["kind"] == "pre-dump"]
    # the pre-dumps freeze the workload at full speed, throttled or not (the quota is eased meanwhile)
    # (not eased, a pre-dump at 99 % stood 12 s against 0.2 to 0.4 s unthrottled)
    assert max(r["frozen_seconds"] for r in pre if r["throttle"]) < 5 * max(r["frozen_seconds"] for r in pre[:2])
    # the rounds fall under the level they hold unthrottled, and so does the final dump: the
    # direction; how far is the bench's to measure (bench/)
    assert pre[-1]["pages_written"] < min(r["pages_written"] for r in free["rounds"][:-1])
    assert held["rounds"][-1]["pages_written"] < free["rounds"][-1]["pages_written"]
    ctr.remove("b")

