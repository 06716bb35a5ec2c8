"""The target's copy resumed (Copy.resume): every task of a stopped tree gets SIGCONT, and a
task gone between reading the tree and the signal (a zombie its resumed parent reaped, as a
family that forks all the time has) is skipped, not a failed Resume."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from livemig import proc
from livemig.target.copy import Copy
from livemig.target.stage import Stage, Stages

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
