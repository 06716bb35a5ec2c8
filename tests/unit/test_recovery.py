"""`livemig recover`'s decisions: the target's verdict picks the one copy that runs on. The
lab's post-copy fault tests run it for real; here the target's answers are stand-ins."""

import dataclasses
import json
import os
import stat

import pytest

from livemig import proc
from livemig.errors import LivemigError
from livemig.options import Options
from livemig.runtimes import held
from livemig.runtimes.held import HeldCopy
from livemig.source import fresh_agent, recovery
from livemig.wire import protocol as p


@pytest.fixture
def root(tmp_path):
    """An image root as livemig makes it: root's, private (workdirs.check_root)."""
    r = tmp_path / "images"
    r.mkdir(mode=0o700)
    return r


def record(root, n: int, coordinator=(999_999_999, 1)) -> recovery.Record:
    work = root / f"2026-{n}-source"
    work.mkdir(mode=0o700)
    (work / "final").mkdir()        # images a killed coordinator left behind
    rec = recovery.Record(f"2026-{n}", "b", HeldCopy("process", [(4242 + n, 7)]), coordinator)
    rec.save(work)
    return rec


@pytest.fixture
def here(monkeypatch):
    """Each source's copy as the host has it (HeldCopy.standing), by its root: stopped, as a
    move leaves it, until resumed or ended."""
    now: dict = {}

    async def standing(self):
        return now.get(self.pids[0], held.STOPPED)
    monkeypatch.setattr(HeldCopy, "standing", standing)
    return now


@pytest.fixture
def acted(monkeypatch, here):
    done = []

    async def resume(self, lazy_images=None):
        done.append("resume")
        here[self.pids[0]] = held.RUNNING
        return []

    async def end(self):
        done.append("end")
        here[self.pids[0]] = held.GONE
        return []
    monkeypatch.setattr(HeldCopy, "resume", resume)
    monkeypatch.setattr(HeldCopy, "end", end)
    return done


def answers(monkeypatch, *states):
    asked, forgotten = [], []

    async def ask(target, migration, connect, options):
        asked.append(migration)
        state = states[len(asked) - 1]
        if isinstance(state, Exception):
            raise state
        return state, ""

    async def forget(target, migration, connect, options):
        forgotten.append(migration)
    monkeypatch.setattr(fresh_agent, "ask_target", ask)
    monkeypatch.setattr(fresh_agent, "forget_verdict", forget)
    return asked, forgotten


def test_a_record_is_private_and_reads_back(root):
    rec = record(root, 1)
    path = root / "2026-1-source" / recovery.RECORD
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    [(work, again)] = recovery.records(str(root))
    assert again == rec and work == path.parent


@pytest.mark.parametrize("state, outcome, action", [
    ("killed", "rolled back", "resume"),    # the target's copy lacked pages and is gone
    ("none", "rolled back", "resume"),      # the target never held a copy that could run
    ("whole", "moved", "end"),              # the target's copy has every page: it runs on
])
async def test_the_targets_verdict_picks_the_copy_that_runs_on(root, acted, monkeypatch, state, outcome, action):
    record(root, 1)
    asked, forgotten = answers(monkeypatch, state)
    [settled] = await recovery.recover(Options(image_root=str(root)), None)
    assert (settled.outcome, acted, asked, forgotten) == (outcome, [action], ["2026-1"], ["2026-1"])
    assert list(root.iterdir()) == []       # record and images gone


@pytest.mark.parametrize("answer, why", [
    ("serving", "still taking in its pages"),
    (LivemigError("cannot connect over ssh"), "cannot ask b"),
])
async def test_while_nobody_knows_the_source_copy_stays_stopped(root, acted, monkeypatch, answer, why):
    record(root, 1)
    answers(monkeypatch, answer)
    [settled] = await recovery.recover(Options(image_root=str(root)), None)
    assert settled.outcome == "unresolved" and why in settled.detail and acted == []
    assert recovery.records(str(root))       # kept, for the next try


async def test_a_copy_taking_in_its_pages_from_an_agent_of_another_protocol_is_left_to_its_own_livemig(
        root, acted, monkeypatch):
    rec = record(root, 1)
    rec.rejoin_token, rec.stream_socket, rec.protocol = "t", "/s", p.PROTOCOL_VERSION + 1
    rec.save(root / "2026-1-source")
    answers(monkeypatch, "serving")
    [settled] = await recovery.recover(Options(image_root=str(root)), None)
    assert settled.outcome == "unresolved" and acted == []
    assert f"wire protocol {p.PROTOCOL_VERSION + 1}, which this livemig does not" in settled.detail
    assert recovery.records(str(root))[0][1].protocol == p.PROTOCOL_VERSION + 1     # kept, read back


