"""A trial restore before the freeze (issue 35): the workload's images, without its pages,
restored on the target in namespaces of their own, stopped, and thrown away.

The preflight checks what it can name (files, ports, mount sources, PIDs, the CPU); CRIU's
restore trips on more (a directory or FIFO the tree holds open, a watched path, a device,
a socket it cannot bind, the network lock's backend, a cgroup it cannot make), and found
only after the freeze it cost a freeze, a dump and a rollback for nothing. The trial finds
those first. Both halves are here:

- the source takes the images (take): CRIU's dump with the tree left running (-R), lazy, so
  that its pages stay in memory for a page server, which is told to close before it starts
  (without_pages then drops them from the pagemaps). The tree is frozen while CRIU reads it
  and hands its pages to pipes, not while they would be copied: 41 ms at 256 MiB, 102 ms at
  1 GiB, 190 ms at 2 GiB, medians of 3, the workload's own longest stall the same
  (bench/results/2026-12-06T23-18-18-trial.json). Over 50 ms at 2 GiB, a move runs it only
  when asked (--trial); --dry-run always does. Its freeze is the time the dump ran (an upper
  bound), reported on its own, never in the move's downtime. What CRIU cannot dump at all
  fails here too, before the move's freeze would have found it. Its shared memory CRIU writes
  into the images all the same, lazy or not, while the tree is frozen (some 300 MiB a second):
  those pages are dropped before the images cross, and over SIZES.trial_shared_most of them
  a dry run does not take the trial unless asked;
- the target restores them (attempt) as a move would, detached and stopped, with CRIU as
  the first process of a PID namespace of its own (so that its tasks die with it as it
  exits), in a mount namespace of its own, and in a network namespace of its own holding
  the addresses the tree binds (on its loopback): the target's PIDs, ports and addresses
  are none of its business; those the preflight checks against the real namespaces. Its
  cgroups go under a root made for it, removed after, and the files of the Unix sockets
  it bound, which were not there before, are removed too. What it restored never runs.

A runc container is tried under runc (its Workload.trial_dump, and attempt_container): runc's
own lazy checkpoint, left running, and runc's restore under the trial's name, then deleted;
its bundle is on the target by then, as its pre-copy sends it. crun has no lazy dump and
podman's checkpoint cannot leave the pages out: those are not tried (Workload.untried).

Where the target's copy will find what the source alone had (carried.py), the trial gets
the same files, placed before it and taken away after it. Streams to journald (journal.py)
are given in as socket pairs of the trial's own: nothing reaches the target's journal.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import stat
import time
from pathlib import Path

from . import criu, host, proc
from .errors import DumpError, Phase, PreflightError
from .options import WAITS
from .pages import pagemap
from .pages.postcopy import PS_IOV, PS_IOV_CLOSE
from .wire.protocol import TrialRestored

IMAGES = "trial"            # the image directory of the trial, on both hosts


# --- the source ----------------------------------------------------------------------------------
async def take(pid: int, images: Path, opts: criu.Options, *, nothing_to_lock: bool,
               extra: tuple[str, ...] = ()) -> float:
    """The tree's images without its pages, in images (made here, 0700); the seconds CRIU's
    dump ran, which the tree was frozen for at most. DumpError (Phase.TRIAL) if CRIU could not
    dump it: the tree runs on all the same (CRIU resumes it), and a move would fail alike."""
    images.mkdir(mode=0o700)
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(CLOSE)
        argv = criu.trial_dump(pid, str(images), ps_fd=theirs.fileno(), opts=opts,
                               nothing_to_lock=nothing_to_lock, extra=extra)
        t0 = time.monotonic()
        res = await proc.run(argv, check=False, pass_fds=[theirs.fileno()], timeout=WAITS.trial_dump)
        seconds = time.monotonic() - t0
    finally:
        ours.close()
        theirs.close()
    dumped(images, res, "CRIU")
    return seconds


# What a trial's lazy page server finds waiting, its first and only request: close (CRIU
# answers with its status, and the dump ends).
CLOSE = PS_IOV.pack(PS_IOV_CLOSE, 0, 0, 0)


def dumped(images: Path, res: proc.Result, who: str) -> None:
    """A trial's dump (res, by who: CRIU, or a runtime) over: its images without their pages,
    or DumpError with CRIU's first error."""
    if res.returncode != 0:
        errors = _errors(images / "dump.log")
        raise DumpError(f"{who} cannot checkpoint the workload: {_said(errors) or proc.why(res.stderr)}",
                        phase=Phase.TRIAL, detail="\n".join(errors) or None)
    without_pages(images)


def without_pages(images: Path) -> None:
    """Each pagemap of images without its lazy entries, whose pages no pages file holds; and
    each of the shared memory's (pagemap-shmem-ID.img, whose pages CRIU wrote, lazy or not)
    without any, its pages file emptied: they need not cross. The trial's restore maps that
    memory and leaves it empty (it never runs)."""
    for path in images.glob("pagemap-*.img"):
        pages_id, written = pagemap.read(path.read_bytes())
        if pagemap._FILE.fullmatch(path.name):
            path.write_bytes(pagemap.image(pages_id, [e for e in written if not e.flags & pagemap.PE_LAZY]))
        else:
            path.write_bytes(pagemap.image(pages_id, []))
            (images / f"pages-{pages_id}.img").write_bytes(b"")


