"""The one way livemig runs a program on the local host: an argument list, never a shell
string; stdout captured or passed on, stderr always kept for the error the user sees."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CommandFailed
from .options import SIZES, WAITS


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def _tail(stderr: bytes, lines: int = 6) -> str:
    text = stderr.decode(errors="replace").strip()
    return "\n".join(text.splitlines()[-lines:])


def why(stderr: bytes) -> str:
    """The line of a command's stderr that says why it failed: its last "Error:" line (Go
    tools such as podman print warnings around it), else its last line."""
    lines = [x.strip() for x in stderr.decode(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if x.lower().startswith(("error:", "error ", "[conmon:e]"))]
    return (errors or lines or ["no error output"])[-1]


def failure(argv: Sequence[str], returncode: int, stderr: bytes, phase: str | None = None) -> CommandFailed:
    tail = _tail(stderr)
    last = why(stderr)
    return CommandFailed(f"{argv[0]} exited {returncode}: {last}", phase=phase, detail=tail)


async def run(argv: Sequence[str], *, input: bytes | None = None, check: bool = True,
              env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = (),
              timeout: float | None = None, phase: str | None = None, leaves_daemon: bool = False,
              started: Callable[[asyncio.subprocess.Process], None] | None = None) -> Result:
    """Run argv to completion. On cancellation or timeout the process is killed, never left behind.

    leaves_daemon: argv starts a daemon that inherits its output (podman's restore leaves
    conmon running); a pipe would stay open as long as the daemon lives, so the output
    goes to unnamed files instead, and the command is done when it exits.
    started: told the process once it runs (for a caller that may have to kill what it
    started, children included)."""
    if leaves_daemon:
        return await _run_leaving_daemon(argv, check=check, env=env, timeout=timeout, phase=phase,
                                         started=started)
    proc = await start(argv, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                       stdout=asyncio.subprocess.PIPE, env=env, pass_fds=pass_fds)
    if started:
        started(proc)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
            rc = await proc.wait()      # it has exited: its status, at once
    except BaseException:
        await kill(proc)
        raise
    return _result(argv, rc, out, err, check, phase)


async def _run_leaving_daemon(argv, *, check, env, timeout, phase, started) -> Result:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = await start(argv, stdout=out, stderr=err, env=env)
        if started:
            started(proc)
        try:
            async with asyncio.timeout(timeout):
                rc = await proc.wait()
        except BaseException:
            await kill(proc)
            raise
        out.seek(0)
        err.seek(0)
        return _result(argv, rc, out.read(), err.read()[-SIZES.stderr_kept:], check, phase)


def _result(argv, returncode: int, out: bytes, err: bytes, check: bool, phase: str | None) -> Result:
    res = Result(tuple(str(a) for a in argv), returncode, out, err)
    if check and res.returncode != 0:
        raise failure(argv, res.returncode, err, phase)
    return res


async def start(argv: Sequence[str], *, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env: Mapping[str, str] | None = None,
                pass_fds: Sequence[int] = ()) -> asyncio.subprocess.Process:
    """Start argv with stderr captured (a pipe, or a file of the caller's): the caller owns
    the process and must reap it (kill(), or its exit). Its environment is env, or environ()'s
    when none is given: never livemig's own whole.

    Every program starts as the leader of a session of its own: what it forks stays in its
    process group, which kill() ends whole, and a terminal's Ctrl-C reaches livemig alone,
    which rolls back in order rather than find its CRIU already dead."""
    argv = [str(a) for a in argv]
    creating = asyncio.ensure_future(asyncio.create_subprocess_exec(
        *argv, stdin=stdin, stdout=stdout, stderr=stderr,
        env=dict(env) if env is not None else environ(), pass_fds=tuple(pass_fds), close_fds=True,
        start_new_session=True))
    try:
        return await asyncio.shield(creating)
    except FileNotFoundError:
        raise CommandFailed(f"{argv[0]}: command not found") from None
    except asyncio.CancelledError:
        # Cancelled (a rollback) while the program was being started: it may run all the
        # same, unknown to anyone. So it is waited for, and ended with what it forked.
        try:
            child = await creating
        except Exception:  # noqa: BLE001 -- whatever stopped its start, it never started: nothing is left
            raise asyncio.CancelledError from None
        await kill(child)
        raise


async def kill(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
    """Kill proc, and whatever it forked, if it still runs, and reap it; safe to call twice,
    and from cleanup code."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, sig)       # its group: what it forked goes with it
        except ProcessLookupError:         # the group is gone already: nothing left to kill
            pass
        except PermissionError:            # not a group of ours (never seen): itself alone
            with contextlib.suppress(ProcessLookupError):     # it has exited meanwhile
                proc.send_signal(sig)
    try:
        await asyncio.shield(_reaped(proc))
    except asyncio.CancelledError:
        await _reaped(proc)
        raise


async def _reaped(proc: asyncio.subprocess.Process) -> int:
    """proc's exit status. asyncio counts a process as ended once its pipes close too: a
    descendant that left its group (setsid) and kept them open would hold the wait for as
    long as it lives. Past WAITS.reap our ends of them are closed. (Seen: CRIU killed as it
    started left a child of its own holding its stderr, and the agent waiting for ever.)"""
    try:
        async with asyncio.timeout(WAITS.reap):
            return await proc.wait()
    except TimeoutError:
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()
        return await proc.wait()


# What a program livemig runs (as root, often) is given of livemig's own environment: what
# finds programs and files, and the language of their messages. The rest (a caller's secrets,
# SSH_AUTH_SOCK, LD_PRELOAD, PYTHONPATH, LIVEMIG_*) stays with livemig. CONTAINERS_*: podman's
# own settings (its storage and registries), which the user set for podman.
KEPT_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "XDG_RUNTIME_DIR")
KEPT_ENV_PREFIXES = ("LC_", "CONTAINERS_")


