"""Every CRIU command line livemig runs, and the reading of what CRIU leaves behind
(its stats images and the errors in its logs). Builds argument lists; runs nothing."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import protobuf

# Version 4.2 is the first that dumps TCP sockets on kernels >= 6.16 (criu #2705).
# The oldest CRIU livemig works with, checked on both hosts before anything is touched: 3.x
# (Debian 12's 3.17) cannot dump on recent kernels ("Unexpected rt vDSO area bounds"); the lab
# proves 4.2.1.
MIN_VERSION = (4, 0)

FEATURE_DIRTY_TRACKING = "mem_dirty_track"   # soft-dirty: needed by pre-dump
FEATURE_LAZY_PAGES = "uffd-noncoop"          # userfaultfd for a foreign process: post-copy
FEATURES = (FEATURE_DIRTY_TRACKING, FEATURE_LAZY_PAGES)

_STATS_MAGIC = b"\x40\x59\x10\x55\x06\x33\x09\x57"   # service image magic + STATS
_CORE_MAGIC = struct.pack("<II", 0x54564319, 0x55053847)   # image magic + CORE
_TASK_STOPPED = 3     # task_core_entry.task_state of a task stopped when dumped (compel's)


@dataclass(frozen=True)
class Options:
    """What the user asked of CRIU for this workload."""
    tcp_established: bool = False
    shell_job: bool = False
    file_locks: bool = False
    ext_unix_sk: bool = False
    manage_cgroups: str | None = None

    def flags(self) -> list[str]:
        f = []
        if self.tcp_established:
            f.append("--tcp-established")
        if self.shell_job:
            f.append("--shell-job")
        if self.file_locks:
            f.append("--file-locks")
        if self.ext_unix_sk:
            f.append("--ext-unix-sk")
        if self.manage_cgroups:
            f.append(f"--manage-cgroups={self.manage_cgroups}")
        return f


NO_OPTIONS = Options()     # nothing asked of CRIU (frozen: one instance serves every call)


def check_feature(name: str) -> list[str]:
    return ["criu", "check", "--feature", name]


def version() -> list[str]:
    return ["criu", "--version"]


def parse_version(text: str) -> tuple[int, ...]:
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ValueError(f"cannot read a CRIU version from {text.strip()[:80]!r}")
    return tuple(int(x) for x in m.groups() if x is not None)


def cpuinfo_dump(images: str) -> list[str]:
    return ["criu", "cpuinfo", "dump", "-D", images, "-o", "cpuinfo-dump.log"]


def cpuinfo_check(images: str) -> list[str]:
    return ["criu", "cpuinfo", "check", "-D", images, "-o", "cpuinfo-check.log"]


def pre_dump(pid: int, images: str, ps_fd: int, parent: str | None, opts: Options) -> list[str]:
    argv = ["criu", "pre-dump", "-t", str(pid), "-D", images, "-o", "pre-dump.log",
            "--page-server", "--ps-socket", str(ps_fd), "--track-mem", *opts.flags()]
    if parent:
        argv += ["--prev-images-dir", parent]
    return argv


def dump(pid: int, images: str, *, ps_fd: int, hook: str, parent: str | None, lazy: bool,
         opts: Options, nothing_to_lock: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """The final dump. Pages go to the page server on ps_fd; the action script hook holds
    CRIU at post-dump until the migration is committed (exit 0: CRIU kills the source)
    or rolled back (non-zero: CRIU resumes it).

    Lazy, CRIU serves the pages on ps_fd only after post-dump, so the hook cannot wait for
    the restore there: the source is left stopped instead of killed, and livemig kills it
    once the target has every page, or resumes it on rollback.

    nothing_to_lock: the tree shares CRIU's network namespace and no established TCP
    connection moves. CRIU's nftables lock (Debian's /etc/criu/default.conf picks it)
    still builds its table then, with the tree frozen: 70 ms of downtime measured, for
    a table nothing is added to. Its iptables lock does nothing outside a namespace.

    --skip-in-flight: a client whose connection the kernel took but the workload had not
    accepted when it froze (a service under load always has some) would otherwise fail the
    dump ("In-flight connection"), and with it the move: such a connection is left out, and
    its client, never answered on it, connects again (to the target's copy).

    Connections not asked to move (no --tcp-established) are closed in the copy
    (connections_closed): one a client opened just as the workload froze would otherwise
    fail the dump ("Connected TCP socket"), and with it the move.

    extra: more flags, as the tree's streams to journald named external (units.py)."""
    argv = ["criu", "dump", "-t", str(pid), "-D", images, "-o", "dump.log",
            "--ps-socket", str(ps_fd), "--action-script", hook, "--skip-in-flight",
            *opts.flags(), *connections_closed(opts), *extra]
    if nothing_to_lock and not opts.tcp_established:
        argv += ["--network-lock", "iptables"]
    argv += ["--lazy-pages", "--leave-stopped"] if lazy else ["--page-server"]
    if parent:
        argv += ["--prev-images-dir", parent, "--track-mem"]
    return argv


def connections_closed(opts: Options) -> list[str]:
    """--tcp-close, for a dump and its restore (CRIU refuses to restore images dumped with it
    without it), unless established connections move: the dump then takes the source's
    connections as they are (the source's copy keeps them, and answers on them, should the
    move roll back), and the copy's are shut down, unbound, so they need none of the
    source's addresses. Their clients see the connection end unanswered and connect again;
    an answer the source sent before the freeze was counted in the state that moved."""
    return [] if opts.tcp_established else ["--tcp-close"]


def connections_config(opts: Options) -> str:
    """A container's final dump's connection options, as CRIU's configuration file spells
    them: runc and crun pass no --tcp-close or --skip-in-flight of their own (runc 1.1 has
    neither flag). Their restores close the connections too (RESTORED_CONFIG)."""
    return "skip-in-flight\n" + "".join(f"{flag[2:]}\n" for flag in connections_closed(opts))


def page_server(images: str, ps_fd: int, parent: str | None) -> list[str]:
    argv = ["criu", "page-server", "-D", images, "-o", "page-server.log", "--ps-socket", str(ps_fd)]
    if parent:
        argv += ["--prev-images-dir", parent]
    return argv


# How livemig gives CRIU options a runtime has no flag for (runc's dumps their page socket,
# every runtime's restore --leave-stopped): every `criu swrk` a runtime starts reads the
# configuration file this variable names (after /etc/criu/default.conf, before the
# runtime's request), and keeps what it sets that the request does not.
CONFIG_FILE_ENV = "CRIU_CONFIG_FILE"
LEAVE_STOPPED_CONFIG = "leave-stopped\n"


def restored_config(opts: Options) -> str:
    """A container's restore: stopped until the Resume; its connections closed as its dump
    closed them (CRIU refuses images dumped with --tcp-close restored without it; without such
    sockets in the images, it changes nothing), or, established ones moving, restored; its
    file locks taken again where its dump took them."""
    return (LEAVE_STOPPED_CONFIG + "".join(f"{flag[2:]}\n" for flag in connections_closed(opts))
            + ("file-locks\n" if opts.file_locks else ""))


def configured(path: Path, options: str) -> dict[str, str]:
    """options written to a CRIU configuration file at path (in a directory of livemig's,
    root's alone), and the variable that makes the criu a runtime starts read it: for the
    runtime's environment (proc.environ)."""
    path.write_text(options)
    return {CONFIG_FILE_ENV: str(path)}


def restore(images: str, pidfile: str, *, lazy: bool, opts: Options, extra: tuple[str, ...] = ()) -> list[str]:
    """Restore detached and stopped: the tree runs only once the source is gone (Resume).
    extra: more flags, as the journal's streams given in place of the source's (units.py)."""
    argv = ["criu", "restore", "-D", images, "-o", "restore.log", "--restore-detached",
            "--leave-stopped", "--pidfile", pidfile, *opts.flags(), *connections_closed(opts), *extra]
    if lazy:
        argv.append("--lazy-pages")
    return argv


def trial_dump(pid: int, images: str, *, ps_fd: int, opts: Options, nothing_to_lock: bool = False,
               extra: tuple[str, ...] = ()) -> list[str]:
    """A trial's dump (trial.py): the final dump's flags, but the tree left running (-R) and its
    pages left out: a lazy dump keeps them in memory for a page server, which ps_fd's other end
    closes at once. Frozen while CRIU reads the tree and hands its pages to pipes, not while it
    copies them: about 100 ms per GiB in the lab (bench/trial.py)."""
    argv = ["criu", "dump", "-t", str(pid), "-D", images, "-o", "dump.log", "--leave-running",
            "--lazy-pages", "--ps-socket", str(ps_fd), "--skip-in-flight",
            *opts.flags(), *connections_closed(opts), *extra]
    if nothing_to_lock and not opts.tcp_established:
        argv += ["--network-lock", "iptables"]
    return argv


def trial_restore(images: str, *, cgroup_root: str, opts: Options, extra: tuple[str, ...] = ()) -> list[str]:
    """A trial's restore: detached and stopped, as a move's, its cgroups under cgroup_root (made
    for it alone); run as the first process of a PID namespace of its own (trial.py), so that
    its tasks die with it as it exits."""
    return ["criu", "restore", "-D", images, "-o", "restore.log", "--restore-detached", "--leave-stopped",
            "--cgroup-root", cgroup_root, *opts.flags(), *connections_closed(opts), *extra]


# --- what CRIU leaves behind -----------------------------------------------------------------
@dataclass(frozen=True)
class DumpStats:
    freezing_time: float = 0.0     # seconds to freeze the tree
    frozen_time: float = 0.0       # seconds the tree stayed frozen during the dump
    memdump_time: float = 0.0
    memwrite_time: float = 0.0
    pages_scanned: int = 0
    pages_skipped_parent: int = 0
    pages_written: int = 0
    pages_lazy: int = 0


@dataclass(frozen=True)
class RestoreStats:
    forking_time: float = 0.0
    restore_time: float = 0.0
    pages_restored: int = 0


_DUMP_FIELDS = {1: "freezing_time", 2: "frozen_time", 3: "memdump_time", 4: "memwrite_time",
                5: "pages_scanned", 6: "pages_skipped_parent", 7: "pages_written", 9: "pages_lazy"}
_RESTORE_FIELDS = {3: "forking_time", 4: "restore_time", 5: "pages_restored"}
_MICROSECONDS = {"freezing_time", "frozen_time", "memdump_time", "memwrite_time", "forking_time",
                 "restore_time"}


def parse_stats(data: bytes) -> DumpStats | RestoreStats:
    """Read a stats-dump or stats-restore image (magic, u32 size, protobuf StatsEntry)."""
    if data[:8] != _STATS_MAGIC or len(data) < 12:
        raise ValueError("not a CRIU stats image")
    (size,) = struct.unpack_from("<I", data, 8)
    entry = dict(protobuf.fields(data[12:12 + size]))
    if 1 in entry:
        return _stats(DumpStats, _DUMP_FIELDS, entry[1])
    if 2 in entry:
        return _stats(RestoreStats, _RESTORE_FIELDS, entry[2])
    raise ValueError("a stats image with neither dump nor restore stats")


def read_stats(path: str | Path) -> DumpStats | RestoreStats | None:
    """A stats image, None if CRIU left none or one that cannot be read: the statistics
    only fill in the report, and a move does not fail for want of them."""
    try:
        return parse_stats(Path(path).read_bytes())
    except (FileNotFoundError, ValueError):     # see above: the report goes without them
        return None


def _stats(cls, names: dict[int, str], body: bytes):
    values = {}
    for num, value in protobuf.fields(body):
        name = names.get(num)
        if name and isinstance(value, int):
            values[name] = value / 1e6 if name in _MICROSECONDS else value
    return cls(**values)


def parse_task_state(data: bytes) -> int | None:
    """A core-PID.img's task state (core_entry.tc.task_state); None for a thread's core,
    which has no task core."""
    if data[:8] != _CORE_MAGIC or len(data) < 12:
        raise ValueError("not a CRIU core image")
    (size,) = struct.unpack_from("<I", data, 8)
    tc = dict(protobuf.fields(data[12:12 + size])).get(3)
    if not isinstance(tc, bytes):
        return None
    state = dict(protobuf.fields(tc)).get(1)
    return state if isinstance(state, int) else None


def stopped_tasks(images: Path) -> set[int]:
    """The processes the dump in images found stopped (SIGSTOP, a shell's job control), by
    their PIDs in the dump: the workload's own stops, which a move keeps (CRIU stops every
    task it restores for livemig, and the Resume continues only the others)."""
    return stopped_among((core.name, core.read_bytes()) for core in images.glob("core-*.img"))


def stopped_among(cores: Iterable[tuple[str, bytes]]) -> set[int]:
    """Of core images (file name, contents), the PIDs whose task was stopped."""
    return {int(name[5:-4]) for name, data in cores if parse_task_state(data) == _TASK_STOPPED}


_NOISE = ("RLIMIT_NOFILE",          # every run, where root lacks CAP_SYS_RESOURCE
          "killed by signal",       # CRIU killing its own half-restored tasks: an effect
          "FAILED.")                # "Dumping FAILED." / "Restoring FAILED.": a summary


def log_errors(log_text: str, limit: int = 5) -> list[str]:
    """The error lines of a CRIU log that explain a failure, cause first."""
    lines = [ln.strip() for ln in log_text.splitlines() if "Error" in ln]
    return [ln for ln in lines if not any(n in ln for n in _NOISE)][:limit]


_INVENTORY_MAGIC = 0x58313116


def parse_run_id(data: bytes) -> str | None:
    """inventory.img's dump_criu_run_id (field 13): the run the dump was, which names the
    network lock it took (an nftables table "inet CRIU-<id>"); None if it has none."""
    # (one magic only: the inventory is not among the images with the common one)
    if len(data) < 8 or struct.unpack_from("<I", data, 0)[0] != _INVENTORY_MAGIC:
        raise ValueError("not a CRIU inventory image")
    (size,) = struct.unpack_from("<I", data, 4)
    run_id = dict(protobuf.fields(data[8:8 + size])).get(13)
    return run_id.decode() if isinstance(run_id, bytes) and run_id else None

