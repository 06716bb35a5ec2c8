"""The target's last line of defence in post-copy: if the agent dies, its copy dies first.

A copy restored with lazy pages reads every page it lacks from CRIU's lazy-pages
daemon; when the daemon goes, the kernel fills those pages with zeros, and the
copy runs on corrupted, silently. The agent kills an incomplete copy before it
lets the daemon go (agent._settle_lazy), but an agent killed outright cannot. So
the agent starts this guard beside the daemon. It holds a duplicate of the
agent's end of the daemon's socket, so that the daemon never sees that end close
while the guard lives, and a pipe from the agent that tells it what was restored.
When the pipe ends without "done" (the agent is gone), it kills what it was told
of, records the verdict "killed" for the source, deletes the agent's images, and
only then exits, which lets the daemon go.

The pipe carries lines: "pidfile PATH" (a tree restored by CRIU, its root's PID
in PATH once written), "container RUNTIME ID", "done".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import host


def kill_pidfile(path: str) -> None:
    try:
        root = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return                   # never restored: nothing of it runs
    host.kill_tree(root)


def kill_container(runtime: str, cid: str) -> None:
    from .runtimes import control
    from .protocol import Container
    subprocess.run(control(Container(runtime, cid, ""), "delete"), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)


def guard(control_fd: int, root: str, migration_id: str) -> int:
    told: list[list[str]] = []
    with os.fdopen(control_fd, "r") as pipe:
        for line in pipe:
            words = line.split()
            if words == ["done"]:
                return 0
            if words:
                told.append(words)
    for words in told:
        if words[0] == "pidfile" and len(words) == 2:
            kill_pidfile(words[1])
        elif words[0] == "container" and len(words) == 3:
            kill_container(words[1], words[2])
    from .agent import Verdicts
    Verdicts(Path(root)).write(migration_id, "killed", "the agent died during post-copy; its guard "
                               "killed the copy before the lazy-pages daemon could go")
    shutil.rmtree(Path(root) / migration_id, ignore_errors=True)    # the dead agent's images
    return 0


if __name__ == "__main__":
    # argv: the control pipe's fd, the daemon socket's duplicate fd (held, never read), the
    # image root and the migration's ID (where the verdict goes)
    sys.exit(guard(int(sys.argv[1]), sys.argv[3], sys.argv[4]))
