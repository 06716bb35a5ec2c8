"""`livemig move --pid` refuses, in its preflight and before it reaches the target, the
processes that must never move: init (PID 1), the kernel's threads (kthreadd, PID 2, and its
children), and livemig's own ancestors (the shell, the sshd that runs it): one clear line,
the preflight's exit code, and nothing touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from livemig.errors import ExitCode


def _kernel_thread() -> int:
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != "2":
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue        # gone meanwhile
            if ppid == 2:
                return int(d.name)
    pytest.fail("no kernel thread found under kthreadd")


def _move(pid: int, root: Path) -> subprocess.CompletedProcess:
    # a target that cannot exist: reaching for it would fail otherwise (the connection's exit code)
    return subprocess.run([sys.executable, "-m", "livemig", "move", "--pid", str(pid), "--image-root", str(root),
                           "nowhere.invalid"], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("which, said", [
    ("init", "init"),
    ("kthreadd", "kernel"),
    ("kernel thread", "kernel"),
    ("ancestor", "livemig runs under it"),
])
def test_a_process_that_must_not_move_is_refused_in_the_preflight(tmp_path, which, said):
    pid = {"init": 1, "kthreadd": 2, "kernel thread": _kernel_thread(), "ancestor": os.getpid()}[which]
    root = tmp_path / "images"
    res = _move(pid, root)
    assert res.returncode == ExitCode.PREFLIGHT, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert said in lines[0] and str(pid) in lines[0] and "Traceback" not in res.stderr
    assert not root.exists()        # refused before anything was made, on either host


# a process that maps a System V shared memory segment (as PostgreSQL does), then waits
SYSV_HOLDER = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
shmid = libc.shmget(0, 1 << 16, 0o1600)          # IPC_PRIVATE, IPC_CREAT, 0600
assert shmid >= 0 and libc.shmat(shmid, None, 0) not in (None, ctypes.c_void_p(-1).value)
libc.shmctl(shmid, 0, None)                      # IPC_RMID: gone once nothing maps it
print("mapped", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("own_ipc", [False, True], ids=["in the host's IPC namespace", "in one of its own"])
def test_a_tree_that_maps_system_v_shared_memory_moves_only_in_an_ipc_namespace_of_its_own(own_ipc):
    # CRIU dumps such a segment only with its namespace, and would refuse the tree once frozen
    argv = [*(["unshare", "--ipc"] if own_ipc else []), sys.executable, "-c", SYSV_HOLDER]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    short_dir = Path(tempfile.mkdtemp(prefix="lm"))
    try:
        assert holder.stdout.readline() == "mapped\n"
        root = short_dir / "images"       # (a UNIX socket's path under it must fit)
        res = _move(holder.pid, root)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        if own_ipc:      # past this check: on to the target, which cannot be reached
            assert res.returncode == ExitCode.CONNECTION and "System V" not in res.stderr, res.stderr
        else:
            assert res.returncode == ExitCode.PREFLIGHT and len(lines) == 1, res.stderr
            assert "System V shared memory" in lines[0] and "unshare --ipc" in lines[0]
            assert not root.exists()
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(short_dir)