async def test_a_move_still_running_is_left_to_its_coordinator(root, acted, monkeypatch):
    me = os.getpid()
    record(root, 1, coordinator=(me, proc.start_time(me)))
    asked, _ = answers(monkeypatch)
    [settled] = await recovery.recover(Options(image_root=str(root)), None)
    assert settled.outcome == "unresolved" and "still moving it" in settled.detail
    assert asked == [] and acted == []


async def test_target_lost_resumes_the_source_without_asking(root, acted, monkeypatch):
    record(root, 1)
    record(root, 2)
    asked, forgotten = answers(monkeypatch)
    settled = await recovery.recover(Options(image_root=str(root)), None, target_lost=True)
    assert [s.outcome for s in settled] == ["rolled back", "rolled back"]
    # nothing asked; its verdicts forgotten where the target still answers (it may only have
    # lost its copy), in a bounded moment
    assert acted == ["resume", "resume"] and asked == [] and forgotten == ["2026-1", "2026-2"]


def test_a_source_copy_acts_only_on_the_processes_it_recorded():
    # a PID reused by another process (another start time) is never signalled
    me = os.getpid()
    copy = HeldCopy("process", [(me, proc.start_time(me) + 1)])
    assert copy._alive() == []
    assert HeldCopy("process", [(me, proc.start_time(me))])._alive() == [(me, proc.start_time(me))]


def test_a_source_copy_recorded_before_a_reboot_acts_on_nothing():
    # after a reboot a (PID, start time) pair may name a new process: the boot ID tells
    me = os.getpid()
    pair = (me, proc.start_time(me))
    assert HeldCopy("process", [pair], boot=proc.boot_id())._alive() == [pair]
    other = HeldCopy("process", [pair], boot="another-boot")
    assert other._alive() == [] and other.root_gone()
    rec = recovery.Record("2026-1", "b", other, pair)
    assert not rec.coordinator_alive()
    assert HeldCopy.from_dict(dataclasses.asdict(other)) == other


# --- stop-and-copy: the commit mark decides --------------------------------------------------
def stopcopy_record(root, committed: bool, runtime: str = "process") -> recovery.Record:
    """A tree's (CRIU's journal beside it, as its dump left it) or a container's."""
    work = root / "2026-9-source"
    work.mkdir(mode=0o700)
    rec = recovery.Record("2026-9", "b", HeldCopy(runtime, [(4242, 7)], "" if runtime == "process" else "web1"),
                          (999_999_999, 1), lazy=False, committed=committed)
    rec.save(work)
    if runtime == "process":
        (work / "journal").write_text("committed\n" if committed else "dumping\n")
    return rec


def orphan_answers(monkeypatch, *states, source_exists=None):
    """The target's agent answering SettleOrphan; states[i] for the i-th question."""
    asked = []

    async def ask_agent(target, msg, reply_type, connect, options):
        asked.append("resume" if msg.resume else "kill")
        state = states[len(asked) - 1]
        if isinstance(state, Exception):
            raise state
        return reply_type(state)

    async def standing(self):
        return held.STOPPED if source_exists is True else held.GONE if source_exists is False else source_exists
    monkeypatch.setattr(fresh_agent, "ask_agent", ask_agent)
    if source_exists is not None:
        monkeypatch.setattr(HeldCopy, "standing", standing)
    answers(monkeypatch)    # forget_verdict: recorded, not sent
    return asked


@pytest.mark.parametrize("runtime", ["process", "runc"])
@pytest.mark.parametrize("committed, target, outcome, source_action, asked", [
    # the source never gave its copy up: it runs again, the target's stopped copy goes
    (False, "killed", "rolled back", ["resume"], ["kill"]),
    # given up: the target's copy (stopped, or resumed before the coordinator died) runs
    (True, "resumed", "moved", ["end"], ["resume"]),
    (True, "running", "moved", ["end"], ["resume"]),
])
async def test_stop_and_copy_the_commit_mark_picks_the_copy_that_runs_on(root, acted, monkeypatch, committed,
                                                                         target, outcome, source_action, asked,
                                                                         runtime):
    stopcopy_record(root, committed, runtime)
    questions = orphan_answers(monkeypatch, target)
    [settled] = await recovery.recover(Options(image_root=str(root)), None)
    assert (settled.outcome, acted, questions) == (outcome, source_action, asked)
    assert list(root.iterdir()) == []


