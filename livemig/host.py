"""Facts about the host we run on, gathered the same way on the source and the target."""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import re
import resource
import socket
import stat
from pathlib import Path

from . import addresses, criu, proc
from .errors import CommandFailed
from .options import SIZES
from .pages import wptrack
from .wire.protocol import HostFacts


async def probe(pids: list[int], image_root: str) -> HostFacts:
    try:
        ver = await proc.run(criu.version(), check=False)
        version = list(criu.parse_version(ver.text + ver.stderr.decode(errors="replace")))
    except (CommandFailed, ValueError):     # no criu on PATH, or one that says no version: the
        version = []                        # preflight's row "criu here/on target" says CRIU none
    features = {}
    for name in criu.FEATURES:
        features[name] = (await proc.run(criu.check_feature(name), check=False)).returncode == 0 if version else False
    # not CRIU's: livemig's own dirty tracking where there is no soft-dirty (pages/wptrack.py)
    features[WRITE_PROTECT] = bool(version) and not wptrack.available()
    st = os.statvfs(image_root)
    return HostFacts(
        hostname=socket.gethostname(), arch=platform.machine(), kernel=platform.release(),
        criu_version=version, features=features, free_bytes=st.f_bavail * st.f_frsize,
        mem_available=mem_available(), pids_taken=[pid for pid in pids if os.path.exists(f"/proc/{pid}")],
        addresses=addresses.local(), nonlocal_bind=addresses.nonlocal_bind(),
        unprivileged_uffd=_sysctl("vm/unprivileged_userfaultfd") == "1",
        cpus=len(os.sched_getaffinity(0)), load=os.getloadavg()[0])


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:     # a kernel without it: "" (as if unset)
        return ""


def own_namespace(pid: int, kind: str) -> bool:
    """Is pid in a namespace of kind (ipc, user...: /proc/PID/ns/KIND) other than this
    process's? OSError if pid is gone."""
    return os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")


def own_user_ns(pids: list[int]) -> bool:
    """Is the tree in a user namespace of its own (not this host's)? Its root's says."""
    try:
        return bool(pids) and own_namespace(pids[0], "user")
    except OSError:     # its root is gone: the dump will say so; nothing of its own to tell
        return False


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _summed(pids: list[int], file: str, *fields: str) -> dict[str, int]:
    """Each of fields (a "Name:" line in kB) of /proc/PID/file, in bytes, summed over pids."""
    out = dict.fromkeys(fields, 0)
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in out:
                    out[name] += int(value.split()[0]) * 1024
        except OSError:     # it exited meanwhile: none of its memory to count
            pass
    return out


def huge_pages_in_use(pids: list[int]) -> bool:
    """Soft-dirty tracks a transparent huge page as one: one write dirties 2 MiB, and
    pre-copy resends nearly everything each round. What counts is whether the
    workload's memory is backed by huge pages (THP 'always', and no MADV_NOHUGEPAGE)."""
    return _summed(pids, "smaps_rollup", "AnonHugePages")["AnonHugePages"] > 0


def cow_shared_bytes(pids: list[int]) -> int:
    """What the tree's processes share of their anonymous memory (copy-on-write, since a fork),
    as the copies it would take if each had its own: its Anonymous summed less its Pss_Anon
    summed (a page shared by n processes counts n times in one, once in the other)."""
    rollup = _summed(pids, "smaps_rollup", "Anonymous", "Pss_Anon")
    return max(0, rollup["Anonymous"] - rollup["Pss_Anon"])


def shared_memory(pids: list[int]) -> list[str]:
    """The shared memory CRIU's dump writes into image files, whatever the mode: every
    anonymous shared mapping, memfd (mapped, or held open) and SysV segment the tree holds,
    once each however many map it (CRIU dumps it once), as a /proc path to open it by. A
    file on a tmpfs the tree maps is not among them: CRIU finds it by its path on the target."""
    seen: dict[tuple[int, int], str] = {}
    for pid in pids:
        try:
            for start, end, perms, name in proc.mappings(pid):
                if name.startswith(("/memfd:", "/SYSV")) or (perms[3] == "s" and name == "/dev/zero (deleted)"):
                    _note(seen, f"/proc/{pid}/map_files/{start:x}-{end:x}")
        except OSError:     # it exited meanwhile: nothing of it to dump
            continue
        for _, fd, name in proc.fds([pid]):
            if name.startswith("/memfd:"):
                _note(seen, f"/proc/{pid}/fd/{fd}")
    return list(seen.values())


