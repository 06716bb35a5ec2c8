"""The copy's guard fails closed (issue 27, item 6): the real guard process, against real
process trees, its agent played by the test. Whatever goes wrong (a signal that would end
it, a kill that fails, a message it cannot read whole), it kills every copy it was told
of, writes the verdict "killed", and only then exits and lets the uffds go; and where a
copy has a cgroup of its own, it kills the copy through it, escaped processes too."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from livemig.errors import LivemigError
from livemig.target import guard as guard_module
from livemig.target import kills
from livemig.target.guard import Guard
from livemig.target.verdicts import Verdicts
from tests.waiting import eventually

MID = "m1"


# --- the guard, as the agent starts it ----------------------------------------------------------

class Started:
    """A guard process and the agent's end of its socket (a Guard the test tells things through)."""

    def __init__(self, root: Path, prologue: str | None = None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = guard_module.COMMAND if prologue is None else (
            sys.executable, "-I", "-c", prologue, guard_module._LIVEMIG_PARENT)
        self.stderr = root / "guard.stderr"
        with self.stderr.open("wb") as err:
            self.process = subprocess.Popen([*command, str(theirs.fileno()), str(root), MID],
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        theirs.close()
        self.guard = Guard(None, ours)      # type: ignore[arg-type]  # the test reaps the process itself
        self.root = root

    def read_all(self) -> None:
        """Until the guard has read every message sent: then it runs its loop, past its start."""
        assert self.guard.socket is not None
        eventually(lambda: fcntl.ioctl(self.guard.socket, termios.TIOCOUTQ, struct.pack("i", 0)),
                   lambda b: struct.unpack("i", b)[0] == 0, within=30)

    def agent_dies(self) -> None:
        """The agent's end closes without "done", as when the kernel closes a killed agent's."""
        assert self.guard.socket is not None
        self.guard.socket.close()
        self.guard.socket = None

    def exit_status(self, within: float = 30) -> int:
        try:
            return self.process.wait(within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the guard still runs after {within} s")

    def verdict(self) -> tuple[str, str]:
        return Verdicts(self.root).read(MID)

    def close(self) -> None:
        if self.guard.socket is not None:
            self.guard.socket.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def guards(tmp_path):
    started: list[Started] = []

    def start(prologue: str | None = None) -> Started:
        root = tmp_path / f"root{len(started)}"
        (root / MID).mkdir(parents=True)      # the agent's images, which the guard deletes
        started.append(Started(root, prologue))
        return started[-1]
    yield start
    for s in started:
        s.close()


# --- copies: real process trees, stopped like a tree CRIU restored --------------------------------

def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:     # it is gone: no children
        return []


def in_cgroup(cgroup: Path | None, argv: list[str]) -> list[str]:
    """argv, run in cgroup from its start (a shell moves itself there, then execs it)."""
    if cgroup is None:
        return argv
    return ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', str(cgroup), *argv]


def _gone(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])      # a pidfd reads once its process exited


class Tree:
    """sh with two sleeping children, sh stopped; its PID in pidfile. Watched through pidfds."""

    def __init__(self, pidfile: Path, cgroup: Path | None = None):
        self.root = subprocess.Popen(in_cgroup(cgroup, ["sh", "-c", "sleep 1000 & sleep 1000 & wait"]),
                                     start_new_session=True)
        kids = eventually(lambda: _children(self.root.pid), lambda k: len(k) == 2)
        self.fds = {pid: os.pidfd_open(pid) for pid in [self.root.pid, *kids]}
        os.kill(self.root.pid, signal.SIGSTOP)
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{self.root.pid}\n")
        self.pidfile = pidfile

    def alive(self) -> list[int]:
        return [pid for pid, fd in self.fds.items() if not _gone(fd)]

    def killed(self, within: float = 30) -> bool:
        eventually(self.alive, lambda left: left == [], within=within)
        return self.root.wait(within) == -signal.SIGKILL

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(ProcessLookupError):    # already gone
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        self.root.wait()


@pytest.fixture
def trees(tmp_path):
    made: list[Tree] = []

    def make(pidfile: Path | None = None, cgroup: Path | None = None) -> Tree:
        made.append(Tree(pidfile or tmp_path / "work" / f"restored-{len(made)}.pid", cgroup))
        return made[-1]
    yield make
    for t in made:
        t.close()


# --- (a) the signals that would end it ------------------------------------------------------------

def test_the_guard_sent_sigterm_and_sighup_lives_on_and_kills_its_copy_once_its_agent_dies(guards, trees):
    g, first, second = guards(), trees(), trees()
    g.guard.tell("pidfile", str(first.pidfile))
    g.read_all()                            # it runs: what a session scope stopped would find
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        g.process.send_signal(sig)
    time.sleep(0.5)
    assert g.process.poll() is None, g.stderr.read_text()     # it did not go (a scope's SIGKILL would)
    g.guard.tell("pidfile", str(second.pidfile))      # and it still listens
    g.agent_dies()
    assert first.killed() and second.killed()
    assert g.exit_status() == 0 and g.verdict()[0] == "killed"
    assert not (g.root / MID).exists()


def test_done_lets_the_guard_go_and_the_copy_be_signals_or_not(guards, trees):
    g, copy = guards(), trees()
    g.guard.tell("pidfile", str(copy.pidfile))
    g.read_all()
    g.process.send_signal(signal.SIGTERM)
    g.guard.tell("done")
    assert g.exit_status() == 0
    assert len(copy.alive()) == 3 and g.verdict()[0] == "none"


# --- (b) a kill that fails ----------------------------------------------------------------------

SHORT_DELETE = ("import dataclasses, sys; sys.path.insert(0, sys.argv.pop(1)); import livemig.target.guard as g; "
                "import livemig.target.kills as k; k.WAITS = dataclasses.replace(k.WAITS, container_delete=1.0); "
                "sys.exit(g.main(sys.argv[1:]))")


def test_a_kill_that_fails_stops_neither_the_other_kills_nor_the_verdict(guards, trees, tmp_path):
    hangs = tmp_path / "bin" / "hanging-runc"
    hangs.parent.mkdir()
    hangs.write_text("#!/bin/sh\nexec sleep 1000\n")
    hangs.chmod(0o755)
    unreadable = tmp_path / "work" / "a-directory.pid"
    unreadable.mkdir(parents=True)
    garbage = tmp_path / "work" / "garbage.pid"
    garbage.write_text("not a PID\n")
    g = guards(SHORT_DELETE)
    in_container, tree = trees(), trees()
    # each failing kill told before the ones that work
    g.guard.tell("container", str(tmp_path / "bin" / "no-such-runtime"), "c1")
    g.guard.tell("container", str(hangs), "c2")                 # its delete times out
    g.guard.tell("pidfile", str(in_container.pidfile))          # c2's root, which its runtime wrote
    g.guard.tell("pidfile", str(unreadable))
    g.guard.tell("pidfile", str(garbage))
    g.guard.tell("pidfile", str(tmp_path / "work" / "never-written.pid"))
    g.guard.tell("pidfile", str(tree.pidfile))
    g.agent_dies()
    assert in_container.killed() and tree.killed()
    assert g.exit_status() == 0, g.stderr.read_text()
    state, detail = g.verdict()
    assert state == "killed" and "c1" in detail and "c2" in detail    # what failed, said
    assert not (g.root / MID).exists()


# --- (c) messages framed by length ----------------------------------------------------------------

def _long_pidfile(base: Path, length: int) -> Path:
    """A path of exactly length characters (PATH_MAX counts its NUL too: 4095 at most)."""
    d = base
    while len(str(d)) < length - 300:
        d = d / ("d" * 200)
    return d / ("p" * (length - len(str(d)) - 1))


def test_messages_are_read_whole_a_path_of_any_length_or_characters_and_a_burst(guards, trees, tmp_path):
    g = guards()
    long_path = _long_pidfile(tmp_path / "long", 4094)
    long = trees(long_path)
    spaced = trees(tmp_path / "a work dir" / "restored 0.pid\nnext line")
    burst = [trees() for _ in range(3)]
    with open("/dev/null") as held:      # stands for a uffd: any descriptor rides along
        g.guard.tell("pidfile", str(long_path))
        g.guard.tell("pidfile", str(spaced.pidfile))
        for t in burst:               # sent at once, never read until all are in
            for _ in range(10):
                g.guard.tell("uffd", "1", fds=(held.fileno(),))
            g.guard.tell("pidfile", str(t.pidfile))
    g.agent_dies()
    assert long.killed() and spaced.killed() and all(t.killed() for t in burst)
    assert g.exit_status() == 0 and g.verdict()[0] == "killed"


@pytest.mark.parametrize("record", [
    b"\0\0\0\x07pidfile" + b"/" * 100_000,                       # longer than the guard reads: truncated
    struct.pack("!I", 4000) + b"pidfile\0/x.pid",                # shorter than its length says
    struct.pack("!I", 7) + b"pidfile",                           # a kill with its path missing
    struct.pack("!I", 13) + b"resume\0copy-1",                   # nothing the guard knows
    b"\0\0",                                                     # less than a length
], ids=["truncated", "short", "incomplete", "unknown", "no-length"])
def test_a_message_the_guard_cannot_read_whole_kills_what_it_knows_at_once(guards, trees, record):
    g, copy = guards(), trees()
    g.guard.tell("pidfile", str(copy.pidfile))
    assert g.guard.socket is not None
    g.guard.socket.send(record)
    assert copy.killed(within=10)                        # the agent still lives, and its socket
    assert g.exit_status(within=10) == 0 and g.verdict()[0] == "killed"


def test_the_agent_never_sends_a_message_the_guard_could_misread(guards):
    g = guards()
    with pytest.raises(LivemigError, match="guard"):
        g.guard.tell("pidfile", "/" + "x" * 100_000)
    with pytest.raises(LivemigError, match="guard"):
        g.guard.tell("pidfile", "/a\0/b")
    g.guard.tell("done")
    assert g.exit_status() == 0


# --- (d) through the cgroup first -----------------------------------------------------------------

def _cgroup2() -> Path | None:
    """Where cgroup v2 is mounted with the whole hierarchy (/sys/fs/cgroup, or a hybrid
    host's /sys/fs/cgroup/unified), if cgroup.kill is there (Linux 5.14) and we are root."""
    if os.geteuid() != 0:
        return None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"] and left.split()[3] == "/":
            mount = Path(left.split()[4])
            return mount if (mount / "cgroup.procs").exists() and _kill_file(mount) else None
    return None


def _kill_file(mount: Path) -> bool:
    probe = mount / f"livemig-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:       # no cgroup of ours can be made here: the tests that need one skip
        return False
    try:
        return (probe / "cgroup.kill").exists()
    finally:
        probe.rmdir()


@pytest.fixture
def cgroups():
    mount = _cgroup2()
    if mount is None:
        pytest.skip("needs root and a cgroup v2 hierarchy with cgroup.kill")
    made: list[Path] = []

    def make() -> Path:
        made.append(mount / f"livemig-test-{os.getpid()}-{len(made)}")
        made[-1].mkdir()
        return made[-1]
    yield make
    for cg in made:
        (cg / "cgroup.kill").write_text("1")        # whatever a test left in it
        eventually(lambda cg=cg: (cg / "cgroup.procs").read_text(), lambda procs: procs == "", within=30)
        eventually(lambda cg=cg: _rmdir(cg), lambda gone: gone, within=30)


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
    except OSError:      # busy a moment longer: a process of it still exiting
        return False
    return True


ESCAPING = """
import os, signal, sys, time
if os.fork() == 0:
    if os.fork() == 0:                  # leaves the tree: its parent exits at once
        print(os.getpid(), flush=True)
        time.sleep(1000)
    os._exit(0)
os.wait()
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_copy_in_a_cgroup_of_its_own_is_killed_through_it_what_left_its_tree_too(guards, cgroups, tmp_path):
    cg = cgroups()
    root = subprocess.Popen(in_cgroup(cg, [sys.executable, "-c", ESCAPING]), stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        escaped = int(root.stdout.readline())      # type: ignore[union-attr]
        watched = os.pidfd_open(escaped)
        eventually(lambda: Path(f"/proc/{root.pid}/stat").read_text().split(")")[-1].split()[0],
                   lambda st: st == "T")
        assert root.pid not in _children(escaped) and escaped not in _children(root.pid)
        pidfile = tmp_path / "work" / "restored-0.pid"
        pidfile.parent.mkdir()
        pidfile.write_text(f"{root.pid}\n")
        g = guards()
        g.guard.tell("pidfile", str(pidfile))
        g.agent_dies()
        assert root.wait(30) == -signal.SIGKILL
        eventually(lambda: _gone(watched), lambda gone: gone, within=30)     # no signal walk finds it
        assert g.exit_status() == 0 and g.verdict()[0] == "killed"
        os.close(watched)
    finally:
        root.kill()
        root.wait()


def test_a_cgroup_that_holds_an_older_process_of_another_is_not_killed_whole(guards, trees, cgroups):
    cg = cgroups()
    other = subprocess.Popen(in_cgroup(cg, ["sleep", "1000"]))
    try:
        time.sleep(0.1)          # a few clock ticks: its start time is before the copy's root's
        copy = trees(cgroup=cg)
        g = guards()
        g.guard.tell("pidfile", str(copy.pidfile))
        g.agent_dies()
        assert copy.killed()
        assert g.exit_status() == 0 and g.verdict()[0] == "killed"
        assert other.poll() is None         # a CRIU tree may be restored into a cgroup of someone else's
    finally:
        other.kill()
        other.wait()


def test_the_guards_own_cgroup_is_never_killed_whole(guards, trees, cgroups):
    cg = cgroups()
    copy = trees(cgroup=cg)
    time.sleep(0.1)          # a few clock ticks: the guard is younger than the copy's root, like its
    g = guards()             # processes that left its tree, and only whose cgroup it is tells them apart
    (cg / "cgroup.procs").write_text(str(g.process.pid))
    g.guard.tell("pidfile", str(copy.pidfile))
    g.agent_dies()
    assert copy.killed()
    assert g.exit_status() == 0 and g.verdict()[0] == "killed"


def test_a_copy_that_ran_is_said_lost_not_killed(guards, trees):
    # issue 26: the agent's verdict says, before the Resume, that the copy runs; its guard,
    # ending it, says "lost": the source's copy then waits for the operator's word
    g, copy = guards(), trees()
    g.guard.tell("pidfile", str(copy.pidfile))
    Verdicts(g.root).write(MID, "serving", phase="commit", ran=True)
    g.agent_dies()
    assert copy.killed()
    assert g.exit_status() == 0 and g.verdict()[0] == "lost"


def test_a_copy_that_ran_waits_for_a_successor_who_takes_its_uffds_and_guard_over(guards, trees):
    # the agent dies once the copy ran: its guard holds the uffds, and hands them, with the
    # PIDs they are of and the moves of their ranges, to a successor, whose guard it becomes
    g, copy = guards(), trees()
    g.guard.tell("pidfile", str(copy.pidfile))
    g.guard.tell("successor", "30")
    with open("/dev/null") as one, open("/dev/zero") as two:     # stand for uffds: any descriptor rides along
        g.guard.tell("uffd", "1", fds=(one.fileno(),))
        g.guard.tell("uffd", "7", fds=(two.fileno(),))
    g.guard.tell("remap", "1", "4096", "8192", "4096")
    Verdicts(g.root).write(MID, "serving", phase="commit", ran=True)
    g.agent_dies()
    successor, handed = eventually(lambda: _succeed(g.root), lambda got: got is not None, within=30)
    try:
        assert [pid for pid, _ in handed.uffds] == [1, 7] and handed.remaps == [(1, 4096, 8192, 4096)]
        assert os.readlink(f"/proc/self/fd/{handed.uffds[1][1]}") == "/dev/zero"
        assert g.verdict()[0] == "serving" and "successor" in g.verdict()[1]
        assert copy.alive()          # the copy runs on, its faults waiting
    finally:
        handed.close()
    asyncio.run(successor.release())         # the successor's copy is whole: the guard may go
    assert g.exit_status() == 0 and copy.alive()


def test_a_successor_that_never_comes_leaves_the_copy_killed_once_the_time_is_up(guards, trees):
    g, copy = guards(), trees()
    g.guard.tell("pidfile", str(copy.pidfile))
    g.guard.tell("successor", "1")
    Verdicts(g.root).write(MID, "serving", phase="commit", ran=True)
    g.agent_dies()
    assert copy.killed(within=30)
    assert g.exit_status() == 0 and g.verdict()[0] == "lost"
    assert not (g.root / f"{MID}.successor").exists()


def _succeed(root):
    try:
        return Guard.succeed(root, MID)
    except LivemigError:      # its guard is not listening yet
        return None


def test_a_copy_the_guard_kills_is_let_onto_the_link_again_every_kill_tried(monkeypatch):
    """A copy kept off the link from its host (quiet.hush) and killed by its guard: what kept
    it off goes too, after the kills, even where one of them failed."""
    ran: list[list[str]] = []

    def run(argv, **kw):
        ran.append(argv)
        if argv[0] != "nft":
            raise OSError("no such runtime")
        return subprocess.CompletedProcess(argv, 0)
    monkeypatch.setattr(kills.subprocess, "run", run)
    failed = kills.kill_all([["container", "podman", "web1"], ["hush", "livemig-hush-198-18-0-150"]], [])
    assert ran[-1] == ["nft", "delete", "table", "netdev", "livemig-hush-198-18-0-150"]
    assert failed == ["container web1: no such runtime"]
