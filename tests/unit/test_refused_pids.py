"""`livemig move --pid` refuses, in its preflight and before it reaches the target, the
processes that must never move: init (PID 1), the kernel's threads (kthreadd, PID 2, and its
children), and livemig's own ancestors (the shell, the sshd that runs it): one clear line,
the preflight's exit code, and nothing touched."""

from __future__ import annotations

import os
import subprocess
import sys
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
