"""The target's copy resumed (Copy.resume): every task of a stopped tree gets SIGCONT, and a
task gone between reading the tree and the signal (a zombie its resumed parent reaped, as a
family that forks all the time has) is skipped, not a failed Resume. A container is restored
stopped too (its runtime's CRIU told so through a configuration file), paused, and resumed
by a thaw and then SIGCONT; the same for one `livemig recover` resumes as an orphan."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livemig import criu, proc, runtimes
from livemig.errors import Phase
from livemig.runtimes import held as held_mod
from livemig.runtimes.held import HeldCopy
from livemig.target import copy as copy_mod
from livemig.target import restore as restore_mod
from livemig.target.copy import Copy
from livemig.target.failures import AgentFailure
from livemig.target.stage import Stage, Stages
from livemig.wire import protocol as p

# forks a child that exits at once (a zombie), stops itself, and once continued reaps it
PARENT = """
import os, signal, sys, time
child = os.fork()
if child == 0:
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
os.waitpid(child, 0)
time.sleep(30)
"""


def _until(check, within: float = 10.0) -> None:
    end = time.monotonic() + within
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _gone_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_resume_continues_a_stopped_tree_and_skips_a_task_gone_meanwhile(monkeypatch):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        _until(lambda: proc.state(parent.pid) == "T" and proc.state(child) == "Z")
        gone = _gone_pid()
        stages = Stages()
        for s in (Stage.PREPARING, Stage.RESTORING, Stage.RESTORED):
            stages.to(s)
        copy = Copy(stages)
        copy.roots = [parent.pid]
        # the tree as read just before its parent reaped a child: a PID that names nothing now
        monkeypatch.setattr(copy, "pids", lambda: [parent.pid, child, gone])
        asyncio.run(copy.resume())
        assert stages.stage is Stage.RUNNING
        _until(lambda: proc.state(parent.pid) not in ("T", None) and proc.state(child) is None)
    finally:
        parent.kill()
        parent.wait()


def _restored() -> Stages:
    stages = Stages()
    for s in (Stage.PREPARING, Stage.RESTORING, Stage.RESTORED):
        stages.to(s)
    return stages


STOPS_ITSELF = "import os, signal, time; os.kill(os.getpid(), signal.SIGSTOP); time.sleep(30)"


@pytest.fixture
def stopped_task():
    """A task stopped as CRIU leaves a restored one (SIGSTOP)."""
    task = subprocess.Popen([sys.executable, "-c", STOPS_ITSELF])
    _until(lambda: proc.state(task.pid) == "T")
    yield task
    task.kill()
    task.wait()


async def test_a_container_is_restored_with_a_criu_configuration_that_leaves_it_stopped(tmp_path, monkeypatch):
    ran: list[tuple[list[str], dict | None]] = []

    async def run(argv, **kw):
        ran.append((list(argv), kw.get("env")))
        return proc.Result(tuple(argv), 0, b"", b"")

    async def known(c):
        return False
    monkeypatch.setattr(proc, "run", run)
    monkeypatch.setattr(runtimes, "known", known)
    images = tmp_path / "final"
    images.mkdir()
    c = p.Container("runc", "web1", "/var/lib/ctr/web1")
    res, argv, _ = await restore_mod.restore(p.Restore(dir="final", container=c), images, tmp_path,
                                             Copy(_restored()), None, lazy=False)
    assert res.returncode == 0 and argv[:2] == ["runc", "restore"]
    (restoring, env), (pausing, pause_env) = ran
    assert restoring == argv and pausing == ["runc", "pause", "web1"] and pause_env is None
    assert env is not None and env["PATH"] == proc.environ()["PATH"]
    assert Path(env[criu.CONFIG_FILE_ENV]).read_bytes() == b"leave-stopped\ntcp-close\n"
    assert Path(env[criu.CONFIG_FILE_ENV]).parent == tmp_path       # the move's own, private


async def test_a_container_is_thawed_and_then_its_stopped_tasks_continued(monkeypatch, stopped_task):
    thawed_while: list[str | None] = []

    async def run(argv, **kw):
        assert list(argv) == ["runc", "resume", "web1"]
        thawed_while.append(proc.state(stopped_task.pid))
        return proc.Result(tuple(argv), 0, b"", b"")
    monkeypatch.setattr(proc, "run", run)
    copy = Copy(_restored())
    copy.containers = [p.Container("runc", "web1", "/var/lib/ctr/web1")]
    copy.roots = [stopped_task.pid]
    assert await copy.resume() == [stopped_task.pid]
    assert thawed_while == ["T"]         # thawed first, still stopped: then continued
    _until(lambda: proc.state(stopped_task.pid) not in ("T", None))


async def test_a_runtime_that_cannot_resume_its_container_fails_the_resume_as_itself(monkeypatch, stopped_task):
    """Its own network is opened beside the thaw (quiet.speak): a thaw that fails is the
    Resume's error as the runtime said it, not a group of the two; the copy stays to undo."""
    async def run(argv, **kw):
        raise AgentFailure(Phase.COMMIT, "runc resume exited 1: container not paused")

    async def speak(pid):
        await asyncio.sleep(5)      # cancelled once the thaw fails
        return ""
    monkeypatch.setattr(proc, "run", run)
    monkeypatch.setattr(copy_mod.quiet, "speak", speak)
    copy = Copy(_restored())
    copy.containers = [p.Container("runc", "web1", "/var/lib/ctr/web1")]
    copy.roots, copy.quiet = [stopped_task.pid], [stopped_task.pid]
    with pytest.raises(AgentFailure, match="container not paused"):
        await copy.resume()
    assert copy.quiet == [stopped_task.pid] and not copy.stages.running     # its links left for undo()


