"""Pre-copy by page hashes, broken while its copy fills (issue 8's matrix, phase `fill`).

The copy runs once every page is on the target's host, and is filled from the agent's
memory while it runs; the source's copy waits, stopped, until it has them all. So a
failure then ends as post-copy's do: exactly one copy runs, whole. Each test moves 1 GiB
(its fill lasts seconds after the resume), breaks something as soon as the copy runs, and
checks that one copy counts on with every page intact and nothing of the move is left.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.test_move import leftovers
from tests.test_postcopy_faults import assert_runs_on_a_whole, gone_from_b, source_state

pytestmark = pytest.mark.lab

MIB, DIRTY = 1024, 20


def start_move(lab, work):
    mover = lab.popen("a", ["livemig", "move", "--pid", str(work.pid), "--mode", "precopy", "b"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"running on the target" not in seen:
        line = mover.stderr.readline()
        assert line, f"livemig ended before the target ran: {seen!r}"
        seen += line
    return mover, seen


def test_the_target_agent_killed_mid_fill_rolls_back_to_the_source(lab):
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4651, port=7851)
    before = work.query("a")
    mover, seen = start_move(lab, work)
    lab.run("b", ["pkill", "-KILL", "-f", "livemig agent"])
    _, err = mover.communicate(timeout=120)
    err = (seen + err).decode()
    assert mover.returncode == 4, err
    assert "Traceback" not in err
    assert "livemig: fill on b: filling the copy failed" in err and "runs here again" in err, err
    # its guard killed the copy before its uffds went; the source's, whole, runs on
    assert_runs_on_a_whole(lab, work, before)
    lab.run("a", ["kill", str(work.pid)])


def test_the_coordinator_killed_mid_fill_then_recover_leaves_one_whole_copy(lab):
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4652, port=7852)
    before = work.query("a")
    mover, _ = start_move(lab, work)
    lab.run("a", ["pkill", "-KILL", "-f", "livemig move"])
    mover.wait(timeout=30)
    # the source's copy waits, stopped, whatever the target's did
    assert source_state(lab, work.pid).startswith("T")
    res = lab.run("a", ["livemig", "recover", "--json"], timeout=120)
    [settled] = json.loads(res.stdout)
    if settled["outcome"] == "rolled back":
        # its agent saw it go while the copy lacked pages, and killed it
        assert gone_from_b(lab, work.pid, within=60)
        assert_runs_on_a_whole(lab, work, before)
        lab.run("a", ["kill", str(work.pid)])
    else:
        # the fill was done first: the copy there is whole, and the source's goes
        assert settled["outcome"] == "moved", settled
        now = work.query("b", wait=10)
        assert now["host"] == "b" and now["counter"] >= before["counter"]
        check = work.query("b", "verify")
        assert (check["bad_pages"], check["pages"]) == (0, work.mib * 256)
        assert lab.run("a", ["kill", "-0", str(work.pid)], check=False).returncode != 0
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
        lab.run("b", ["kill", str(work.pid)])
    assert lab.text("a", ["livemig", "recover"]).strip() == "nothing to recover here"


def test_interrupted_mid_fill_rolls_back_to_the_source(lab):
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4653, port=7853)
    before = work.query("a")
    mover, seen = start_move(lab, work)
    lab.run("a", ["pkill", "-INT", "-f", "livemig move"])
    _, err = mover.communicate(timeout=120)
    err = (seen + err).decode()
    assert mover.returncode == 130, err
    assert "livemig: interrupted: rolled back" in err and "Traceback" not in err, err
    assert_runs_on_a_whole(lab, work, before)
    lab.run("a", ["kill", str(work.pid)])
