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

It fails closed (issue 27): a guard that went first would leave a copy on zeros while
`livemig recover` resumes the source's. So it ignores the signals that ask a process to
end (SIGTERM, SIGHUP: a session scope stopped, an ssh session hung up; SIGINT, SIGQUIT);
anything that ends its listening but "done" (the socket's end, a message it cannot read
whole or does not know, an error) counts as the agent's death; each kill is tried whatever
the others did (one that failed is named in the verdict's detail); and "killed" is written
before it exits, whatever failed. Only SIGKILL ends it before that: a session scope sends
it once its stop timed out (90 s by default; the guard's kills take a fraction of a second,
a runtime's delete up to WAITS.container_delete).

A copy is killed through its cgroup first, where it has one of its own (cgroup v2's
cgroup.kill: every process in it, those that left the copy's process tree and those forked
while it is killed too), then by signals to its tree, then by its runtime's delete (which
may hang, or be missing: bounded, and not needed for the rest). A cgroup is the copy's own
unless it holds the guard or the agent (or is above them: the root's), or a process that
is neither of the copy's trees nor younger than the copy's root: CRIU restores a tree into
the cgroup it had at the source, which may be, here, a session or a service of someone else's.

The socket (SOCK_SEQPACKET: one record a message, a uffd riding along with its own) carries
messages framed by length: a 4-byte length (big-endian), then the message's words joined by
NUL (a path may hold spaces or newlines, never NUL). "pidfile PATH" (a copy's root's PID in
PATH once CRIU or the runtime wrote it), "container RUNTIME ID", "uffd", "done". A record
truncated (longer than SIZES.guard_message, or than the descriptors it may bring), or whose
length is not its own, or not a known message with its words, ends the listening at once.
Both ends are here: Guard is the agent's, guard() the guard process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from .. import proc
from ..errors import LivemigError, Phase
from ..options import SIZES, WAITS
from ..runtimes import control
from ..wire.protocol import Container
from .failures import AgentFailure, failing_as
from .verdicts import Verdicts

# The signals that ask a process to end, ignored first thing, before livemig is even imported.
IGNORED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)

# How the guard starts: this Python, isolated (-I: no PYTHON* variables, no user site, not the
# directory it runs in first on sys.path, where anyone might have left a livemig of their own),
# importing livemig from where the agent's own came from, as root.
_LIVEMIG_PARENT = str(Path(__file__).resolve().parents[2])
COMMAND = (sys.executable, "-I", "-c",
           ("import signal, sys; "
            f"[signal.signal(s, signal.SIG_IGN) for s in {tuple(int(s) for s in IGNORED)}]; "
            "sys.path.insert(0, sys.argv.pop(1)); from livemig.target.guard import main; "
            "sys.exit(main(sys.argv[1:]))"), _LIVEMIG_PARENT)

_LENGTH = struct.Struct("!I")
WORDS = {"pidfile": 2, "container": 3, "uffd": 1, "done": 1}   # each message's words, its name first
MOST_FDS = 16      # descriptors one record may bring (the agent sends one, with "uffd")


def framed(words: tuple[str, ...]) -> bytes:
    body = b"\0".join(os.fsencode(w) for w in words)
    return _LENGTH.pack(len(body)) + body


def unframed(record: bytes) -> list[str] | None:
    """A record's words; None if its length is not the one it says."""
    if len(record) < _LENGTH.size or _LENGTH.unpack_from(record)[0] != len(record) - _LENGTH.size:
        return None
    return [os.fsdecode(w) for w in record[_LENGTH.size:].split(b"\0")]


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
        """Raises an AgentFailure, before anything is sent, for what the guard could not read
        whole (it would take it for a broken agent, and kill the copy)."""
        if self.socket is None:
            return
        record = framed(words)
        if any("\0" in w for w in words) or len(record) > SIZES.guard_message or len(fds) > MOST_FDS:
            raise AgentFailure(Phase.RESTORE, f"cannot tell the copy's guard of {words[0]} {words[1:]!r:.80}: "
                                              f"NUL in it, or longer than {SIZES.guard_message} bytes")
        socket.send_fds(self.socket, [record], list(fds))
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


# --- the guard process ----------------------------------------------------------------------------

def listen(control_sock: socket.socket, told: list[list[str]], held: list[int]) -> str:
    """Take in messages until one ends the listening: "done", else why the agent is taken for dead."""
    while True:
        record, fds, flags, _ = socket.recv_fds(control_sock, SIZES.guard_message, MOST_FDS)
        held += fds
        if not record:
            return "the agent died"      # its end closed: a framed message is never empty
        words = unframed(record)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or words is None or WORDS.get(words[0]) != len(words):
            return "its guard could not read what the agent told it"
        if words == ["done"]:
            return "done"
        if words[0] != "uffd":
            told.append(words)


def root_of(pidfile: str) -> int | None:
    """The PID in pidfile; None if it was never written (nothing of that copy was restored)."""
    try:
        text = Path(pidfile).read_text()
    except FileNotFoundError:
        return None
    root = int(text.strip())
    return root if root > 1 else None


def cgroup_of(pid: int) -> str | None:
    """pid's cgroup in cgroup v2's hierarchy; None if it is gone, or has none."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:     # gone: the docstring's None
        return None
    return next((line[3:] for line in lines if line.startswith("0::")), None)


def cgroup_mount() -> Path | None:
    """Where cgroup v2's whole hierarchy is mounted (/sys/fs/cgroup; a hybrid host's
    /sys/fs/cgroup/unified), None if it is not."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mounted, _, source = line.partition(" - ")
        fields = mounted.split()
        if source.split()[:1] == ["cgroup2"] and fields[3] == "/":
            return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))   # \040: a space
    return None