def seals(fd: int) -> int:
    """An open memfd's seals (F_GET_SEALS); 0 for a file that takes none (a SysV segment)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:     # (one that takes no seals)
        return 0


def images_in_memory(much: int, unforeseen: int = 0) -> int:
    """The room a lazy final dump's images get in memory (source/switchover.py), where what
    CRIU writes into them is much bytes (the tree's shared memory, what it shares copy-on-write,
    the memory of its processes that pages/relazy.py's slips names), a quarter more and
    SIZES.images_in_memory_slack beside. 0: too little to matter, or more than half the memory
    available (they go on the image root's disk then). Where half the memory allows, unforeseen
    bytes more: what CRIU would write of a process it meets as relazy.slips says unforeseen (a
    thread that ran as it froze), which would otherwise fill the room and fail the dump."""
    size = much + much // 4 + SIZES.images_in_memory_slack
    half = mem_available() // 2
    if much < SIZES.images_in_memory_least or size > half:
        return 0
    return max(size, min(size + unforeseen, half))


def largest_private_bytes(pids: list[int]) -> int:
    """The most resident anonymous private memory one of pids holds."""
    return max((private_bytes([pid]) for pid in pids), default=0)


def shared_memory_bytes(pids: list[int]) -> int:
    """What CRIU's dump writes of the tree's shared memory: only its pages with data (CRIU
    skips its holes: SEEK_DATA)."""
    return sum(end - start for path in shared_memory(pids) for start, end in data_extents(path))


def _note(seen: dict[tuple[int, int], str], path: str) -> None:
    """path (a shared memory object, by /proc), under its identity, once."""
    try:
        st = os.stat(path)
    except OSError:     # unmapped or closed meanwhile: not the tree's to dump
        return
    seen.setdefault((st.st_dev, st.st_ino), path)


def data_extents(path: str) -> list[tuple[int, int]]:
    """(start, end) offsets of path's data: a tmpfs object's pages that exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:     # unmapped or closed meanwhile: not the tree's to dump
        return []
    try:
        return extents(fd)
    finally:
        os.close(fd)


def extents(fd: int) -> list[tuple[int, int]]:
    """data_extents of an open file."""
    out: list[tuple[int, int]] = []
    size, at = os.fstat(fd).st_size, 0
    while at < size:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # no data past at
                break
            raise
        at = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.append((data, at))
    return out


def private_bytes(pids: list[int]) -> int:
    """The tree's resident anonymous private memory (RssAnon summed: a page shared copy-on-write
    counts once per process)."""
    return _summed(pids, "status", "RssAnon")["RssAnon"]


def resident_bytes(pids: list[int]) -> int:
    return _summed(pids, "status", "VmRSS")["VmRSS"]


# Where a path names no file a restore opens by that path: the kernel's own (CRIU restores
# these its own way), and what a mapping's name may hold besides a path.
WRITE_PROTECT = wptrack.FEATURE
_NOT_FILES = ("/proc/", "/sys/", "/memfd:", "/SYSV", "/anon_hugepage")


def reopened_files(pids: list[int]) -> dict[str, int | None]:
    """The regular files and directories CRIU's restore opens again by their path: each
    process's open regular files, mapped files and working directory, as they are named
    here (those deleted since are not: CRIU carries their contents itself). Each with its
    size here where the restore checks it (files-reg.c, validate_file: every regular file
    but one held open write-only to append, a log's way: should_check_size), else None."""
    out: dict[str, int | None] = {}

    def add(path: str, size: int | None) -> None:
        if _restored(path) and out.get(path) is None:    # (checked once anywhere: checked)
            out[path] = size
    for pid, fd, name in proc.fds(pids):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            flags = _fd_flags(pid, fd)
        except OSError:     # closed meanwhile: not one it holds
            continue
        appending = flags & os.O_ACCMODE == os.O_WRONLY and flags & os.O_APPEND
        if stat.S_ISREG(st.st_mode):
            add(name, None if appending else st.st_size)
    mine = _mount_ns(os.getpid())
    for pid in pids:
        if _mount_ns(pid) != mine:
            continue     # its paths are its own mount namespace's, which CRIU carries (not the target's)
        try:
            add(os.readlink(f"/proc/{pid}/cwd"), None)
            mapped = [name for *_, name in proc.mappings(pid)]
        except OSError:     # it exited meanwhile: nothing of its own to restore
            continue
        # (a device's mapping is not a file to find there)
        for name, size in file_sizes([name for name in mapped if _restored(name)]).items():
            add(name, size)
    return out


def file_sizes(paths: list[str]) -> dict[str, int]:
    """The size of each of paths that is a regular file here."""
    out = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:     # not here (or not ours to see): it has no size to compare
            continue
        if stat.S_ISREG(st.st_mode):
            out[path] = st.st_size
    return out


def _restored(path: str) -> bool:
    """A path CRIU's restore opens again by that name (not one deleted since, nor /proc's)."""
    return path.startswith("/") and not path.endswith(" (deleted)") and not path.startswith(_NOT_FILES)


def _fd_flags(pid: int, fd: int) -> int:
    """The flags fd was opened with (its fdinfo's, octal)."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return 0


def _mount_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:     # gone: "" matches no namespace
        return ""


def locked_files(pids: list[int]) -> list[str]:
    """The files the tree holds a lock on (flock, fcntl: a "lock:" line in the fd's fdinfo)."""
    out = set()
    for pid, fd, names in proc.fds(pids):
        try:
            if names.startswith("/") and "\nlock:" in Path(f"/proc/{pid}/fdinfo/{fd}").read_text():
                out.add(names)
        except OSError:     # closed meanwhile: not a lock it holds
            continue
    return sorted(out)


def locked_here(path: str) -> bool:
    """Does a process of this host (or of another, on storage both share) hold a lock on
    path that a restore taking it again would wait for? A shared lock is asked for and let
    go of at once, without waiting: it is refused only where another holds an exclusive one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:     # not here: CRIU's restore says so, if it needs it
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        for lock in (fcntl.flock, fcntl.lockf):
            try:
                lock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                lock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                return True
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    return True
                raise
        return False
    finally:
        os.close(fd)


def same_netns(pid: int) -> bool:
    """Does pid share this process's network namespace? (False when it cannot be told.)"""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:     # gone, or not ours to read: "cannot be told", as the docstring says
        return False


def own_usage() -> tuple[int, float]:
    """This process's peak resident memory (bytes), and the CPU seconds it and the children it
    reaped (CRIU, the runtimes) spent: what a migration cost the source."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_maxrss * 1024, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_ns(pid: int) -> int:
    """CPU time pid's live threads have used, in nanoseconds (0 if it is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:     # it is gone: the docstring's 0
        return 0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):     # the thread exited meanwhile: it adds nothing now
            pass
    return total


def capable(cap: int) -> bool:
    """Has this process capability cap (include/uapi/linux/capability.h) in its effective set?"""
    return bool(int(_status(os.getpid())["CapEff"], 16) >> cap & 1)


def user_ids(pid: int) -> tuple[set[int], set[int]]:
    """pid's uids and gids (real, effective, saved, filesystem), each set as it holds them."""
    st = _status(pid)
    return set(map(int, st["Uid"].split())), set(map(int, st["Gid"].split()))


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


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
    return next((path for kind, path in _cgroup_mounts() if kind == "cgroup2"), None)


def cgroup_mounts() -> list[Path]:
    """Where each cgroup hierarchy (v1's and v2's) is mounted whole."""
    return [path for _, path in _cgroup_mounts()]


def _cgroup_mounts() -> list[tuple[str, Path]]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mounted, _, source = line.partition(" - ")
        fields, kind = mounted.split(), source.split()[:1]
        if kind in (["cgroup"], ["cgroup2"]) and fields[3] == "/":
            out.append((kind[0], Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))))   # \040: a space
    return out