def environ(**extra: str) -> dict[str, str]:
    """A program's environment: the names KEPT_ENV keeps of ours, and extra."""
    env = {k: v for k, v in os.environ.items() if k in KEPT_ENV or k.startswith(KEPT_ENV_PREFIXES)}
    env.update(extra)
    return env


# --- processes, named for good: (PID, start time), of this boot ---------------------------------
def process_tree(root: int) -> list[int]:
    """root and all its descendants (every thread's children), parents first, as they are
    now: a tree that forks is read again whenever it matters, never kept from before."""
    seen, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:     # it exited meanwhile: no children to read (and it is left out below)
            pass
    return [pid for pid in seen if os.path.exists(f"/proc/{pid}")]


Task = tuple[int, int]
"""One process named for good: (PID, start time). A PID alone may have been reused by
another process since it was read; with its start time it names one process of this boot."""


def tasks(pids: list[int]) -> list[Task]:
    """pids paired with their start times (those already gone are left out)."""
    return [(pid, t) for pid in pids if (t := start_time(pid)) is not None]


def signal_tasks(named: list[Task], sig: int) -> int:
    """sig to each task that is still the process it names; how many got it. Through a pidfd
    where the kernel has them: the start time is checked once the pidfd holds the process,
    so that a PID reused between the check and the signal is never signalled."""
    sent = 0
    for pid, started in named:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:     # it is gone: nothing to signal
            continue
        except OSError:      # no pidfds (ENOSYS): checked, then signalled by PID
            fd = None
        try:
            if start_time(pid) != started:
                continue
            if fd is None:
                os.kill(pid, sig)
            else:
                signal.pidfd_send_signal(fd, sig)
            sent += 1
        except ProcessLookupError:
            pass        # it ended meanwhile: nothing left to signal
        finally:
            if fd is not None:
                os.close(fd)
    return sent


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command's name (state first), None if pid is gone.
    The name, in parentheses, may hold spaces and parentheses itself: it is cut at the last ")"."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:     # gone: the docstring's None
        return None
    return stat.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """When pid started (clock ticks since boot): with the PID, names one process for good."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def state(pid: int) -> str | None:
    """pid's state letter in /proc (R, S, T, t, Z...), None if it is gone."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def parent_of(pid: int) -> int | None:
    """pid's parent's PID, None if pid is gone."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def exe(pid: int) -> str | None:
    """The program pid runs (/proc/PID/exe), None if that cannot be told (gone, a kernel thread)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:     # the docstring's None
        return None


def mappings(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, name: a path, [heap], or "") of each of pid's mappings, from
    /proc/PID/maps."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            span, perms, *rest = line.rstrip("\n").split(None, 5)
            start, end = span.split("-")
            out.append((int(start, 16), int(end, 16), perms, rest[3].strip() if len(rest) > 3 else ""))
    return out