async def test_stop_and_copy_before_the_commit_runs_the_source_at_once_even_if_the_target_is_away(
        root, acted, monkeypatch):
    stopcopy_record(root, committed=False)
    orphan_answers(monkeypatch, LivemigError("cannot connect over ssh"), "killed")
    [first] = await recovery.recover(Options(image_root=str(root)), None)
    # safe: the target resumes its copy only once the source gave its own up, which it did not
    assert first.outcome == "rolled back" and "may still hold a stopped copy" in first.detail
    assert acted == ["resume"] and recovery.records(str(root))      # kept, to clean the target up
    [again] = await recovery.recover(Options(image_root=str(root)), None)
    assert again.outcome == "rolled back" and acted == ["resume"]    # not resumed twice
    assert list(root.iterdir()) == []


async def test_stop_and_copy_after_the_commit_waits_for_the_target(root, acted, monkeypatch):
    stopcopy_record(root, committed=True)
    orphan_answers(monkeypatch, LivemigError("cannot connect over ssh"))
    [settled] = await recovery.recover(Options(image_root=str(root)), None)
    assert settled.outcome == "unresolved" and acted == [] and recovery.records(str(root))


@pytest.mark.parametrize("source_exists, outcome, action", [
    (True, "rolled back", ["resume"]),   # committed on paper, but its copy was never given up
    (False, "lost", []),                 # honest: neither host has it
])
async def test_stop_and_copy_committed_with_the_target_lost(root, acted, monkeypatch, source_exists, outcome, action):
    stopcopy_record(root, committed=True)
    orphan_answers(monkeypatch, source_exists=source_exists)
    [settled] = await recovery.recover(Options(image_root=str(root)), None, target_lost=True)
    assert (settled.outcome, acted) == (outcome, action)


async def test_a_livemig_killed_in_pre_copy_leaves_a_throttle_that_recover_lifts(root, acted):
    """Nothing was frozen yet: the workload ran on, slowed; recover gives it its CPU back
    and deletes the pre-copy's images. (tests/unit/test_throttle.py does it on a real cgroup.)"""
    from livemig.source import throttle
    cg_dir = root.parent / "cg"
    cg_dir.mkdir()
    (cg_dir / "cpu.cfs_quota_us").write_text("5000")
    (cg_dir / "cpu.cfs_period_us").write_text("100000")
    work = root / "2026-7-source"
    work.mkdir(mode=0o700)
    (work / "pre-1").mkdir()
    throttle.save(work / throttle.FILE, throttle.CpuCgroup(1, str(cg_dir), ""), throttle.Quota(-1, 100000),
                  "runc container web1")
    # a record whose livemig still runs is its own business
    assert await recovery.recover(Options(image_root=str(root)), None) == []
    assert (cg_dir / "cpu.cfs_quota_us").read_text() == "5000"
    d = json.loads((work / throttle.FILE).read_text())
    d["coordinator"] = [999_999_999, 1]
    (work / throttle.FILE).write_text(json.dumps(d))
    [settled] = await recovery.recover(Options(image_root=str(root)), None)
    assert (settled.workload, settled.outcome) == ("runc container web1", "rolled back")
    assert "lifted" in settled.detail and (cg_dir / "cpu.cfs_quota_us").read_text() == "-1"
    assert not work.exists() and acted == []


# --- each record on its own, written whole, and each copy resumed as it actually is ----------
def test_a_record_rewritten_is_never_left_half_written(root, monkeypatch):
    """A coordinator killed while it rewrites its record (here: the disk fails it) leaves the
    record as it was, never an empty file; the directory is synced for the rename to last."""
    rec = record(root, 1)
    work = root / "2026-1-source"
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        if len(synced) == 1:
            raise OSError(5, "Input/output error")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    rec.committed = True
    with pytest.raises(OSError):
        rec.save(work)
    [(_, again)] = recovery.records(str(root))
    assert again.committed is False                          # the record as it was
    assert [p.name for p in work.iterdir() if p.is_file()] == [recovery.RECORD]
    rec.save(work)
    assert synced[1:] == [False, True]                       # the file, then its directory
    assert recovery.records(str(root))[0][1].committed is True


async def test_an_unreadable_record_does_not_keep_the_others_from_being_settled(root, acted, monkeypatch):
    record(root, 1)
    (root / "2026-1-source" / recovery.RECORD).write_text("")     # killed mid-write by an older livemig
    record(root, 2)
    answers(monkeypatch, "killed")
    first, second = await recovery.recover(Options(image_root=str(root)), None)
    assert first.outcome == "unresolved" and "cannot read" in first.detail
    assert (second.migration_id, second.outcome, acted) == ("2026-2", "rolled back", ["resume"])
    assert (root / "2026-1-source" / recovery.RECORD).exists()       # kept, for the operator


