"""Issue 27, item 8: after a crash, `livemig recover` says what happened, in every case. A
target's agent that died mid-post-copy without a word (killed with its guard, or its host
restarted) never leaves "try again in a minute" for ever; a copy of an earlier boot is
gone with it, never resumed nor settled "successfully"; a resume is success only if the
copy runs afterwards. The processes are real; the other host's answers are stand-ins."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import pytest

from livemig import proc, workdirs
from livemig.errors import LivemigError
from livemig.options import Options
from livemig.runtimes.held import REBOOTED, RUNNING, STOPPED, HeldCopy
from livemig.source import fresh_agent, recovery, throttle
from livemig.target import orphans
from livemig.target.guard import Guard
from livemig.target.verdicts import Verdicts
from livemig.wire import protocol as p

OTHER_BOOT = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def child():
    c = subprocess.Popen(["sleep", "600"])
    yield c
    c.kill()
    c.wait()


def stopped(c: subprocess.Popen) -> None:
    """c, stopped (a signal lands once its target runs: waited for)."""
    c.send_signal(signal.SIGSTOP)
    while proc.state(c.pid) != "T":
        time.sleep(0.001)


def named(c: subprocess.Popen) -> HeldCopy:
    return HeldCopy("process", proc.tasks([c.pid]), boot=proc.boot_id())


DEAD = HeldCopy("process", [(999_999_999, 1)], boot=proc.boot_id())     # named, and gone


def written_in_another_boot(verdicts: Verdicts, mid: str) -> None:
    path = verdicts.path(mid)
    path.write_text(path.read_text().replace(proc.boot_id(), OTHER_BOOT))


# --- the target: a verdict is answered as things are now ------------------------------------
async def _asked(root, mid="m1") -> p.Verdict:
    return await orphans.ask(root, Verdicts(root), p.AskVerdict(mid))


async def test_serving_is_said_only_while_the_agent_or_its_guard_holds_the_move(tmp_path):
    Verdicts(tmp_path).write("m1", "serving", phase="restore")
    held = workdirs.make(tmp_path, tmp_path / "m1")       # the agent, alive
    assert (await _asked(tmp_path)).state == "serving"
    held.release()                                         # killed outright, its guard too
    assert (await _asked(tmp_path)).state == "abandoned"


@pytest.mark.parametrize("copy, said", [
    ("alive", "is still here, running, and the pages it lacked may read as zeros"),
    ("dead", "PID 999999999 is gone"),
    (None, "never restored, or what it was cannot be told"),
])
async def test_a_serving_verdict_whose_agent_and_guard_died_says_so_and_whether_the_copy_runs(
        tmp_path, child, copy, said):
    verdicts = Verdicts(tmp_path)
    verdicts.write("m1", "serving", phase="restore")
    if copy is not None:
        verdicts.note_copy("m1", (named(child) if copy == "alive" else DEAD).__dict__)
    v = await _asked(tmp_path)
    assert v.state == "abandoned" and "its guard died while its copy still took in its pages" in v.detail
    assert said in v.detail, v.detail


@pytest.mark.parametrize("state", ["serving", "whole", "running"])
async def test_a_verdict_of_an_earlier_boot_says_the_copy_went_with_the_restart(tmp_path, state):
    verdicts = Verdicts(tmp_path)
    verdicts.write("m1", state)
    written_in_another_boot(verdicts, "m1")
    v = await _asked(tmp_path)
    assert v.state == "restarted" and "this host restarted since" in v.detail


async def test_a_killed_verdict_is_told_as_written_whatever_the_boot(tmp_path):
    verdicts = Verdicts(tmp_path)
    verdicts.write("m1", "killed", "post-copy ended before every page was here:\nthe link")
    written_in_another_boot(verdicts, "m1")
    v = await _asked(tmp_path)
    assert (v.state, v.detail) == ("killed", "post-copy ended before every page was here: the link")


async def test_the_guard_holds_the_move_as_long_as_it_lives(short_root):
    work = short_root / "m1"
    held = workdirs.make(short_root, work)
    guard = await Guard.start(Verdicts(short_root), "m1", held.fd)
    held.release()                          # the agent is gone; its guard is not
    assert workdirs.owned(work)
    await guard.release()
    assert not workdirs.owned(work)


async def test_an_orphan_gone_with_a_restart_is_never_said_resumed(tmp_path):
    work = tmp_path / "m1"
    work.mkdir()
    orphans.Orphan("tree 4242", HeldCopy("process", [(4242, 7)], boot=OTHER_BOOT)).save(work)
    verdicts = Verdicts(tmp_path)
    got = await orphans.settle(tmp_path, verdicts, p.SettleOrphan("m1", resume=True))
    assert got.state == "gone" and "gone with a restart of this host" in got.detail
    assert verdicts.read("m1")[0] == "none" and not work.exists()


@pytest.mark.parametrize("alive, state", [(True, "running"), (False, "ended")])
async def test_a_copy_resumed_here_is_said_to_run_only_while_it_does(tmp_path, child, alive, state):
    verdicts = Verdicts(tmp_path)
    verdicts.note_copy("m1", (named(child) if alive else DEAD).__dict__)
    verdicts.write("m1", "running", phase="commit")
    got = await orphans.settle(tmp_path, verdicts, p.SettleOrphan("m1", resume=True))
    assert got.state == state
    written_in_another_boot(verdicts, "m1")
    got = await orphans.settle(tmp_path, verdicts, p.SettleOrphan("m1", resume=True))
    assert got.state == "ended" and "restarted" in got.detail


# --- the source: a copy of an earlier boot, or gone, is never said to run again --------------
def _record(root, copy: HeldCopy, lazy=True, committed=False, target_resumed_at=0.0) -> recovery.Record:
    work = root / "2026-1-source"
    work.mkdir(mode=0o700)
    rec = recovery.Record("2026-1", "b", copy, (999_999_999, 1), lazy=lazy, committed=committed,
                          target_resumed_at=target_resumed_at)
    rec.save(work)
    return rec


def _target(monkeypatch, verdict="killed", orphan="killed"):
    asked = []

    async def ask(target, migration, connect, options):
        asked.append("verdict")
        return verdict, ""

    async def ask_agent(target, msg, reply_type, connect, options):
        asked.append("resume" if msg.resume else "kill")
        return reply_type(orphan)
    monkeypatch.setattr(fresh_agent, "ask_target", ask)
    monkeypatch.setattr(fresh_agent, "ask_agent", ask_agent)
    monkeypatch.setattr(fresh_agent, "forget_verdict", lambda *a: asyncio.sleep(0))
    return asked


async def _recover(root, **kw) -> recovery.Settled:
    [settled] = await recovery.recover(Options(image_root=str(root)), None, **kw)
    return settled


@pytest.mark.parametrize("verdict", ["killed", "none", "serving", "abandoned"])
async def test_post_copy_after_a_restart_here_says_the_source_copy_went_with_it(short_root, monkeypatch, verdict):
    _record(short_root, HeldCopy("process", [(4242, 7)], boot=OTHER_BOOT))
    _target(monkeypatch, verdict)
    settled = await _recover(short_root)
    assert settled.outcome == "lost" and "this host restarted since the final dump" in settled.detail, settled
    assert not recovery.records(str(short_root))


async def test_post_copy_with_the_source_copy_gone_is_lost_not_rolled_back(short_root, monkeypatch):
    _record(short_root, DEAD)
    _target(monkeypatch, "killed")
    settled = await _recover(short_root)
    assert settled.outcome == "lost" and "no more here" in settled.detail, settled


@pytest.mark.parametrize("verdict", ["abandoned", "restarted"])
async def test_a_target_copy_whose_agent_died_unheard_leaves_the_choice_to_the_operator(
        short_root, monkeypatch, child, verdict):
    # its copy may have run: the source's runs again only by the operator's word (issue 26)
    stopped(child)      # the source's copy as post-copy leaves it
    _record(short_root, named(child))
    _target(monkeypatch, verdict)
    settled = await _recover(short_root)
    assert settled.outcome == "unresolved" and "--target-lost" in settled.detail, settled
    assert proc.state(child.pid) == "T"          # not resumed
    settled = await _recover(short_root, target_lost=True)
    assert settled.outcome == "rolled back" and proc.state(child.pid) in ("S", "R")


@pytest.mark.parametrize("committed, outcome, asked", [
    (False, "lost", []),                # the workload was the source's: the target's stopped copy is left be
    (True, "moved", ["resume"]),        # given up: the target's copy is the workload
])
async def test_stop_and_copy_after_a_restart_here(short_root, monkeypatch, committed, outcome, asked):
    _record(short_root, HeldCopy("process", [(4242, 7)], boot=OTHER_BOOT), lazy=False, committed=committed)
    questions = _target(monkeypatch, orphan="resumed")
    settled = await _recover(short_root)
    assert (settled.outcome, questions) == (outcome, asked), settled
    assert "restarted" in settled.detail


async def test_stop_and_copy_given_up_with_the_target_copy_gone_with_its_restart_is_lost(short_root, monkeypatch):
    _record(short_root, DEAD, lazy=False, committed=True)
    (short_root / "2026-1-source" / "journal").write_text("committed\n")
    _target(monkeypatch, orphan="gone")
    settled = await _recover(short_root)
    assert settled.outcome == "lost", settled


async def test_a_resume_that_leaves_nothing_running_is_no_success(child):
    with pytest.raises(LivemigError, match="does not run: it is gone"):
        await DEAD.resume()
    stopped(child)
    copy = named(child)
    assert await copy.standing() == STOPPED
    await copy.resume()
    assert await copy.standing() == RUNNING
    assert await HeldCopy("process", copy.pids, boot=OTHER_BOOT).standing() == REBOOTED


async def test_a_throttle_of_an_earlier_boot_is_never_written_to_the_cgroup_now_at_its_path(short_root, tmp_path):
    cg_dir = tmp_path / "cg"
    cg_dir.mkdir()
    (cg_dir / "cpu.cfs_quota_us").write_text("5000")
    (cg_dir / "cpu.cfs_period_us").write_text("100000")
    work = short_root / "2026-7-source"
    work.mkdir(mode=0o700)
    throttle.save(work / throttle.FILE, throttle.CpuCgroup(1, str(cg_dir), ""), throttle.Quota(-1, 100000),
                  "runc container web1")
    d = json.loads((work / throttle.FILE).read_text())
    d["boot"] = OTHER_BOOT      # its coordinator's (PID, start time) may name another process now
    (work / throttle.FILE).write_text(json.dumps(d))
    settled = await _recover(short_root)
    assert settled.outcome == "rolled back" and "until this host restarted" in settled.detail
    assert (cg_dir / "cpu.cfs_quota_us").read_text() == "5000"


def test_a_copy_settled_leaves_no_note_beside_its_verdict(tmp_path, child):
    verdicts = Verdicts(tmp_path)
    verdicts.write("m1", "serving", phase="restore")
    verdicts.note_copy("m1", named(child).__dict__)
    verdicts.write("m1", "killed", "its page stream ended")
    assert [f.name for f in tmp_path.iterdir()] == ["m1.verdict"]


async def test_a_target_copy_that_ran_and_is_gone_never_brings_the_source_back_by_itself(
        short_root, monkeypatch, child):
    # issue 26: the target's Resume is the commit point; its copy may have answered clients,
    # which the source's, older, would answer again: only the operator's word runs it again
    stopped(child)
    _record(short_root, named(child), target_resumed_at=time.time() - 5)
    _target(monkeypatch, "lost")
    settled = await _recover(short_root)
    assert settled.outcome == "target lost" and "--target-lost" in settled.detail, settled
    assert "ago at most" in settled.detail and proc.state(child.pid) == "T"
    assert recovery.records(str(short_root))        # kept, for the operator's word
    settled = await _recover(short_root, target_lost=True)
    assert settled.outcome == "rolled back" and "is lost" in settled.detail, settled
    assert proc.state(child.pid) in ("S", "R") and not recovery.records(str(short_root))


async def test_a_target_copy_killed_before_it_ran_brings_the_source_back(short_root, monkeypatch, child):
    # told to run, but gone before the Resume reached it (its agent killed first): it never
    # answered anyone, and the source's copy runs on at once
    stopped(child)
    _record(short_root, named(child), target_resumed_at=time.time() - 5)
    _target(monkeypatch, "killed")
    settled = await _recover(short_root)
    assert settled.outcome == "rolled back" and "is lost" not in settled.detail, settled
    assert proc.state(child.pid) in ("S", "R")


def test_the_one_who_ends_a_copy_says_lost_once_it_ran_killed_before(tmp_path):
    verdicts = Verdicts(tmp_path)
    verdicts.write("m1", "serving", phase="restore")
    assert verdicts.gone_state("m1") == "killed"
    verdicts.write("m1", "serving", phase="commit", ran=True)     # the agent, before its Resume
    assert verdicts.gone_state("m1") == "lost"


def test_a_root_that_exited_is_gone_before_its_parent_reaps_it():
    # a zombie: it exited, and only its reaping is still to come (a pre-copy round that read the
    # workload killed meanwhile went on to the final dump while its reaper had not run yet)
    c = subprocess.Popen(["sleep", "60"])
    try:
        held = named(c)
        assert not held.root_gone()
        c.kill()
        while proc.state(c.pid) != "Z":
            time.sleep(0.001)
        assert held.root_gone()
    finally:
        c.kill()
        c.wait()
    assert held.root_gone() and DEAD.root_gone() and not HeldCopy("process").root_gone()
