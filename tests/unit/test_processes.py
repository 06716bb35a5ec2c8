"""Naming processes for good: a tree read as it is now, and signals that reach only the
process a (PID, start time) pair names. Real processes, no stand-ins."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from livemig import proc
from livemig.runtimes import process
from tests.waiting import eventually


def test_a_signal_reaches_only_the_process_its_pair_names():
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = proc.start_time(child.pid)
        # the same PID with another start time: another process, that reused the PID
        assert proc.signal_tasks([(child.pid, started + 1)], signal.SIGKILL) == 0
        assert child.poll() is None
        assert proc.signal_tasks([(child.pid, started)], signal.SIGKILL) == 1
        assert child.wait(timeout=10) == -signal.SIGKILL
        # gone (reaped): nothing to signal, and no error
        assert proc.signal_tasks([(child.pid, started)], signal.SIGKILL) == 0
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
        tree = proc.process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 3
        # the living child asleep, the other a zombie (each may take a moment to get there)
        states = eventually(lambda: {pid: proc.state(pid) for pid in tree[1:]},
                            lambda st: sorted(st.values()) == ["S", "Z"], within=10)
        # a zombie is never held by CRIU's ptrace: it is not taken for one CRIU let go of
        assert [pid for pid in tree if process._traceable(pid)] == [parent.pid] + \
            [pid for pid, st in states.items() if st == "S"]
        # the tree read later is the tree then: the live child killed, a zombie or gone
        live = next(pid for pid, st in states.items() if st == "S")
        os.kill(live, signal.SIGKILL)
        eventually(lambda: proc.state(live), lambda st: st in ("Z", None), within=10)
        assert parent.pid in proc.process_tree(parent.pid)
    finally:
        for pid in reversed(proc.process_tree(parent.pid)):
            proc.signal_tasks(proc.tasks([pid]), signal.SIGKILL)
        parent.wait()


def test_the_boot_id_is_this_boots():
    assert len(proc.boot_id()) == 36
    me = (os.getpid(), proc.start_time(os.getpid()))
    assert proc.named([me]) == [me[0]] == proc.named([me], proc.boot_id())
    assert proc.named([me], "another-boot") == []



def test_a_program_whose_start_is_cancelled_is_left_nowhere():
    # A rollback may cancel a start under way: the program (and what it forked) must not run
    # on unknown to anyone, as a CRIU restore once did, a second copy of the workload.
    # Under uvloop, as the CLI and the agent run.
    import asyncio

    import uvloop
    script = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\ntime.sleep(60)\n"

    def ours() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if script.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
        return found

    async def starts() -> int:
        cancelled = 0
        for _ in range(20):      # the cancel lands at each stage of the start, one run or another
            starting = asyncio.ensure_future(proc.start([sys.executable, "-c", script]))
            await asyncio.sleep(0)
            starting.cancel()
            try:
                child = await starting
            except asyncio.CancelledError:
                cancelled += 1
                continue
            proc.signal_tasks(proc.tasks(proc.process_tree(child.pid)), signal.SIGKILL)   # the caller's own
            await child.wait()
        return cancelled

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert runner.run(starts()) > 0
        left = eventually(ours, lambda found: not [pid for pid in found if proc.state(pid) not in ("Z", None)],
                          within=5)
        assert left == [] or all(proc.state(pid) in ("Z", None) for pid in left)
    finally:
        for pid in ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_process_s_mappings_are_read_with_their_names():
    mine = proc.mappings(os.getpid())
    names = {name for _, _, _, name in mine}
    assert "[stack]" in names and "[vdso]" in names and any("python" in name for name in names)
    assert all(start < end and len(perms) == 4 for start, end, perms, _ in mine)
    assert proc.private_mappings(os.getpid()) == [(s, e) for s, e, perms, _ in mine if perms[3] == "p"]


FORKING = r"""
import os, sys, time
r, w = os.pipe()
os.write(int(sys.argv[1]), str(os.getpid()).encode() + b"\n")
while True:             # a child every millisecond, each of a session of its own, as CRIU's restore makes them
    if os.fork() == 0:
        os.setsid()
        os.write(int(sys.argv[1]), str(os.getpid()).encode() + b"\n")
        time.sleep(60)
        os._exit(0)
    time.sleep(0.001)
"""


def test_a_tree_that_keeps_forking_is_killed_whole():
    # The kill once read the tree, then killed it: a child forked in between outlived its
    # parent, reparented, and a restore's task ran on beside the source's copy.
    for _ in range(5):
        r, w = os.pipe()
        p = subprocess.Popen([sys.executable, "-c", FORKING, str(w)], pass_fds=(w,))
        os.close(w)
        born: list[int] = []
        try:
            with os.fdopen(r, "rb", buffering=0) as out:
                lines = _lines(out)
                assert next(lines) == p.pid
                born += [next(lines) for _ in range(20)]      # a tree of some size, still forking
                proc.kill_tree(p.pid)
                p.wait(timeout=10)
                born += list(_lines(out, within=3.0))       # until EOF: every writer gone
            # EOF comes as the killed close their files, early in their exit: the rest of it (their
            # memory freed, still "R" meanwhile) may take a moment more. A survivor sleeps 60 s.
            eventually(lambda born=born: [pid for pid in born if proc.state(pid) not in (None, "Z")], lambda alive: not alive,
                       within=10.0)
        finally:
            for pid in born:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _lines(out, within: float = 10.0):
    """The PIDs written to out, until EOF or within seconds are over (a survivor holds it open)."""
    import select
    import time
    deadline, rest = time.monotonic() + within, b""
    while select.select([out], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = out.read(4096)
        if not chunk:
            return
        *whole, rest = (rest + chunk).split(b"\n")
        yield from (int(x) for x in whole)


def test_the_files_a_tree_s_restore_opens_by_path_are_its_open_files_mappings_and_cwd(tmp_path):
    from livemig import host
    log, mapped, gone = tmp_path / "app.log", tmp_path / "mapped.bin", tmp_path / "gone.txt"
    mapped.write_bytes(b"\0" * 4096)
    code = ("import mmap, os, sys, time\n"
            "f = open(sys.argv[1], 'a'); g = open(sys.argv[3], 'w'); os.unlink(sys.argv[3])\n"
            "m = mmap.mmap(os.open(sys.argv[2], os.O_RDWR), 4096)\n"
            "os.chdir(sys.argv[4]); print('up', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(log), str(mapped), str(gone), str(tmp_path)],
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        found = host.reopened_files([p.pid])
        assert {str(log), str(mapped), str(tmp_path), os.path.realpath(sys.executable)} <= set(found)
        assert not [f for f in found if "gone.txt" in f or f.startswith(("/proc/", "/dev/"))]
    finally:
        p.kill()
        p.wait()