def _within(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def kill_cgroup(root: int, trees: set[int], spared: list[str]) -> bool:
    """cgroup.kill of root's cgroup, if it is the copy's own (the module's docstring): whether
    it was. spared: the cgroups of the guard and of the agent."""
    path, mount, born = cgroup_of(root), cgroup_mount(), proc.start_time(root)
    if path is None or mount is None or born is None or path.endswith(" (deleted)"):
        return False
    if any(_within(path, mine) for mine in spared):
        return False                # it holds the guard or the agent (the root cgroup holds all)
    d = mount / path.lstrip("/")
    for procs in sorted(d.rglob("cgroup.procs")):           # cgroup.kill ends its cgroups below too
        for pid in (int(x) for x in procs.read_text().split()):
            started = proc.start_time(pid)
            if pid not in trees and started is not None and started < born:
                return False        # another's, there before the copy
    (d / "cgroup.kill").write_text("1")
    return True


def kill_container(runtime: str, cid: str) -> None:
    # The runtime inherits the signals ignored: it too finishes what it began. Its delete,
    # once the copy's processes are killed, clears the runtime's record of it.
    subprocess.run(control(Container(runtime, cid, ""), "delete"), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=WAITS.container_delete, check=False)


def kill_all(told: list[list[str]], spared: list[str]) -> list[str]:
    """Kill every copy told of, each kill tried whatever the others did: what failed, said."""
    failed: list[str] = []

    def attempt(what: str, kill, *args):
        try:
            return kill(*args)
        except Exception as e:  # noqa: BLE001 -- fail closed: one kill that failed stops no other, nor the verdict
            failed.append(f"{what}: {e or type(e).__name__}")
            return None

    # named short: the verdict keeps a few hundred bytes of what failed (verdicts.VERDICT_ROOM)
    found = [attempt(f"pidfile {Path(w[1]).name}", root_of, w[1]) for w in told if w[0] == "pidfile"]
    roots = [r for r in found if r is not None]
    trees = set(attempt("the copy's trees", lambda: {p for r in roots for p in proc.process_tree(r)}) or ())
    for root in roots:      # first: what a signal walk would miss (forked meanwhile, or left its tree)
        attempt(f"the cgroup of {root}", kill_cgroup, root, trees, spared)
    for root in roots:
        attempt(f"the tree of {root}", proc.kill_tree, root)
    for words in told:
        if words[0] == "container":
            attempt(f"container {words[2]}", kill_container, words[1], words[2])
    return failed


def guard(control_fd: int, root: str, migration_id: str) -> int:
    told: list[list[str]] = []
    held: list[int] = []     # the uffds: never read, only kept open until the copy is dead
    agent = cgroup_of(os.getppid())     # read now: once the agent is dead, our parent is another
    try:
        with socket.socket(fileno=control_fd) as control_sock:
            why = listen(control_sock, told, held)
    except Exception as e:  # noqa: BLE001 -- whatever ends the listening, the copy dies below
        why = f"its guard stopped listening ({e or type(e).__name__})"
    if why == "done":
        return 0
    failed = kill_all(told, [c for c in (cgroup_of(os.getpid()), agent) if c is not None])
    detail = ((f"these kills failed: {'; '.join(failed)}; " if failed else "") +    # first: the verdict keeps
              f"{why} before its copy had every page; its guard killed the copy before its missing pages "
              "could read as zeros")
    status = 0
    try:
        verdicts = Verdicts(Path(root))
        verdicts.write(migration_id, verdicts.gone_state(migration_id), detail)
    except LivemigError:    # the copy is dead all the same; the verdict left ("serving") keeps recover waiting
        status = 1
    shutil.rmtree(Path(root) / migration_id, ignore_errors=True)    # the dead agent's images
    return status


def main(argv: list[str]) -> int:
    """argv: the control socket's fd, the image root and the migration's ID (where the verdict goes)."""
    for sig in IGNORED:         # again, for a guard started some other way than COMMAND
        signal.signal(sig, signal.SIG_IGN)
    # One uffd a process of the copy: past the soft limit of descriptors, a uffd would be
    # dropped on its way here (MSG_CTRUNC), which ends the listening and kills the copy.
    with contextlib.suppress(ValueError, OSError):      # no higher limit to take: the soft one stands
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    return guard(int(argv[0]), argv[1], argv[2])
