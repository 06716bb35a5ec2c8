"""Post-copy's failures in the namespaced lab: once the target's copy runs it depends on the
source's pages, so every failure must end with exactly one copy running, whole.

Each test moves a workload that rewrites its memory fast (so that post-copy lasts long
enough to break), waits until its copy answers on b, breaks something, and checks what
is left: one copy counting, its memory intact, nothing of the move on either host.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time

import pytest

from tests.clients import Client
from tests.held import end_if_held, go_on, wait_stopped
from tests.test_move import leftovers
from tests.test_stopcopy_faults import (
    assert_counts_on_whole,
    assert_one_copy_whole,
    recover,
    stopped_at,
)

pytestmark = pytest.mark.lab

MIB, DIRTY = 1024, 100


def start_move(lab, work, mode: str = "postcopy"):
    mover = lab.popen("a", ["livemig", "move", "--pid", str(work.pid), "--mode", mode, "b"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"running on the target" not in seen:
        line = mover.stderr.readline()
        assert line, f"livemig ended before the target ran: {seen!r}"
        seen += line
    return mover, seen


def held_running(lab, work, mode: str, *flags: str) -> tuple[subprocess.Popen, list[str]]:
    """Move work, held (stopped) once the target's copy runs: a fault is then sure to come
    before the move is done, however fast the machine (a fill from the agent's memory can
    end before a `pkill` sent as the copy runs lands). The move and its PIDs on a."""
    mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=running", "livemig", "move", "--pid", str(work.pid),
                            "--mode", mode, *flags, "b"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    return mover, wait_stopped(lab, mover, "running", within=300)


def source_state(lab, pid: int) -> str:
    return lab.text("a", ["ps", "-o", "stat=", "-p", str(pid)], check=False).strip()


def settled_state(lab, pid: int, within: float = 10) -> str:
    """The source's copy's state once CRIU, which outlives a killed coordinator for a
    moment, has let go of it: until then it is held by CRIU ("t"), and then, with a
    SIGSTOP pending, runnable ("R") until the scheduler gets to it; it stops before
    running a single instruction of its own."""
    deadline = time.monotonic() + within
    while (state := source_state(lab, pid))[:1] in ("R", "t") and time.monotonic() < deadline:
        time.sleep(0.1)
    return state


def gone_from_b(lab, pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if lab.run("b", ["kill", "-0", str(pid)], check=False).returncode != 0:
            return True
        time.sleep(0.5)
    return False


def assert_runs_on_a_whole(lab, work, before: dict) -> None:
    assert_counts_on_whole(work, "a", before)
    assert lab.run("b", ["kill", "-0", str(work.pid)], check=False).returncode != 0
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}


@contextlib.contextmanager
def said_by_livemig(err: str):
    """A failed check tells what livemig said, which is what explains it."""
    try:
        yield
    except Exception as e:
        raise AssertionError(f"{e}\nlivemig said:\n{err}") from e


def agent_killed_mid_move(lab, work, mode: str = "postcopy") -> str:
    """Move work; once the target's copy runs, SIGKILL the target's agent. Its guard holds the
    copy's uffds (the copy's faults wait), the coordinator starts a successor, which takes
    the copy over from the guard, and the copy gets its pages: the move ends on b, whole,
    nothing left. What livemig said."""
    before = work.query("a")
    mover, stopped = held_running(lab, work, mode)
    try:
        lab.run("b", ["pkill", "-KILL", "-f", "livemig agent"])
        go_on(lab, mover, stopped)
        _, err = mover.communicate(timeout=300)
    finally:
        end_if_held(lab, mover)
    said = err.decode()
    with said_by_livemig(said):
        assert mover.returncode == 0 and "Traceback" not in said
        assert_one_copy_whole(lab, work, "b", before)
    lab.run("b", ["kill", str(work.pid)])
    return said


def test_the_agent_killed_mid_postcopy_a_successor_takes_its_copy_over_and_the_move_ends_on_b(lab):
    # the copy lacks pages for sure (the move is held as it runs): its guard hands its uffds
    # to a successor, and the source pushes every page it may lack
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4603, port=7801)
    said = agent_killed_mid_move(lab, work)
    assert "reaching it again" in said and "back on b after" in said, said


def test_the_source_criu_killed_mid_postcopy_costs_nothing_the_pages_are_read_in_the_frozen_tree(lab):
    # CRIU's lazy dump serves no page livemig reads: the tree it leaves stays stopped
    # (a SIGSTOP queued at the dump), and the rest of its pages are read there
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4601, port=7801)
    before = work.query("a")
    # CRIU is sure to be there: held as the copy runs, with its pages capped to a rate at which
    # they take seconds to cross (CI once found CRIU gone there: the push had ended first)
    mover, stopped = held_running(lab, work, "postcopy", "--max-bandwidth", "32M")
    try:
        lab.run("a", ["pkill", "-KILL", "-x", "criu"])
        go_on(lab, mover, stopped)
        out, err = mover.communicate(timeout=120)
    finally:
        end_if_held(lab, mover)
    said = (err + out).decode()
    assert mover.returncode == 0 and "moved: PID 4601 a -> b" in said, said
    # pkill found CRIU (it exits 1 when it finds none): it had not heard that the copy was whole
    assert "CRIU's lazy dump here ended before the target had every page" in said, said
    after = work.query("b", wait=10)
    assert after["host"] == "b" and after["counter"] > before["counter"]
    check = work.query("b", "verify")
    assert (check["bad_pages"], check["pages"]) == (0, work.mib * 256)
    assert lab.run("a", ["kill", "-0", str(work.pid)], check=False).returncode != 0
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("b", ["kill", str(work.pid)])


def test_a_link_lost_for_good_mid_postcopy_leaves_one_copy_and_recover_settles_it(lab):
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4602, port=7802)
    before = work.query("a")
    # cut before the copy is whole, and never back: each side gives the other up 15 s after
    # it found the link silent
    mover, stopped = held_running(lab, work, "postcopy", "--reconnect-timeout", "15")
    lab.run("a", ["ip", "link", "set", "eth0", "down"])
    try:
        go_on(lab, mover, stopped)
        _, err = mover.communicate(timeout=180)
        err = err.decode()
        assert mover.returncode == 7, err
        assert "Traceback" not in err
        assert "livemig: post-copy on b: post-copy lost its link to b" in err and "livemig recover" in err
        # the source's copy waits, stopped; the target kills its own once the source is silent
        assert settled_state(lab, work.pid).startswith("T")
        assert gone_from_b(lab, work.pid, within=60)
        assert settled_state(lab, work.pid).startswith("T")      # still: nobody told it otherwise
    finally:
        lab.run("a", ["ip", "link", "set", "eth0", "up"])
    # the target's copy ran, and is gone: recover says so, and waits for the operator's word
    res = lab.run("a", ["livemig", "recover", "--json"], check=False, timeout=120)
    [settled] = json.loads(res.stdout)["settled"]
    assert res.returncode == 9 and settled["outcome"] == "target lost", settled
    assert settled_state(lab, work.pid).startswith("T")
    settled = recover(lab, "--target-lost")
    # the old agent never hears its coordinator hang up across the cut: it gives up waiting
    # after a minute, and its work directory goes then
    deadline = time.monotonic() + 180
    while lab.leftovers(("b",))["b"][0] and time.monotonic() < deadline:
        time.sleep(2)
    assert settled["outcome"] == "rolled back" and settled["target"] == "b", settled
    assert_runs_on_a_whole(lab, work, before)
    assert lab.text("a", ["livemig", "recover"]).strip() == "nothing to recover here"
    lab.run("a", ["kill", str(work.pid)])


def test_every_ssh_session_to_b_killed_mid_postcopy_the_move_reconnects_and_b_answers_on(lab):
    # issue 26's first case: a client on b got answers from the copy there, then every sshd
    # session on b is killed (the agent's, the page streams'). The move makes the link again,
    # the copy gets the rest of its pages, and b answers on from where it was: nothing a
    # client was told is taken back, and nothing runs on a. Capped, its post-copy lasts half
    # a minute at least (512 MiB at 16 MiB/s), so the cut lands mid-post-copy on any machine.
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4616, port=7816)
    before = work.query("a")
    # two clients: one asks b alone, so that its answers come as fast as the copy there gives
    # them (a's copy, stopped, holds each ask of a's for ANSWER_WITHIN: one client asking both
    # got one answer of b's in 2.5 s at best, and on a slow machine too few before the move ended)
    with Client(lab, 7816, hosts=("a",), every=0.5) as on_a, Client(lab, 7816, hosts=("b",), every=0.2) as on_b_:
        mover = lab.popen("a", ["livemig", "move", "--json", "--pid", str(work.pid), "--mode", "postcopy",
                                "--max-bandwidth", "16M", "--compression-level", "1", "b"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while len(on_b_.answers) < 3 and time.monotonic() < deadline:
                assert mover.poll() is None, mover.communicate()
                time.sleep(0.2)
            cut_at = time.monotonic()
            lab.run("b", ["pkill", "-KILL", "-x", "sshd-session"])
            out, err = mover.communicate(timeout=300)
        finally:
            end_if_held(lab, mover)
    err = err.decode()
    answers = sorted(on_a.answers + on_b_.answers, key=lambda a: a.at)
    with said_by_livemig(err + on_a.said() + " " + on_b_.said()):
        assert mover.returncode == 0 and "Traceback" not in err
        report = json.loads(out)
        assert report["outcome"] == "moved" and report["reconnects"] == 1, report
        assert not on_a.errors and not on_b_.errors
        assert all(x.n < y.n for x, y in itertools.pairwise(answers)), answers     # nothing taken back
        on_b = [a.n for a in answers if a.host == "b" and a.at < cut_at]
        after = [a for a in answers if a.at > cut_at]
        assert len(on_b) >= 3 and after and all(a.host == "b" and a.n > max(on_b) for a in after)
        assert_one_copy_whole(lab, work, "b", before)     # and none on a
    lab.run("b", ["kill", str(work.pid)])


def test_a_link_down_mid_postcopy_then_back_the_move_reconnects_and_ends_on_b(lab):
    # down long enough for both ends to call it lost (30 s of silence), then back: the move
    # reaches b again, and the copy there, its faults waiting meanwhile, gets the rest
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4617, port=7817)
    before = work.query("a")
    mover, stopped = held_running(lab, work, "postcopy")     # cut before the copy is whole
    lab.run("a", ["ip", "link", "set", "eth0", "down"])
    said = b""
    try:
        go_on(lab, mover, stopped)
        while b"reaching it again" not in said:
            line = mover.stderr.readline()
            assert line, f"livemig ended before it tried to reconnect: {said!r}"
            said += line
        lab.run("a", ["ip", "link", "set", "eth0", "up"])
        out, err = mover.communicate(timeout=180)
    finally:
        lab.run("a", ["ip", "link", "set", "eth0", "up"])
        end_if_held(lab, mover)
    err = (said + err).decode()
    with said_by_livemig(err):
        assert mover.returncode == 0 and "Traceback" not in err
        assert "back on b after" in err and "moved" in out.decode()
        assert_one_copy_whole(lab, work, "b", before)
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("b", ["kill", str(work.pid)])


def test_the_coordinator_killed_mid_postcopy_then_recover_puts_it_right(lab):
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4604, port=7804)
    killed_mid_move_then_recovered(lab, work, "postcopy")


def killed_mid_move_then_recovered(lab, work, mode: str) -> None:
    """Move work; once the target's copy runs, SIGKILL the coordinator (stopped there: a
    fill from the agent's memory may be over by the time a `pkill` sent then lands, and the
    move done). The source's copy waits, stopped; the target's agent, alone, kills its copy
    if it lacks pages (it may have had them all by then: a fill goes on without the
    coordinator), and `livemig recover` leaves exactly one copy, whole."""
    before = work.query("a")
    mover, stopped = held_running(lab, work, mode)
    lab.run("a", ["kill", "-KILL", *stopped])
    os.kill(mover.pid, signal.SIGCONT)     # nsenter stopped itself with its child (job control)
    mover.wait(timeout=30)
    # the source's copy waits, stopped, whatever the target's did (once CRIU, which
    # outlived the coordinator, lets go of it: until then it may show as runnable)
    assert settled_state(lab, work.pid).startswith("T")
    # what recover would settle, listed first: nothing is touched (recover below finds it all still there)
    listed = json.loads(lab.run("a", ["livemig", "recover", "--list", "--json"]).stdout)["pending"]
    assert [(x["workload"], x["target"], x["stage"], x["livemig_alive"]) for x in listed] == [
        (f"PID {work.pid}", "b", "post-copy or a fill", False)], listed
    settled = recover_when_settled(lab)
    if settled["outcome"] == "target lost":
        # it ran, and is gone: the source's copy waits for the operator's word
        assert settled["detail"].startswith("the target's copy is gone"), settled
        assert gone_from_b(lab, work.pid, within=60)
        assert settled_state(lab, work.pid).startswith("T")
        settled = recover(lab, "--target-lost")
        assert settled["outcome"] == "rolled back" and "is lost" in settled["detail"], settled
        assert_runs_on_a_whole(lab, work, before)
    else:
        assert settled["outcome"] == "moved" and "has every page" in settled["detail"], settled
        assert_one_copy_whole(lab, work, "b", before)
    assert lab.text("a", ["livemig", "recover"]).strip() == "nothing to recover here"


def recover_when_settled(lab, within: float = 120) -> dict:
    """`livemig recover`, again while the target is still settling its copy (it says
    "try again"), as an operator would."""
    deadline = time.monotonic() + within
    while True:
        res = lab.run("a", ["livemig", "recover", "--json"], check=False, timeout=120)
        [settled] = json.loads(res.stdout)["settled"]
        if res.returncode in (0, 9) or "try again" not in settled["detail"] or time.monotonic() > deadline:
            assert res.returncode in (0, 9), (settled, res.stderr.decode())     # 9: target lost
            return settled
        time.sleep(2)


@pytest.mark.parametrize("sig, pid", [("INT", 4606), ("TERM", 4607)], ids=["ctrl-c", "sigterm"])
def test_interrupted_mid_postcopy_waits_for_the_copy_to_be_whole_and_the_move_is_done(lab, sig, pid):
    # The target's copy runs: undone, what it answered would be answered again by the
    # source's, older. So an interrupt waits until it has every page (and says so), and the
    # move is done; a second one meanwhile is ignored (cut short, the copy would lack pages).
    # Both come mid-post-copy however fast the machine: the move is held as its copy runs,
    # and b's agent, which alone can tell it the copy is whole, is held until they came.
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=pid, port=7806)
    before = work.query("a")
    mover, stopped = held_running(lab, work, "postcopy")
    said = b""

    def until(text: bytes) -> None:
        nonlocal said
        while text not in said:
            line = mover.stderr.readline()
            assert line, f"livemig ended before it said {text!r}: {said!r}"
            said += line
    try:
        lab.run("b", ["pkill", "-STOP", "-f", "livemig agent"])
        lab.run("a", ["kill", f"-{sig}", *stopped])
        go_on(lab, mover, stopped)
        until(b"waiting until it has every page")
        lab.run("a", ["kill", f"-{sig}", *stopped])
        until(b"still putting things back")
        lab.run("b", ["pkill", "-CONT", "-f", "livemig agent"])
        out, err = mover.communicate(timeout=300)
    finally:
        lab.run("b", ["pkill", "-CONT", "-f", "livemig agent"], check=False)
        end_if_held(lab, mover)
    err = (said + err).decode()
    assert mover.returncode == 0 and "Traceback" not in err, err
    with said_by_livemig(err):
        assert "moved" in out.decode(), out
        assert_one_copy_whole(lab, work, "b", before)
    lab.run("b", ["kill", str(work.pid)])


@pytest.mark.parametrize("mode, pid", [("postcopy", 4611), ("precopy", 4612)], ids=["post-copy", "fill"])
def test_the_coordinator_killed_once_the_copy_is_whole_then_recover_keeps_the_target_s(lab, mode, pid):
    # the target's copy runs with every page; the source's still waits, stopped, for the word
    work = lab.start_workload("a", mib=64, dirty_mibps=10, pid=pid, port=7811)
    before = work.query("a")
    mover, stopped = stopped_at(lab, "whole", "--pid", str(work.pid), mode=mode)
    lab.run("a", ["kill", "-KILL", *stopped])
    os.kill(mover.pid, signal.SIGCONT)     # nsenter stopped itself with its child (job control)
    mover.wait(timeout=30)
    assert settled_state(lab, work.pid).startswith("T")
    assert work.query("b", wait=10)["host"] == "b"          # whole, it runs on by itself
    settled = recover(lab)
    assert settled["outcome"] == "moved" and "has every page" in settled["detail"], settled
    assert_one_copy_whole(lab, work, "b", before)
    lab.run("b", ["kill", str(work.pid)])


@pytest.mark.parametrize("mode, pid", [("postcopy", 4613), ("precopy", 4615)], ids=["post-copy", "fill"])
def test_interrupted_once_the_copy_is_whole_the_move_is_done(lab, mode, pid):
    # Ctrl-C after the last page: the target's copy is the workload, the source's goes, and
    # the move says so (it said "rolled back, the workload runs on the source", exit code 130)
    work = lab.start_workload("a", mib=64, dirty_mibps=10, pid=pid, port=7813)
    before = work.query("a")
    mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=whole", "livemig", "move", "--json", "--mode", mode,
                            "--pid", str(work.pid), "b"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    stopped = wait_stopped(lab, mover, "whole")
    lab.run("a", ["kill", "-INT", *stopped])
    lab.run("a", ["kill", "-CONT", *stopped])
    os.kill(mover.pid, signal.SIGCONT)     # nsenter stopped itself with its child (job control)
    out, err = mover.communicate(timeout=60)
    assert mover.returncode == 0 and "Traceback" not in err.decode(), err.decode()
    report = json.loads(out)
    assert report["outcome"] == "moved", report
    assert any("every page" in w or "after the move was done" in w for w in report["warnings"]), report["warnings"]
    assert_one_copy_whole(lab, work, "b", before)
    lab.run("b", ["kill", str(work.pid)])


def test_recover_target_lost_runs_the_source_s_copy_without_asking(lab):
    # the link cut mid-post-copy, and the target declared gone for good: the source's
    # copy, whole as of its final dump, runs again; the target's dies of the silence
    work = lab.start_workload("a", mib=MIB, dirty_mibps=DIRTY, pid=4614, port=7814)
    before = work.query("a")
    mover, stopped = held_running(lab, work, "postcopy", "--reconnect-timeout", "15")   # cut before it is whole
    lab.run("a", ["ip", "link", "set", "eth0", "down"])
    try:
        go_on(lab, mover, stopped)
        assert mover.wait(timeout=180) == 7
        assert settled_state(lab, work.pid).startswith("T")
        res = lab.run("a", ["livemig", "recover", "--target-lost", "--json"], timeout=60)
        [settled] = json.loads(res.stdout)["settled"]
        assert settled["outcome"] == "rolled back" and "--target-lost" in settled["detail"], settled
        assert not source_state(lab, work.pid).startswith("T")
        assert gone_from_b(lab, work.pid, within=60)
    finally:
        lab.run("a", ["ip", "link", "set", "eth0", "up"])
    deadline = time.monotonic() + 180      # b's agent gives up on its lost coordinator, and cleans up
    while [f for f in lab.leftovers(("b",))["b"][0] if not f.endswith(".verdict")] and time.monotonic() < deadline:
        time.sleep(2)
    # b, back against all odds, keeps only its verdict (how its copy ended: a few bytes, no
    # memory), which nobody asks for: the operator said it was gone
    assert [f.endswith(".verdict") for f in lab.leftovers(("b",))["b"][0]] == [True]
    lab.run("b", ["sh", "-c", "rm /var/lib/livemig/*.verdict"])
    assert_runs_on_a_whole(lab, work, before)
    lab.run("a", ["kill", str(work.pid)])
