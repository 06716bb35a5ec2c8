"""Issue 27, item 5: a coordinator killed anywhere in stop-and-copy's commit of a process
tree leaves the recovery record's commit mark and CRIU's hook journal in some state; CRIU
acts on the journal alone (its action script, once nobody is on the socket), and `livemig
recover` must then do what CRIU did, never the opposite: never end a source's copy CRIU
resumed (the workload ran on from it), never wind back one CRIU killed.

The commit runs for real (Migration.commit, the hook server, CRIU's script itself), on a
real process standing for the source's copy; only the target's agent is a stand-in."""

from __future__ import annotations

import asyncio
import subprocess
import types

import pytest

from livemig import criu, proc
from livemig.options import Options
from livemig.runtimes.held import HeldCopy
from livemig.runtimes.hook import HookServer
from livemig.runtimes.process import ProcessTree
from livemig.source import fresh_agent, recovery, switchover
from livemig.source.migration import Migration
from livemig.source.stages import Stage
from livemig.wire import protocol as p


class Killed(BaseException):
    """SIGKILL, as the coordinator sees it: nothing of it runs after."""


@pytest.fixture
def workload():
    """A running process: the source's copy, as CRIU leaves it when it resumes it."""
    child = subprocess.Popen(["sleep", "600"])
    yield child
    child.kill()
    child.wait()


async def _commit_killed(root, child, monkeypatch, killed_at: str) -> tuple[Migration, HookServer]:
    """A stop-and-copy move of child, restored on b, whose coordinator is killed at killed_at:
    "mark" (writing the record's commit mark), "journal" (the journal's "committed", the
    mark on disk), "verdict" (the journal written, the verdict's byte not sent)."""
    mig = Migration(child.pid, "b", Options(image_root=str(root)), None)
    m = mig.m
    m.work.mkdir(mode=0o700)
    w = m.workload = ProcessTree(child.pid, criu.Options(), m.work)
    hook = w.hook = await HookServer.start(m.work)
    m.dump = types.SimpleNamespace(frozen_at=0.0)
    m.record = recovery.Record(m.id, "b", HeldCopy("process", proc.tasks([child.pid]), boot=proc.boot_id()),
                               (999_999_999, 1), lazy=False)
    m.save_record()
    m.stages.now = Stage.RESTORE
    save, write_journal, verdict = recovery.Record.save, HookServer._write_journal, HookServer._verdict

    def saving(rec, work):
        if killed_at == "mark" and rec.committed:
            raise Killed
        save(rec, work)

    def journaling(server, state):
        if killed_at == "journal" and state.startswith("committed"):
            raise Killed
        write_journal(server, state)

    def answering(server, byte):
        if killed_at == "verdict":
            raise Killed
        verdict(server, byte)
    monkeypatch.setattr(recovery.Record, "save", saving)
    monkeypatch.setattr(HookServer, "_write_journal", journaling)
    monkeypatch.setattr(HookServer, "_verdict", answering)
    monkeypatch.setattr(switchover, "resume_target", None)    # never reached: killed before
    with pytest.raises(Killed):
        await mig.commit(lazy=False)
    monkeypatch.undo()
    await hook.close()         # the coordinator is gone: nobody is on the hook's socket
    return mig, hook


async def _what_criu_does(hook: HookServer) -> int:
    """CRIU's post-dump step, the coordinator gone: the script's exit (0: CRIU kills the
    source; else it resumes it)."""
    script = await asyncio.create_subprocess_exec(
        str(hook.script), env={"CRTOOLS_SCRIPT_ACTION": "post-dump", **hook.environment()})
    return await script.wait()


@pytest.mark.parametrize("killed_at", ["mark", "journal", "verdict"])
async def test_recover_does_what_criu_did_wherever_the_commit_was_killed(short_root, workload, monkeypatch,
                                                                         killed_at):
    _, hook = await _commit_killed(short_root, workload, monkeypatch, killed_at)
    rc = await _what_criu_does(hook)
    if rc == 0:             # CRIU kills the source's copy, as it does after a 0
        workload.kill()
        workload.wait()
    asked = []

    async def ask_agent(target, msg, reply_type, connect, options):
        assert isinstance(msg, p.SettleOrphan)
        asked.append("resume" if msg.resume else "kill")
        return reply_type("resumed" if msg.resume else "killed")
    monkeypatch.setattr(fresh_agent, "ask_agent", ask_agent)
    monkeypatch.setattr(fresh_agent, "forget_verdict", lambda *a: asyncio.sleep(0))
    [settled] = await recovery.recover(Options(image_root=str(short_root)), None)
    if rc == 0:
        # the source's copy is gone: the target's, restored and stopped, is the workload
        assert (settled.outcome, asked) == ("moved", ["resume"]), settled
    else:
        # CRIU resumed the source's copy, which ran on: it is the workload, the target's goes
        assert (settled.outcome, asked) == ("rolled back", ["kill"]), settled
        assert workload.poll() is None and proc.state(workload.pid) in ("S", "R")
    assert rc == {"mark": 1, "journal": 1, "verdict": 0}[killed_at]
    assert list(short_root.iterdir()) == []         # settled: nothing of the move is left here


async def test_the_commit_mark_is_on_disk_before_the_journal_lets_criu_kill_the_source(short_root, workload,
                                                                                      monkeypatch):
    """The other order would let a kill between the two leave CRIU ending the source while
    no record says it was given up: recover would then remove the target's copy too."""
    mig, _ = await _commit_killed(short_root, workload, monkeypatch, "journal")
    [(_, rec)] = recovery.records(str(short_root))
    assert rec.committed and (mig.m.work / "journal").read_text() == "dumping\n"


async def test_a_source_copy_that_runs_is_never_ended_for_a_target_copy_that_never_ran(short_root, workload,
                                                                                    monkeypatch):
    # the journal let CRIU kill it, but CRIU died first: its tasks went on (ptrace's detach)
    await _commit_killed(short_root, workload, monkeypatch, "verdict")
    asked = []

    async def ask_agent(target, msg, reply_type, connect, options):
        asked.append("resume" if msg.resume else "kill")
        return reply_type("killed")
    monkeypatch.setattr(fresh_agent, "ask_agent", ask_agent)
    monkeypatch.setattr(fresh_agent, "forget_verdict", lambda *a: asyncio.sleep(0))
    [settled] = await recovery.recover(Options(image_root=str(short_root)), None)
    assert (settled.outcome, asked) == ("rolled back", ["kill"]), settled
    assert "was not ended, and runs" in settled.detail and workload.poll() is None


async def test_a_source_copy_criu_still_holds_is_left_until_criu_is_done(short_root, workload, monkeypatch):
    await _commit_killed(short_root, workload, monkeypatch, "journal")
    monkeypatch.setattr(proc, "tracer", lambda pid: 4242)      # CRIU, still attached
    monkeypatch.setattr(fresh_agent, "ask_agent", None)           # nobody is asked
    [settled] = await recovery.recover(Options(image_root=str(short_root)), None)
    assert settled.outcome == "unresolved" and "again in a moment" in settled.detail
    assert recovery.records(str(short_root)) and workload.poll() is None
