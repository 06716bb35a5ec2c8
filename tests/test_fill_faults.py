"""Fills broken while the copy fills (issue 8's matrix, phase `fill`): pre-copy by page
hashes, and stop-and-copy into memory.

The copy runs once every page is on the target's host, and is filled from the agent's
memory while it runs; the source's copy waits, stopped, until it has them all. So a
failure then ends as post-copy's do: exactly one copy runs, whole. Each test moves 1 GiB
(its fill lasts seconds after the resume), breaks something as soon as the copy runs, and
checks that one copy counts on with every page intact and nothing of the move is left.
"""

from __future__ import annotations

import json

import pytest

from tests.test_move import leftovers
from tests.test_postcopy_faults import assert_runs_on_a_whole, broken_mid_move, gone_from_b, source_state, start_move

pytestmark = pytest.mark.lab

MIB, DIRTY = 1024, 20


MODES = pytest.mark.parametrize("mode", ["precopy", "stopcopy"], ids=["pre-copy by hashes", "stop-and-copy"])


@MODES
@pytest.mark.parametrize("host, victim, code, said, pid", [
    # its guard kills the copy before its uffds go; the coordinator reads the guard's verdict
    ("b", ["-KILL", "-f", "livemig agent"], 4, "livemig: fill on b: filling the copy failed", 4651),
    ("a", ["-INT", "-f", "livemig move"], 130, "livemig: interrupted: rolled back", 4653),
], ids=["target agent killed", "ctrl-c"])
def test_a_fill_broken_rolls_back_to_the_source(lab, mode, host, victim, code, said, pid):
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=pid + 10 * (mode == "stopcopy"), port=7851)
    broken_mid_move(lab, work, host, ["pkill", *victim], code, said, mode=mode)


@MODES
def test_the_coordinator_killed_mid_fill_then_recover_leaves_one_whole_copy(lab, mode):
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4652 + 10 * (mode == "stopcopy"), port=7852)
    before = work.query("a")
    mover, _ = start_move(lab, work, mode)
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