def private_mappings(pid: int) -> list[tuple[int, int]]:
    """(start, end) of each of pid's private mappings."""
    return [(start, end) for start, end, perms, _ in mappings(pid) if perms[3] == "p"]


def boot_id() -> str:
    """This boot's ID: (PID, start time) pairs name processes of one boot only."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:     # no boot ID to read: "" stands for this boot (see named())
        return ""


def named(pids: list[Task], boot: str = "") -> list[int]:
    """Of (PID, start time) pairs taken on boot (this one if ""), the PIDs that still name
    the process they named."""
    if boot and boot != boot_id():
        return []
    return [pid for pid, t in pids if start_time(pid) == t]


def ns_pids(pid: int) -> list[int]:
    """The PIDs a process has, from the host's PID namespace down to its own."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return [pid]


def vpid_of(pid: int, level: int | None = None) -> int:
    """The PID CRIU's images give a process: the one in the PID namespace of the tree's
    root, whose nesting level is level (by default the process's own, innermost one). A
    process in a namespace nested deeper keeps the root's number, not its innermost."""
    pids = ns_pids(pid)
    return pids[-1] if level is None else pids[min(level, len(pids) - 1)]


def in_dump(root: int, pids: list[int]) -> dict[int, int]:
    """pids, of the tree at root (PID here -> PID in the dump, in root's PID namespace)."""
    out: dict[int, int] = {}
    # a process that exits meanwhile is left out: the dump knows what became of it
    with contextlib.suppress(OSError, ValueError):
        level = len(ns_pids(root)) - 1
        for pid in pids:
            with contextlib.suppress(OSError, ValueError):     # likewise, one process
                out[pid] = vpid_of(pid, level)
    return out


def dumped_as(root: int, pids: list[int], in_images: set[int]) -> list[int]:
    """Of pids (the tree at root), those whose PID in the dump (in_dump) is among in_images."""
    return [pid for pid, dumped in in_dump(root, pids).items() if dumped in in_images]


def kill_tree(root: int) -> None:
    """SIGKILL to root and its descendants, children first. Each is stopped first, and the
    tree read again until it holds none not yet stopped: a task forked between one reading
    and the kill would outlive its parent, reparented, and run on. (Seen: a restore's task,
    forked while its CRIU was killed, left running beside the source's copy.) A task that
    does not stop within WAITS.tree_stop (asleep in the kernel, unkillable but by SIGKILL)
    forks nothing meanwhile: it is killed as it is."""
    stopped: dict[int, Task] = {}
    deadline = time.monotonic() + WAITS.tree_stop
    while True:
        new = [t for t in tasks(process_tree(root)) if stopped.get(t[0]) != t]
        if not new:
            break
        signal_tasks(new, signal.SIGSTOP)
        stopped.update((t[0], t) for t in new)
        while time.monotonic() < deadline and any(state(pid) not in _STOPPED for pid, _ in new):
            time.sleep(WAITS.tree_stop_poll)
        if time.monotonic() >= deadline:
            new = [t for t in tasks(process_tree(root)) if stopped.get(t[0]) != t]
            stopped.update((t[0], t) for t in new)
            break
    signal_tasks(list(reversed(stopped.values())), signal.SIGKILL)


# stopped (by a signal, or under a tracer), dead, or gone: forks nothing
_STOPPED = frozenset(("T", "t", "Z", "X", "x", None))


def fds(pids: list[int]) -> Iterator[tuple[int, int, str]]:
    """(PID, fd, what it names: a path, "socket:[inode]"...) of every fd the processes hold
    now; those closed, or whose process exited, meanwhile are left out."""
    for pid in pids:
        try:
            numbers = os.listdir(f"/proc/{pid}/fd")
        except OSError:     # it exited meanwhile: no fds of its own to tell
            continue
        for fd in numbers:
            try:
                yield pid, int(fd), os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:     # closed meanwhile: not one it holds
                continue


def threads(pid: int) -> list[int]:
    """pid's threads (their TIDs, in order), none if it is gone."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:     # gone: the docstring's none
        return []


def tracer(pid: int) -> int:
    """The PID that ptraces pid (CRIU, while it dumps it), 0 if none or it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):     # gone: the docstring's 0
        pass
    return 0
