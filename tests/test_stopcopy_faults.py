"""Stop-and-copy's failures in the namespaced lab, its pages into image files (--no-fill:
into memory, a fill, fails as pre-copy by hashes does: test_fill_faults.py).

A `livemig move` killed outright on either side of its commit leaves the target's restored
copy stopped, and the source's copy stopped or gone: `livemig recover` must leave exactly
one copy running, its state intact. The coordinator stops itself at the exact point
(LIVEMIG_TEST_STOP_AT, source/testpoints.py's fault injection), and the test kills it there
with SIGKILL: nothing of it runs after.

A workload that exits by itself mid-move is said to have done so (exit code 8), and
nothing of it is left on either host.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.held import wait_stopped
from tests.test_containers import Counter, assert_moved, move
from tests.test_move import leftovers
from tests.waiting import eventually

pytestmark = pytest.mark.lab


def stopped_at(lab, point: str, *what: str, mode: str = "stopcopy") -> tuple[subprocess.Popen, list[str]]:
    """livemig move --mode MODE ... b, stopped at point: the process and its PIDs on a."""
    fill = ["--no-fill"] if mode == "stopcopy" else []
    mover = lab.popen("a", ["env", f"LIVEMIG_TEST_STOP_AT={point}", "livemig", "move", "--mode", mode, *fill,
                            *what, "b"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE)
    return mover, wait_stopped(lab, mover, point, within=300)


def killed_at(lab, point: str, *what: str) -> None:
    """livemig move ... b, SIGKILLed at point; returns once its agent on b has let go (of a
    copy restored and not resumed: at "running" the copy runs, and is no orphan)."""
    mover, stopped = stopped_at(lab, point, *what)
    lab.run("a", ["kill", "-KILL", *stopped])
    os.kill(mover.pid, signal.SIGCONT)     # nsenter stopped itself with its child (job control)
    mover.wait(timeout=30)
    if point == "running":
        return
    # its agent on b sees it go, and leaves the restored copy stopped, marked
    deadline = time.monotonic() + 60
    while not lab.text("b", ["sh", "-c", "ls /var/lib/livemig/*/ORPHANED.json 2>/dev/null"], check=False).strip():
        assert time.monotonic() < deadline, "b left no orphan marker"
        time.sleep(0.2)


def recover(lab, *flags: str) -> dict:
    """`livemig recover` (with flags: --target-lost, the operator's word), which settles the one
    move left; then again, which finds nothing."""
    res = lab.run("a", ["livemig", "recover", "--json", *flags], check=False, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    [settled] = json.loads(res.stdout)["settled"]
    assert lab.text("a", ["livemig", "recover"]).strip() == "nothing to recover here"
    return settled


def stat_of(lab, host: str, pid: int) -> str:
    return lab.text(host, ["ps", "-o", "stat=", "-p", str(pid)], check=False).strip()


def assert_counts_on_whole(work, on: str, before: dict) -> None:
    """The copy on host on counts on from where it was before, every page intact."""
    now = work.query(on, wait=10)
    assert now["host"] == on and now["counter"] >= before["counter"]
    eventually(lambda: work.query(on)["counter"], lambda c: c > now["counter"])    # it counts on
    check = work.query(on, "verify")
    assert (check["bad_pages"], check["pages"]) == (0, work.mib * 256)


def assert_one_copy_whole(lab, work, on: str, before: dict) -> None:
    other = "b" if on == "a" else "a"
    assert_counts_on_whole(work, on, before)
    assert stat_of(lab, other, work.pid) == ""                     # and nothing of it on the other host
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}


def test_killed_after_the_restore_before_the_commit_the_source_runs_on(lab):
    work = lab.start_workload("a", mib=256, dirty_mibps=10, pid=4701, port=7811)
    before = work.query("a")
    killed_at(lab, "restored", "--pid", str(work.pid))
    # CRIU's hook found no coordinator and a journal short of "committed": the source runs
    assert not stat_of(lab, "a", work.pid).startswith("T")
    assert stat_of(lab, "b", work.pid).startswith("T")            # the target's copy: stopped
    settled = recover(lab)
    assert settled["outcome"] == "rolled back" and "the stopped copy on b is gone" in settled["detail"], settled
    assert_one_copy_whole(lab, work, "a", before)
    lab.run("a", ["kill", str(work.pid)])


def test_killed_after_the_commit_before_the_resume_the_target_runs_on(lab):
    work = lab.start_workload("a", mib=256, dirty_mibps=10, pid=4702, port=7812)
    before = work.query("a")
    killed_at(lab, "released", "--pid", str(work.pid))
    # the instant livemig guards against: the source's copy given up (CRIU, told, kills it), the target's stopped
    eventually(lambda: stat_of(lab, "a", work.pid), lambda st: st == "")
    assert stat_of(lab, "b", work.pid).startswith("T")
    settled = recover(lab)
    assert settled["outcome"] == "moved" and settled["detail"].startswith("the copy on b runs now"), settled
    assert_one_copy_whole(lab, work, "b", before)
    lab.run("b", ["kill", str(work.pid)])


def test_killed_between_the_commit_mark_and_criu_s_journal_the_source_runs_on(lab):
    """The mark claims a commit CRIU never got (its journal short of "committed"): CRIU
    resumes the source, and recover, reading the journal and the tree, keeps it running and
    removes the target's stopped copy, never the other way round (issue 27, item 5)."""
    work = lab.start_workload("a", mib=256, dirty_mibps=10, pid=4706, port=7816)
    before = work.query("a")
    killed_at(lab, "marked", "--pid", str(work.pid))
    assert not stat_of(lab, "a", work.pid).startswith("T")
    assert stat_of(lab, "b", work.pid).startswith("T")            # the target's copy: stopped
    settled = recover(lab)
    assert settled["outcome"] == "rolled back" and "CRIU never got the commit" in settled["detail"], settled
    assert "the stopped copy on b is gone" in settled["detail"], settled
    assert_one_copy_whole(lab, work, "a", before)
    lab.run("a", ["kill", str(work.pid)])


# a container's commit is its mark: paused at "marked", its target's copy is the workload;
# released, it stays paused until the target's copy runs, and goes only then (switchover.switch_over):
# killed in between, recover ends it, the target's copy running on
@pytest.mark.parametrize("point, runs_on", [("restored", "a"), ("marked", "b"), ("released", "b"), ("running", "b")])
def test_a_runc_container_killed_either_side_of_the_commit(lab, point, runs_on):
    ctr = Counter(lab, "a", "runc", f"orphan-{point}")
    time.sleep(0.5)
    before = ctr.count("a")
    killed_at(lab, point, ctr.name)
    assert ctr.status("b") == ("running" if point == "running" else "paused")
    assert ctr.status("a") == "paused"
    settled = recover(lab)
    assert settled["outcome"] == ("rolled back" if runs_on == "a" else "moved"), settled
    other = "b" if runs_on == "a" else "a"
    assert ctr.status(runs_on) == "running" and ctr.status(other) is None
    eventually(lambda: ctr.count(runs_on), lambda c: c > before)     # it went on from where it was
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    ctr.remove(runs_on)
    ctr.remove(other)


def test_a_workload_that_exits_mid_move_is_said_to_and_nothing_is_left(lab):
    work = lab.start_workload("a", mib=256, dirty_mibps=0, pid=4703, port=7813)
    # at the instant livemig is about to freeze it (waiting for a log line raced the dump)
    mover, _stopped = stopped_at(lab, "final-dump", "--pid", str(work.pid))
    lab.run("a", ["kill", "-KILL", str(work.pid)])
    os.kill(mover.pid, signal.SIGCONT)
    err = mover.stderr.read().decode()
    assert mover.wait(timeout=120) == 8, err
    assert "the workload exited by itself during the move" in err and "Traceback" not in err, err
    assert stat_of(lab, "a", work.pid) == "" and stat_of(lab, "b", work.pid) == ""
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}