async def test_an_orphaned_container_recover_resumes_is_continued_too(monkeypatch, stopped_task):
    async def state(runtime, container):
        return {"status": "paused"}

    async def run(argv, **kw):
        return proc.Result(tuple(argv), 0, b"", b"")
    signalled = []
    real = proc.signal_tasks

    def signal_tasks(named, sig):
        signalled.append(sig)
        return real(named, sig)
    monkeypatch.setattr(held_mod.oci, "state", state)
    monkeypatch.setattr(proc, "run", run)
    monkeypatch.setattr(proc, "signal_tasks", signal_tasks)

    async def standing(self):
        return held_mod.RUNNING      # (what a real thaw would leave: the runtime here is a stand-in)
    monkeypatch.setattr(HeldCopy, "standing", standing)
    source = HeldCopy("runc", proc.tasks([stopped_task.pid]), "web1", boot=proc.boot_id())
    await source.resume()        # a source's paused container: thawed, never signalled
    assert signalled == [] and proc.state(stopped_task.pid) == "T"
    orphan = HeldCopy.from_dict(json.loads(json.dumps(dataclasses.asdict(
        HeldCopy("runc", proc.tasks([stopped_task.pid]), "web1", boot=proc.boot_id(), stopped=True)))))
    await orphan.resume()        # a target's restored one: its tasks continued as well
    assert signalled == [signal.SIGCONT]
    _until(lambda: proc.state(stopped_task.pid) not in ("T", None))


@pytest.fixture
def two_stopped():
    """Two tasks stopped: one by the move (CRIU's restore), one by the workload itself."""
    tasks = [subprocess.Popen([sys.executable, "-c", STOPS_ITSELF]) for _ in range(2)]
    _until(lambda: all(proc.state(t.pid) == "T" for t in tasks))
    yield tasks
    for t in tasks:
        t.kill()
        t.wait()


def _running(pid: int) -> bool:
    return proc.state(pid) not in ("T", "t", None)


async def test_a_task_the_workload_had_stopped_stays_stopped_when_the_copy_resumes(two_stopped):
    ours, its_own = two_stopped
    copy = Copy(_restored())
    copy.roots = [ours.pid, its_own.pid]
    copy.pids = lambda: [ours.pid, its_own.pid]      # type: ignore[method-assign]
    # what the images said: its_own was stopped when dumped (in the dump's PIDs, the same here)
    copy.note_own_stops({its_own.pid}, its_own.pid)
    assert copy.own_stops == proc.tasks([its_own.pid])
    await copy.resume()
    _until(lambda: _running(ours.pid))
    await asyncio.sleep(0.2)
    assert proc.state(its_own.pid) == "T"
    # and so does it when recover resumes the copy, as an orphan or a source's held copy
    held = HeldCopy.from_dict(json.loads(json.dumps(dataclasses.asdict(
        HeldCopy("process", proc.tasks([its_own.pid]), boot=proc.boot_id(), own_stops=copy.own_stops)))))
    assert held.own_stops == copy.own_stops
    assert await held.standing() == held_mod.RUNNING     # as the workload left it
    await held._resume()
    await asyncio.sleep(0.2)
    assert proc.state(its_own.pid) == "T"


async def test_a_held_tree_with_an_own_stop_is_stopped_while_the_rest_is(two_stopped):
    ours, its_own = two_stopped
    held = HeldCopy("process", proc.tasks([ours.pid, its_own.pid]), boot=proc.boot_id(),
                    own_stops=proc.tasks([its_own.pid]))
    assert await held.standing() == held_mod.STOPPED
    await held.resume()
    assert _running(ours.pid) and proc.state(its_own.pid) == "T"


async def test_a_hushed_copy_is_let_onto_the_link_before_its_network_opens_and_when_it_is_undone(
        monkeypatch, stopped_task):
    """quiet.hush kept it off the link from before its restore: its Resume lifts that before
    its own network speaks (its first packets would be dropped else), and so does its undoing."""
    said: list[str] = []

    async def run(argv, **kw):
        said.append(" ".join(argv[:2]))
        return proc.Result(tuple(argv), 0, b"", b"")

    async def unhush(hushes):
        said.append(f"unhush {' '.join(hushes)}")

    async def speak(pid):
        said.append("speak")
        return ""
    monkeypatch.setattr(proc, "run", run)
    monkeypatch.setattr(copy_mod.quiet, "unhush", unhush)
    monkeypatch.setattr(copy_mod.quiet, "speak", speak)
    copy = Copy(_restored())
    copy.containers = [p.Container("podman", "web1", "")]
    copy.roots, copy.quiet, copy.hushed = [stopped_task.pid], [stopped_task.pid], ["livemig-hush-198-18-0-150"]
    await copy.resume()
    assert said.index("unhush livemig-hush-198-18-0-150") < said.index("speak") and copy.hushed == []
    undone = Copy(_restored())
    undone.hushed = ["livemig-hush-198-18-0-151"]
    said.clear()
    await undone.undo(None)
    assert "unhush livemig-hush-198-18-0-151" in said and undone.hushed == []