# --- the target ----------------------------------------------------------------------------------
async def attempt(images: Path, name: str, opts: criu.Options, *, addresses: list[str], sockets: list[str],
                  journal_inodes: list[int]) -> TrialRestored:
    """Restore a tree's images as the trial name (livemig-trial-<migration>), stopped, in
    namespaces of its own, and throw it away; addresses: those the tree binds, put on the
    trial's loopback; sockets: the paths of the Unix sockets it binds (those the trial makes
    are removed); journal_inodes: its streams to journald, given socket pairs in their place."""
    pairs = [socket.socketpair() for _ in journal_inodes]
    try:
        extra = tuple(f"--inherit-fd=fd[{a.fileno()}]:socket:[{inode}]" for (a, _), inode in zip(pairs, journal_inodes))
        argv = ["unshare", "--pid", "--fork", "--mount-proc",
                *criu.trial_restore(str(images), cgroup_root=f"/{name}", opts=opts, extra=extra)]
        return await _tried(images, name, argv, addresses=addresses, sockets=sockets,
                            pass_fds=[a.fileno() for a, _ in pairs])
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def attempt_container(images: Path, name: str, argv: list[str], env: dict[str, str], *,
                            runtime: str, addresses: list[str]) -> TrialRestored:
    """Restore a container's images under its runtime (argv, with env: its configuration file
    leaves every task stopped) as the container name, in a network namespace of its own where
    it shares its host's (its own network namespace, if it has one, is CRIU's to restore), and
    delete it: its runtime ends its tasks and takes its cgroups and state away."""
    try:
        return await _tried(images, name, argv, addresses=addresses, sockets=[], env=env)
    finally:
        # (a container the runtime never made: nothing to delete, said by its exit status alone)
        await proc.run([runtime, "delete", "--force", name], check=False, timeout=WAITS.container_delete)


async def _tried(images: Path, name: str, argv: list[str], *, addresses: list[str], sockets: list[str],
                 pass_fds: list[int] | None = None, env: dict[str, str] | None = None) -> TrialRestored:
    """argv run in the trial's network namespace, and the trial discarded; how it went."""
    before = {path for path in sockets if os.path.lexists(path)}
    t0 = time.monotonic()
    try:
        await _netns(name, addresses)
        # (nsenter, not `ip netns exec`: that mounts a sysfs of the namespace's over /sys, and
        # with it the cgroup hierarchies go, which a runtime's restore looks for)
        res = await proc.run(["nsenter", f"--net=/run/netns/{name}", *argv], check=False, pass_fds=pass_fds or [],
                             env=env, timeout=WAITS.trial_restore)
    finally:
        await discard(name, [path for path in sockets if path not in before])
    seconds = time.monotonic() - t0
    if res.returncode == 0:
        return TrialRestored(True, seconds=seconds)
    errors = _errors(images / "restore.log")
    return TrialRestored(False, _said(errors) or proc.why(res.stderr), "\n".join(errors), seconds)


async def _netns(name: str, addresses: list[str]) -> None:
    await proc.run(["ip", "netns", "add", name], phase=Phase.TRIAL)
    await proc.run(["ip", "-n", name, "link", "set", "lo", "up"], phase=Phase.TRIAL)
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if ip.is_loopback or ip.is_unspecified:
            continue
        await proc.run(["ip", "-n", name, "addr", "add", f"{ip}/{ip.max_prefixlen}", "dev", "lo"], phase=Phase.TRIAL)


async def discard(name: str, made: list[str]) -> None:
    """Nothing of the trial name left: its network namespace (its tasks died with its CRIU),
    its cgroups (under /name, its --cgroup-root), the socket files it made. Safe to call
    whatever got made."""
    await proc.run(["ip", "netns", "delete", name], check=False)     # (none made: nothing to delete)
    for mount in host.cgroup_mounts():
        _remove_tree(mount / name)
    for path in made:
        with contextlib.suppress(OSError):     # gone already, or not a socket: not the trial's
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)


def _remove_tree(top: Path) -> None:
    """A cgroup directory and those under it, deepest first (a cgroup goes by rmdir alone)."""
    if not top.is_dir():
        return
    for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):     # a task still leaving it: left, said by nothing (empty soon)
            os.rmdir(d)


def _errors(log: Path) -> list[str]:
    try:
        return criu.log_errors(log.read_text(errors="replace"))
    except OSError:         # CRIU wrote no log: its stderr says why
        return []


def _said(errors: list[str]) -> str:
    """CRIU's first error line as a sentence: without its PID, level and source line."""
    if not errors:
        return ""
    line = errors[0]
    return line.split("): ", 1)[1] if "): " in line else line


def images_gone(images: Path) -> None:
    """The trial's images go once tried (a workload's memory map and more), its CRIU's logs stay
    with the move's (logs.keep keeps them where the move fails)."""
    if images.is_dir():
        for path in images.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.suffix != ".log":
                path.unlink()


def refused(outcome: TrialRestored, target: str) -> PreflightError:
    """The move's refusal for a trial restore that failed (before anything was frozen for the move)."""
    return PreflightError(f"CRIU could not restore the workload there: {outcome.reason}", phase=Phase.TRIAL,
                          host=target, detail=outcome.detail or None,
                          hint="give the target what CRIU names, or free the workload of it; nothing was frozen "
                               "for the move, and it runs on here")