def test_a_target_without_room_for_the_images_is_refused_in_preflight(lab, small_image_root):
    small_image_root(64)
    work = lab.start_workload("a", mib=256, pid=4704, port=7814)
    before = work.query("a")
    res = lab.run("a", ["livemig", "move", "--pid", str(work.pid), "b"], check=False, timeout=120)
    err = res.stderr.decode()
    assert res.returncode == 3 and "no room for the images" in err and "MiB needed" in err, err
    assert work.query("a")["counter"] > before["counter"] and stat_of(lab, "b", work.pid) == ""
    lab.run("a", ["kill", str(work.pid)])


def test_a_target_whose_disk_fills_during_the_dump_rolls_back(lab, small_image_root):
    small_image_root(400)
    work = lab.start_workload("a", mib=256, dirty_mibps=10, pid=4705, port=7815)
    before = work.query("a")
    # the room was there at the preflight; something else takes it before the pages land
    mover, _stopped = stopped_at(lab, "final-dump", "--pid", str(work.pid))
    lab.run("b", ["sh", "-c", "head -c 390M /dev/zero > /var/lib/livemig/filler"], check=False)
    os.kill(mover.pid, signal.SIGCONT)     # nsenter, stopped with its child, passes it on
    err = mover.stderr.read().decode()
    rc = mover.wait(timeout=300)
    assert rc == 5 and "Traceback" not in err, (rc, err)
    # the target's CRIU knew why, and the error says it: not the source's "broken pipe"
    assert "on b: criu page-server failed" in err and "No space left on device" in err, err
    lab.run("b", ["rm", "-f", "/var/lib/livemig/filler"])
    now = work.query("a", wait=10)
    assert now["host"] == "a" and now["counter"] > before["counter"]
    assert work.query("a", "verify")["bad_pages"] == 0 and stat_of(lab, "b", work.pid) == ""
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("a", ["kill", str(work.pid)])


def test_a_bundle_copy_left_by_an_agent_killed_outright_does_not_block_the_next_move(lab):
    ctr = Counter(lab, "a", "runc", "api3")
    try:
        time.sleep(1)
        mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=restore", "livemig", "move", "--json", "api3", "b"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stopped = wait_stopped(lab, mover, "restore")
        assert lab.run("b", ["test", "-d", ctr.bundle], check=False).returncode == 0     # the bundle's copy
        lab.run("b", ["pkill", "-KILL", "-f", "livemig agent"])          # and its agent dies without a word
        lab.run("a", ["kill", "-CONT", *stopped], check=False)
        os.kill(mover.pid, signal.SIGCONT)     # nsenter stopped itself with its child (job control)
        out, err = mover.communicate(timeout=300)
        assert mover.returncode == 4 and json.loads(out)["outcome"] == "rolled back", err.decode()
        assert ctr.status("a") == "running"
        # the next move's agent sweeps the dead one's directory, and the copy it left with it
        before, t = ctr.count("a"), time.monotonic()
        assert_moved(lab, ctr, "a", "b", before, t, move(lab, "a", "b", "api3"))
    finally:
        for host in ("a", "b"):
            ctr.remove(host)
