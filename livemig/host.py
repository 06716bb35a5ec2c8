"""Facts about the host we run on, gathered the same way on the source and the target."""

from __future__ import annotations

import os
import signal
import platform
import socket
from pathlib import Path

from . import addresses, criu, proc
from .protocol import HostFacts

async def probe(pids: list[int], image_root: str) -> HostFacts:
    ver = await proc.run(criu.version(), check=False)
    try:
        version = list(criu.parse_version(ver.text + ver.stderr.decode(errors="replace")))
    except ValueError:
        version = []
    features = {}
    for name in criu.FEATURES:
        features[name] = (await proc.run(criu.check_feature(name), check=False)).returncode == 0 if version else False
    st = os.statvfs(image_root)
    return HostFacts(
        hostname=socket.gethostname(), arch=platform.machine(), kernel=platform.release(),
        criu_version=version, features=features, free_bytes=st.f_bavail * st.f_frsize,
        mem_available=mem_available(), pids_taken=[pid for pid in pids if os.path.exists(f"/proc/{pid}")],
        addresses=addresses.local())


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def huge_pages_in_use(pids: list[int]) -> bool:
    """Soft-dirty tracks a transparent huge page as one: one write dirties 2 MiB, and
    pre-copy resends nearly everything each round. What counts is whether the
    workload's memory is backed by huge pages (THP 'always', and no MADV_NOHUGEPAGE)."""
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("AnonHugePages:") and int(line.split()[1]) > 0:
                    return True
        except OSError:
            pass
    return False


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
        except OSError:
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
        except ProcessLookupError:
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


def start_time(pid: int) -> int | None:
    """When pid started (clock ticks since boot): with the PID, names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def state(pid: int) -> str | None:
    """pid's state letter in /proc (R, S, T, t, Z...), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def boot_id() -> str:
    """This boot's ID: (PID, start time) pairs name processes of one boot only."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def named(pids: list[Task], boot: str = "") -> list[int]:
    """Of (PID, start time) pairs taken on boot (this one if ""), the PIDs that still name
    the process they named."""
    if boot and boot != boot_id():
        return []
    return [pid for pid, t in pids if start_time(pid) == t]


def kill_tree(root: int) -> None:
    """SIGKILL to root and its descendants, children first."""
    signal_tasks(tasks(list(reversed(process_tree(root)))), signal.SIGKILL)


def resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def has_terminal(pid: int) -> bool:
    """A process with a controlling terminal needs CRIU's --shell-job."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[4]) != 0


def same_netns(pid: int) -> bool:
    """Does pid share this process's network namespace? (False when it cannot be told.)"""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def own_usage() -> tuple[int, float]:
    """This process's peak resident memory (bytes), and the CPU seconds it and the children it
    reaped (CRIU, the runtimes) spent: what a migration cost the source."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_maxrss * 1024, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_ns(pid: int) -> int:
    """CPU time pid's live threads have used, in nanoseconds (0 if it is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def tracer(pid: int) -> int:
    """The PID that ptraces pid (CRIU, while it dumps it), 0 if none or it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
