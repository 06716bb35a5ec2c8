"""Fills broken while the copy fills (issue 8's matrix, phase `fill`): pre-copy by page
hashes, and stop-and-copy into memory.

The copy runs once every page is on the target's host, and is filled from the agent's
memory while it runs; the source's copy waits, stopped, until it has them all. So a
failure then ends as post-copy's do: the copy ran, so the source's never runs again but by
the operator's word, and then exactly one copy runs, whole. Each test moves 1 GiB
(its fill lasts seconds after the resume), breaks something as soon as the copy runs, and
checks that one copy counts on with every page intact and nothing of the move is left.
"""

from __future__ import annotations

import pytest

from tests.test_postcopy_faults import (
    agent_killed_mid_move,
    killed_mid_move_then_recovered,
    said_by_livemig,
    start_move,
)
from tests.test_stopcopy_faults import assert_one_copy_whole

pytestmark = pytest.mark.lab

MIB, DIRTY = 1024, 20


MODES = pytest.mark.parametrize("mode", ["precopy", "stopcopy"], ids=["pre-copy by hashes", "stop-and-copy"])


@MODES
def test_the_target_agent_killed_mid_fill_a_successor_takes_its_copy_over_and_the_move_ends_on_b(lab, mode):
    # the pages the agent held in its memory went with it: the successor gets every page the
    # copy may lack from the source's copy, stopped (or the fill was whole before the kill)
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4651 + 10 * (mode == "stopcopy"), port=7851)
    agent_killed_mid_move(lab, work, mode)


@MODES
def test_ctrl_c_mid_fill_waits_for_the_fill_and_the_move_is_done(lab, mode):
    """The copy runs: undone, what it did would be done again by the source's, older. The
    interrupt waits for the fill to end, and the move is done (exit code 0)."""
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4653 + 10 * (mode == "stopcopy"), port=7851)
    before = work.query("a")
    mover, seen = start_move(lab, work, mode)
    lab.run("a", ["pkill", "-INT", "-f", "livemig move"])
    out, err = mover.communicate(timeout=300)
    err = (seen + err).decode()
    assert "Traceback" not in err, err
    with said_by_livemig(err):
        assert mover.returncode == 0 and "moved" in out.decode(), out
        assert_one_copy_whole(lab, work, "b", before)


@MODES
def test_the_coordinator_killed_mid_fill_then_recover_leaves_one_whole_copy(lab, mode):
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4652 + 10 * (mode == "stopcopy"), port=7852)
    killed_mid_move_then_recovered(lab, work, mode)
