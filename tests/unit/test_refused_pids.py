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
import time
from pathlib import Path

import pytest

from livemig import host
from livemig.errors import ExitCode
from livemig.source import namespaces


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


def test_another_user_s_task_is_refused_where_livemig_lacks_cap_sys_resource():
    # CRIU reads each task's rlimits with prlimit(), which on another user's task needs
    # CAP_SYS_RESOURCE: without it the dump failed after the freeze
    holder = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "600"])
    short_dir = Path(tempfile.mkdtemp(prefix="lm"))
    try:
        deadline = time.monotonic() + 30
        while host.user_ids(holder.pid)[0] != {65534}:      # until setpriv has made it nobody
            assert time.monotonic() < deadline, "setpriv never became nobody"
            time.sleep(0.01)
        res = _move(holder.pid, short_dir / "images")
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        if host.capable(namespaces.CAP_SYS_RESOURCE):      # a full root: on to the target, unreachable
            assert res.returncode == ExitCode.CONNECTION and "CAP_SYS_RESOURCE" not in res.stderr, res.stderr
        else:
            assert res.returncode == ExitCode.PREFLIGHT and len(lines) == 1, res.stderr
            assert f"PID {holder.pid} runs as uid 65534 and gid 65534" in lines[0] and "CAP_SYS_RESOURCE" in lines[0]
            assert not (short_dir / "images").exists()
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(short_dir)
