"""The target's last line of defence in post-copy: if the agent dies, its copy dies first.

A copy restored with lazy pages waits, on every page it lacks, for whoever holds its
userfaultfd to place it (pages/placer.py). Once the last descriptor of a uffd closes, the
kernel fills those pages with zeros, and the copy runs on corrupted, silently. The agent
kills an incomplete copy before it lets its uffds go (postcopy.PostCopy.settle), but an
agent killed outright cannot. So the agent starts this guard (Guard.start) before the restore, and sends it
a duplicate of every uffd it receives: while the guard lives, a fault in the copy waits
rather than reads zeros. When the guard's socket ends without "done" (the agent is gone),
it kills what it was told of, records the verdict "killed" for the source, deletes the
agent's images, and only then exits, which lets the uffds go.

The socket (SOCK_SEQPACKET) carries one line per message: "pidfile PATH" (a tree
restored by CRIU, its root's PID in PATH once written), "container RUNTIME ID", "uffd"
(the descriptor rides along), "done". Both ends are here: Guard is the agent's, guard() the
guard process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .. import proc
from ..errors import Phase
from ..options import WAITS
from ..runtimes import control
from ..wire.protocol import Container
from .failures import failing_as
from .verdicts import Verdicts

# How the guard starts: this Python, isolated (-I: no PYTHON* variables, no user site, not the
# directory it runs in first on sys.path, where anyone might have left a livemig of their own),
# importing livemig from where the agent's own came from, as root.
_LIVEMIG_PARENT = str(Path(__file__).resolve().parents[2])
COMMAND = (sys.executable, "-I", "-c",
           ("import sys; sys.path.insert(0, sys.argv.pop(1)); from livemig.target.guard import main; "
            "sys.exit(main(sys.argv[1:]))"), _LIVEMIG_PARENT)


class Guard:
    """The agent's end: the guard process and the socket that tells it what to kill."""

    def __init__(self, process: asyncio.subprocess.Process, sock: socket.socket):
        self.process: asyncio.subprocess.Process | None = process
        self.socket: socket.socket | None = sock

    @classmethod
    async def start(cls, verdicts: Verdicts, migration_id: str, lock: int | None = None) -> Guard:
        """lock: the agent's hold on the move's work directory (workdirs.Held's descriptor),
        which the guard holds too, as long as it lives: while either lives, the move is
        someone's (a post-copy "serving" then is true), and its directory is never swept."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Its output goes nowhere: it must outlive us and the SSH session's pipes (and, a
            # session of its own, what kills our process group). What it did, it writes in the verdict.
            with failing_as(Phase.RESTORE, "cannot start the copy's guard"):
                process = await proc.start(
                    [*COMMAND, str(theirs.fileno()), str(verdicts.root), migration_id],
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                    pass_fds=[theirs.fileno(), *([] if lock is None else [lock])])
        except BaseException:
            ours.close()        # no guard came of it: nobody reads it
            raise
        finally:
            theirs.close()
        return cls(process, ours)

    def tell(self, *words: str, fds: tuple[int, ...] = ()) -> None:
        if self.socket is not None:
            socket.send_fds(self.socket, [" ".join(words).encode()], list(fds))
            if words == ("done",):
                self.socket.close()
                self.socket = None

    async def release(self) -> None:
        """What it guarded is settled (whole, killed, or left as an orphan): it may go."""
        with contextlib.suppress(OSError):     # a guard already gone has nothing to let go
            self.tell("done")
        if self.process is not None:
            await self.process.wait()
            self.process = None


def kill_pidfile(path: str) -> None:
    try:
        root = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return                   # never restored: nothing of it runs
    proc.kill_tree(root)


def kill_container(runtime: str, cid: str) -> None:
    subprocess.run(control(Container(runtime, cid, ""), "delete"), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=WAITS.container_delete, check=False)


def guard(control_fd: int, root: str, migration_id: str) -> int:
    told: list[list[str]] = []
    held: list[int] = []     # the uffds: never read, only kept open
    with socket.socket(fileno=control_fd) as control:
        while True:
            msg, fds, _, _ = socket.recv_fds(control, 4096, 16)
            held += fds
            if not msg:
                break
            words = msg.decode(errors="replace").split()
            if words == ["done"]:
                return 0
            if words:
                told.append(words)
    for words in told:
        if words[0] == "pidfile" and len(words) == 2:
            kill_pidfile(words[1])
        elif words[0] == "container" and len(words) == 3:
            kill_container(words[1], words[2])
    Verdicts(Path(root)).write(migration_id, "killed", "the agent died before its copy had every page; its guard "
                               "killed the copy before its missing pages could read as zeros")
    shutil.rmtree(Path(root) / migration_id, ignore_errors=True)    # the dead agent's images
    return 0


def main(argv: list[str]) -> int:
    """argv: the control socket's fd, the image root and the migration's ID (where the verdict goes)."""
    return guard(int(argv[0]), argv[1], argv[2])
