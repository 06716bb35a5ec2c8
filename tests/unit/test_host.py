"""Naming processes for good: a tree read as it is now, and signals that reach only the
process a (PID, start time) pair names. Real processes, no stand-ins."""

import os
import signal
import subprocess
import sys

from livemig import host
from livemig.runtimes import process
from tests.waiting import eventually


def test_a_signal_reaches_only_the_process_its_pair_names():
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = host.start_time(child.pid)
        # the same PID with another start time: another process, that reused the PID
        assert host.signal_tasks([(child.pid, started + 1)], signal.SIGKILL) == 0
        assert child.poll() is None
        assert host.signal_tasks([(child.pid, started)], signal.SIGKILL) == 1
        assert child.wait(timeout=10) == -signal.SIGKILL
        # gone (reaped): nothing to signal, and no error
        assert host.signal_tasks([(child.pid, started)], signal.SIGKILL) == 0
    finally:
        child.kill()
        child.wait()


FAMILY = """
import os, sys, time
if os.fork() == 0:               # a child that exits at once: a zombie, never reaped
    os._exit(0)
time.sleep(0.2)
if os.fork() == 0:               # and one that lives
    time.sleep(60)
    os._exit(0)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_tree_is_read_as_it_is_now_with_its_zombies_told_apart():
    parent = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE)
    try:
        assert parent.stdout.readline() == b"ready\n"
        tree = host.process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 3
        # the living child asleep, the other a zombie (each may take a moment to get there)
        states = eventually(lambda: {pid: host.state(pid) for pid in tree[1:]},
                            lambda st: sorted(st.values()) == ["S", "Z"], within=10)
        # a zombie is never held by CRIU's ptrace: it is not taken for one CRIU let go of
        assert [pid for pid in tree if process._traceable(pid)] == [parent.pid] + \
            [pid for pid, st in states.items() if st == "S"]
        # the tree read later is the tree then: the live child killed, a zombie or gone
        live = next(pid for pid, st in states.items() if st == "S")
        os.kill(live, signal.SIGKILL)
        eventually(lambda: host.state(live), lambda st: st in ("Z", None), within=10)
        assert parent.pid in host.process_tree(parent.pid)
    finally:
        for pid in reversed(host.process_tree(parent.pid)):
            host.signal_tasks(host.tasks([pid]), signal.SIGKILL)
        parent.wait()


def test_the_boot_id_is_this_boots():
    assert len(host.boot_id()) == 36
    me = (os.getpid(), host.start_time(os.getpid()))
    assert host.named([me]) == [me[0]] == host.named([me], host.boot_id())
    assert host.named([me], "another-boot") == []