async def test_a_record_that_fails_to_settle_does_not_keep_the_others_from_it(root, monkeypatch, here):
    record(root, 1)
    record(root, 2)
    answers(monkeypatch, "killed", "killed")
    resumed = []

    async def resume(self, lazy_images=None):
        resumed.append(self)
        if len(resumed) == 1:
            raise LivemigError("podman container restore web1 exited 125", phase="rollback")
        return []
    monkeypatch.setattr(HeldCopy, "resume", resume)
    first, second = await recovery.recover(Options(image_root=str(root)), None)
    assert first.outcome == "unresolved" and "exited 125" in first.detail
    assert second.outcome == "rolled back" and len(resumed) == 2
    assert [w.name for w, _ in recovery.records(str(root))] == ["2026-1-source"]   # tried again next time


@pytest.fixture
def runtime(monkeypatch):
    """The container runtimes as stand-ins: the state each reports, and the commands run."""
    from livemig.runtimes import held, oci, podman
    ran: list[list[str]] = []
    now: dict = {}

    async def inspect(name):
        return now.get("podman")

    async def state(rt, name):
        return now.get(rt)

    async def run(argv, **kw):
        ran.append(argv)
        if argv[1] in ("resume", "unpause", "container"):      # it runs now, as the runtime would say
            now[argv[0]] = {"status": "running", "State": {"Running": True}}
        return proc.Result(tuple(argv), 0, b"", b"")
    monkeypatch.setattr(podman, "inspect", inspect)
    monkeypatch.setattr(oci, "state", state)
    monkeypatch.setattr(held.proc, "run", run)
    return ran, now


@pytest.mark.parametrize("rt, state, command", [
    # podman cannot pause what it checkpoints: its final checkpoint stopped it, a restore brings it back,
    # with the connections that checkpoint always keeps (podman.flags)
    ("podman", {"State": {"Status": "exited", "Running": False, "Checkpointed": True}},
     ["podman", "container", "restore", "--tcp-established", "web1"]),
    ("podman", {"State": {"Status": "paused", "Running": True, "Paused": True}}, ["podman", "unpause", "web1"]),
    ("podman", {"State": {"Status": "running", "Running": True, "Paused": False}}, None),
    ("runc", {"status": "paused"}, ["runc", "resume", "web1"]),
    ("runc", {"status": "running"}, None),     # paused never, or resumed already: nothing to do
    ("crun", {"status": "paused"}, ["crun", "resume", "web1"]),
])
async def test_a_held_container_is_resumed_as_it_actually_is(runtime, rt, state, command):
    ran, now = runtime
    now[rt] = state
    await HeldCopy(rt, [], "web1").resume()
    assert ran == ([command] if command else [])


@pytest.mark.parametrize("rt, state", [("podman", None), ("runc", None), ("runc", {"status": "stopped"})])
async def test_a_held_container_that_is_gone_or_stopped_cannot_be_resumed(runtime, rt, state):
    ran, now = runtime
    now[rt] = state
    with pytest.raises(LivemigError, match="web1"):
        await HeldCopy(rt, [], "web1").resume()
    assert ran == []


async def test_recover_list_says_where_each_move_stands_and_touches_nothing(root, here):
    from livemig.source.pending import pending
    record(root, 1)
    rec = record(root, 2)
    rec.lazy, rec.target_resumed_at = False, 0.0
    rec.committed = True
    rec.save(root / "2026-2-source")
    (root / "2026-3-source").mkdir(mode=0o700)
    (root / "2026-3-source" / recovery.RECORD).write_text("{not json")
    here[(4242 + 1, 7)] = held.HELD
    before = sorted(str(p) for p in root.rglob("*"))
    found = await pending(Options(image_root=str(root)))
    assert [(x.migration_id, x.target, x.stage, x.here, x.livemig_alive) for x in found] == [
        ("2026-1", "b", "post-copy or a fill", "held by a tracer (CRIU, or a debugger)", False),
        ("2026-2", "b", "stop-and-copy, the source's copy given up", "stopped", False),
        ("2026-3", "", "unknown", found[2].here, False)]
    assert "cannot read" in found[2].here and all(x.recorded_at.endswith("+00:00") for x in found)
    assert sorted(str(p) for p in root.rglob("*")) == before       # nothing settled, nothing deleted
