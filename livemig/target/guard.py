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

Once the copy has run, killing it would lose what it did (its answers stand, issue 26): so
then the guard first waits, its uffds held and the copy's faults waiting, for a successor
(a fresh agent the coordinator starts, or `livemig recover`), as long as the agent said
("successor SECONDS": the move's reconnect time). A successor connects to ROOT/ID.successor;
the guard hands it every uffd with the PID it is of, the moves of their ranges the agent
told it ("remap"), and the work directory's lock (hand_over), and guards on with the
successor for its agent. Nobody in time, the copy dies as above.

It fails closed (issue 27): a guard that went first would leave a copy on zeros while
`livemig recover` resumes the source's. So it ignores the signals that ask a process to
end (SIGTERM, SIGHUP: a session scope stopped, an ssh session hung up; SIGINT, SIGQUIT);
anything that ends its listening but "done" (the socket's end, a message it cannot read
whole or does not know, an error) counts as the agent's death; each kill is tried whatever
the others did (one that failed is named in the verdict's detail); and "killed" is written
before it exits, whatever failed. Only SIGKILL ends it before that: a session scope sends
it once its stop timed out (90 s by default; the guard's kills take a fraction of a second,
a runtime's delete up to WAITS.container_delete).

How a copy is killed is kills.py's.

The socket (SOCK_SEQPACKET: one record a message, a uffd riding along with its own) carries
messages framed by length: a 4-byte length (big-endian), then the message's words joined by
NUL (a path may hold spaces or newlines, never NUL). "pidfile PATH" (a copy's root's PID in
PATH once CRIU or the runtime wrote it), "container RUNTIME ID", "uffd PID" (the uffd rides
along), "remap INDEX FROM TO LENGTH", "successor SECONDS", "done". A record
truncated (longer than SIZES.guard_message, or than the descriptors it may bring), or whose
length is not its own, or not a known message with its words, ends the listening at once.
Both ends are here: Guard is the agent's, guard() the guard process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import resource
import signal
import socket
import struct
import sys
from pathlib import Path

from .. import proc, workdirs
from ..errors import LivemigError, Phase
from ..host import cgroup_of
from ..options import SIZES
from .failures import AgentFailure, failing_as
from .kills import kill_all
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
# each message's words, its name first
WORDS = {"pidfile": 2, "container": 3, "hush": 2, "uffd": 2, "remap": 5, "successor": 2, "done": 1}
MOST_FDS = 16      # descriptors one record may bring (the agent sends one, with "uffd")


def framed(words: tuple[str, ...]) -> bytes:
    body = b"\0".join(os.fsencode(w) for w in words)
    return _LENGTH.pack(len(body)) + body


def unframed(record: bytes) -> list[str] | None:
    """A record's words; None if its length is not the one it says."""
    if len(record) < _LENGTH.size or _LENGTH.unpack_from(record)[0] != len(record) - _LENGTH.size:
        return None
    return [os.fsdecode(w) for w in record[_LENGTH.size:].split(b"\0")]


@dataclasses.dataclass
class Handover:
    """A dead agent's guard to its successor: the uffds, each with its PID in the dump, in the
    order they came; their ranges' moves (index in uffds, from, to, length); the lock."""
    uffds: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    remaps: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    lock: int | None = None

    def close(self) -> None:
        for _, fd in self.uffds:
            os.close(fd)
        if self.lock is not None:
            os.close(self.lock)


class Guard:
    """The agent's end: the guard process and the socket that tells it what to kill."""

    def __init__(self, process: asyncio.subprocess.Process | None, sock: socket.socket):
        self.process: asyncio.subprocess.Process | None = process     # None: a successor's (not our child)
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
                    [*COMMAND, str(theirs.fileno()), str(verdicts.root), migration_id,
                     "-" if lock is None else str(lock)],
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

    @classmethod
    def succeed(cls, root: Path, migration_id: str) -> tuple[Guard, Handover]:
        """A successor's: the dead agent's guard takes us for its agent, and hands over what
        it holds. Raises AgentFailure if no guard waits for one."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        handed = Handover()
        try:
            conn.connect(str(successor_path(str(root), migration_id)))
            while True:
                record, fds, flags, _ = socket.recv_fds(conn, SIZES.guard_message, MOST_FDS)
                words = unframed(record) if record else None
                if words is None or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise OSError("the guard hung up, or said what it must not, mid-way")
                if words[0] == "uffd" and len(fds) == 1:
                    handed.uffds.append((int(words[1]), fds[0]))
                elif words[0] == "remap":
                    handed.remaps.append(tuple(int(w) for w in words[1:5]))     # type: ignore[arg-type]
                elif words[0] == "lock":
                    handed.lock = fds[0] if fds else None
                elif words[0] == "end":
                    return cls(None, conn), handed     # type: ignore[arg-type]
                else:
                    raise OSError(f"the guard said {words[0]!r}")
        except (OSError, ValueError, IndexError) as e:
            conn.close()
            handed.close()
            raise AgentFailure(Phase.PREFLIGHT, f"no copy here waits for a successor ({e})") from None

    def abandon(self) -> None:
        """A successor's copy that cannot be whole: the guard kills it, as it would had we
        died (the successor knows no more of the copy than the guard does)."""
        with contextlib.suppress(OSError):     # a guard gone already has killed it
            self.tell("successor", "0")       # no other after us: at once
        if self.socket is not None:
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

@dataclasses.dataclass
class Kept:     # what the guard was told and keeps: what to kill, and what a successor takes over
    told: list[list[str]] = dataclasses.field(default_factory=list)    # "pidfile", "container" and "hush" messages
    uffds: list[tuple[str, int]] = dataclasses.field(default_factory=list)   # (PID in the dump, uffd), in order
    remaps: list[list[str]] = dataclasses.field(default_factory=list)  # "remap INDEX FROM TO LENGTH" of uffds[INDEX]
    successor_within: float = 0.0     # once the copy ran, how long its uffds wait for a successor


def listen(control_sock: socket.socket, kept: Kept) -> str:
    """Take in messages until one ends the listening: "done", else why the agent is taken for dead."""
    while True:
        record, fds, flags, _ = socket.recv_fds(control_sock, SIZES.guard_message, MOST_FDS)
        if not record:
            for fd in fds:
                os.close(fd)
            return "the agent died"      # its end closed: a framed message is never empty
        words = unframed(record)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or words is None or WORDS.get(words[0]) != len(words) \
                or (words[0] == "uffd") != bool(fds) or len(fds) > 1:
            kept.uffds += [("0", fd) for fd in fds]       # held all the same, until the copy is dead
            return "its guard could not read what the agent told it"
        if words == ["done"]:
            return "done"
        if words[0] == "uffd":
            kept.uffds.append((words[1], fds[0]))
        elif words[0] == "remap":
            kept.remaps.append(words[1:])
        elif words[0] == "successor":
            kept.successor_within = float(words[1])
        else:
            kept.told.append(words)


def successor_path(root: str, migration_id: str) -> Path:
    """Where a successor of a dead agent finds its guard (a SOCK_SEQPACKET socket, 0600)."""
    return Path(root) / f"{migration_id}.successor"


def hand_over(conn: socket.socket, kept: Kept, lock: int | None) -> None:
    """To a successor: every uffd with its PID, then the moves of their ranges, the work
    directory's lock, and "end"."""
    for pid, fd in kept.uffds:
        socket.send_fds(conn, [framed(("uffd", pid))], [fd])
    for remap in kept.remaps:
        conn.send(framed(("remap", *remap)))
    socket.send_fds(conn, [framed(("lock",))], [] if lock is None else [lock])
    conn.send(framed(("end",)))


def await_successor(root: str, migration_id: str, kept: Kept, lock: int | None) -> socket.socket | None:
    """The agent died once the copy ran: its uffds wait, held here, for a successor (a fresh
    agent its coordinator starts) to take them over, within kept.successor_within; None if
    none came (the copy dies then, as before)."""
    path = successor_path(root, migration_id)
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(1)
        listener.settimeout(kept.successor_within)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return None
        finally:
            path.unlink(missing_ok=True)
    conn.settimeout(None)
    hand_over(conn, kept, lock)
    return conn


def guard(control_fd: int, root: str, migration_id: str, lock: int | None = None) -> int:
    kept = Kept()     # the uffds in it: never read, only kept open until the copy is dead or taken over
    agent = cgroup_of(os.getppid())     # read now: once the agent is dead, our parent is another
    verdicts = Verdicts(Path(root))
    agent_sock: socket.socket | None = socket.socket(fileno=control_fd)
    while agent_sock is not None:
        try:
            with agent_sock:
                why = listen(agent_sock, kept)
        except Exception as e:  # noqa: BLE001 -- whatever ends the listening, the copy dies below
            why = f"its guard stopped listening ({e or type(e).__name__})"
        if why == "done":
            return 0
        agent_sock = None
        try:
            if kept.successor_within > 0 and verdicts.gone_state(migration_id) == "lost":
                # it ran: its answers stand, and a successor may take its pages up where they stopped
                verdicts.write(migration_id, "serving", f"{why}; its guard holds the copy for a successor "
                               f"for {kept.successor_within:g} s", ran=True)
                agent_sock = await_successor(root, migration_id, kept, lock)
        except Exception as e:  # noqa: BLE001 -- fail closed: no successor, and the copy dies below
            why = f"{why}; no successor could take the copy over ({e or type(e).__name__})"
    failed = kill_all(kept.told, [c for c in (cgroup_of(os.getpid()), agent) if c is not None])
    detail = ((f"these kills failed: {'; '.join(failed)}; " if failed else "") +    # first: the verdict keeps
              f"{why} before its copy had every page; its guard killed the copy before its missing pages "
              "could read as zeros")
    status = 0
    try:
        verdicts.write(migration_id, verdicts.gone_state(migration_id), detail)
    except LivemigError:    # the copy is dead all the same; the verdict left ("serving") keeps recover waiting
        status = 1
    workdirs.remove(Path(root) / migration_id)    # the dead agent's images
    return status


def main(argv: list[str]) -> int:
    """argv: the control socket's fd, the image root, the migration's ID (where the verdict goes),
    and the work directory's lock's fd ("-": none)."""
    for sig in IGNORED:         # again, for a guard started some other way than COMMAND
        signal.signal(sig, signal.SIG_IGN)
    # One uffd a process of the copy: past the soft limit of descriptors, a uffd would be
    # dropped on its way here (MSG_CTRUNC), which ends the listening and kills the copy.
    with contextlib.suppress(ValueError, OSError):      # no higher limit to take: the soft one stands
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    return guard(int(argv[0]), argv[1], argv[2], None if argv[3:4] in ([], ["-"]) else int(argv[3]))
