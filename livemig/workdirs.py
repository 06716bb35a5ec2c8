"""The private work directories under an image root: one per move and side (the source's
ID-source, the target agent's ID), 0700, and held, by a lock on a file in it, for as long
as the process that owns it lives.

A coordinator or an agent killed outright cannot tidy up after itself, and its directory
may hold memory images. The lock is let go by the kernel when its owner dies, so the next
livemig to run on that host (a move, an agent, `livemig recover`) sweeps such directories
away, but those that a marker says are still needed: `livemig recover`'s record, a
throttle to lift, a restored copy left stopped. Those are recover's to settle. A tree the
owner made elsewhere (an agent's copy of a bundle, recorded in TREE) goes with its
directory, until it is a running container's.

A directory is made exclusively (an existing one is someone else's, never removed), and
its lock is held before it bears the lock's name: a sweep never takes a directory being
made for a dead owner's.

A directory in it may be backed by memory (in_memory: a tmpfs of its own, where what CRIU
writes while the workload is frozen never waits on a disk, nor reaches one); its mount goes
before the directory does (unmount_under), whoever removes it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import shutil
import stat
from pathlib import Path

from .errors import Phase, PreflightError

LOCK = ".owner"
# a tree its owner made outside it (a container's bundle, at the path the bundle had at
# the source): it goes with the directory of an owner that died, unless a marker keeps both
TREE = "TREE.json"
# what keeps a dead owner's directory for `livemig recover` (recovery.RECORD, throttle.FILE,
# orphans.ORPHAN)
MARKERS = ("RECOVER.json", "THROTTLE.json", "ORPHANED.json")


class Held:
    """A work directory's lock, held by its owner until release() (or its death)."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MNT_DETACH = 2, 4, 8, 2


def in_memory(d: Path, size: int) -> bool:
    """d, an empty directory of ours, backed by a tmpfs of its own of size bytes at most
    (private: 0700). False where the kernel refuses (d then stays on the image root's disk)."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    return libc.mount(b"livemig", os.fsencode(d), b"tmpfs", flags, f"mode=0700,size={size}".encode()) == 0


def unmount_under(d: Path) -> None:
    """Every mount at or under d goes (in_memory's), the deepest first: its directory can go then."""
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:     # no /proc: nothing was mounted by us either
        return
    points = [re.sub(r"\\([0-7]{3})", lambda o: chr(int(o.group(1), 8)), p) for p in points]   # (\040: a space)
    here = os.path.realpath(d)
    libc = ctypes.CDLL(None, use_errno=True)
    for point in sorted((p for p in points if p == here or p.startswith(here + "/")), key=len, reverse=True):
        libc.umount2(os.fsencode(point), _MNT_DETACH)     # (refused: the rmtree after it leaves what stays)


def remove(work: Path, images_only: bool = False) -> None:
    """Its owner done with work: all of it goes, or its image directories alone (a marker
    and its record stay)."""
    unmount_under(work)
    if not images_only:
        shutil.rmtree(work, ignore_errors=True)     # what a failure leaves, the next sweep takes
        return
    for d in work.iterdir() if work.is_dir() else ():
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)


def make(root: Path | str, work: Path) -> Held:
    """root (private), and work in it, made by this process and held by it. An existing
    work is someone else's (another agent of the same move on this host): FileExistsError,
    and nothing of it touched."""
    root = Path(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    work.mkdir(mode=0o700)
    try:
        return _hold_new(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)    # ours, made above: the next sweep takes what is left
        raise


def _hold_new(work: Path) -> Held:
    """work's lock, taken before it bears the lock's name: a sweep that finds .owner unheld
    would take the directory for a dead owner's and remove it under its maker."""
    taking = work / f"{LOCK}.new"
    fd = os.open(taking, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(taking, work / LOCK)
    except BaseException:
        os.close(fd)
        raise
    return Held(fd)


def hold(work: Path) -> Held:
    # O_CLOEXEC: CRIU and the other children must not keep a dead owner's lock alive
    fd = os.open(work / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return Held(fd)


def owned(work: Path) -> bool:
    """Does a live owner hold work (its lock taken)? False once its owner is gone, and if it
    is gone itself."""
    try:
        fd = os.open(work / LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:      # no directory, or no lock in it: nobody holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)        # a lock taken here goes with it
    return False


def sweep(root: Path | str) -> list[str]:
    """Remove what owners that died left under root, but for what a marker keeps; the
    names of what went."""
    gone: list[str] = []
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return gone
    for d in entries:
        if not (d / LOCK).is_file() or d.is_symlink():
            continue
        try:
            fd = os.open(d / LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:     # gone meanwhile (its owner tidied up), or not ours: not to sweep now
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue            # its owner lives
            if not _still_named(fd, d / LOCK):
                continue            # another sweep removed it meanwhile: d, if there, is a new owner's
            if any((d / m).exists() for m in MARKERS):
                # the marker and what it names stay; the memory images (its directories) go
                remove(d, images_only=True)     # (what stays goes at the next sweep)
                continue
            unmount_under(d)
            _remove_tree(d)
            shutil.rmtree(d, ignore_errors=True)     # as above: the next sweep finds what is left
            gone.append(d.name)
        finally:
            os.close(fd)
    return gone


def own_tree(work: Path, tree: Path) -> None:
    """tree, made by work's owner, goes with work should its owner die (sweep): left, it
    would stand in the way of every later move of that bundle. Said again each time the
    owner changed it: it is known by its inode and change time (an inode number is soon
    reused)."""
    write_private(work / TREE, {"path": str(tree), "id": _identity(os.lstat(tree))})


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_ctime_ns]


def disown_tree(work: Path) -> None:
    """The tree work's owner made is no more its own (a running container's bundle)."""
    (work / TREE).unlink(missing_ok=True)


def _remove_tree(work: Path) -> None:
    """The tree a dead owner made, if it is still the directory it made, as it left it: one
    made at that path since is someone else's (one it was changing as it died stays too)."""
    try:
        made = json.loads((work / TREE).read_text())
        st = os.lstat(made["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return      # none made, gone since, or an unreadable record: nothing known to be its own
    if stat.S_ISDIR(st.st_mode) and _identity(st) == made["id"]:
        shutil.rmtree(made["path"], ignore_errors=True)     # as the work directory: the rest stays


def _still_named(fd: int, path: Path) -> bool:
    """Whether the file open as fd is the one at path now."""
    try:
        there = os.lstat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def write_private(path: Path, data: dict) -> None:
    """data as JSON into path, readable by root alone, on disk before this returns: what a
    host must still know after livemig is killed outright. Whole or not at all (replace)."""
    replace(path, json.dumps(data).encode())


def write_synced(path: Path, data: bytes, flags: int = os.O_CREAT | os.O_TRUNC) -> None:
    """data into path (0600 if made), on disk before this returns. flags=0: over what an
    existing file holds, in place."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(path: Path, data: bytes) -> None:
    """path holds data (0600), or, if this fails or livemig is killed meanwhile, what it held
    before: never a part of either. Written beside it, synced, renamed over it, and its
    directory synced, so that the rename outlives a crash too."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The longest path livemig binds a UNIX socket at under an image root: the target's lazy
# pages socket (pages/placer.py) in the final images of a move, its ID as session.migration_id
# makes it (20261204-213449-0123abcd); the source's hook.sock (ID-source/hook.sock) is shorter.
LONGEST_SOCKET = "/20261204-213449-0123abcd-source/final/lazy-pages.socket"
SUN_PATH = 108      # sockaddr_un's sun_path, its NUL included (unix(7))


def check_root(root: str, *, sockets: bool = True) -> None:
    """An image root livemig may make private (0700) and sweep, or a PreflightError saying
    why not, before anything is made or changed: an absolute path without symlinks, spaces
    or control characters (the guard reads paths as words), short enough for the sockets
    bound under it (sockets=False: none will be), every part of it root's and writable by
    nobody else (a sticky ancestor aside, once the root exists: nobody else can rename it),
    and, if it exists, holding only what livemig puts there: root's files, and directories
    that are livemig's (private, or a work directory's lock in them, or logs). A directory
    the host uses for something else (/tmp, /home, /usr) is never chmod-ed nor swept."""
    path = Path(root)
    if not path.is_absolute() or os.path.normpath(root) != root or root == "/":
        raise _bad_root(root, "is not an absolute path to a directory of its own (like /var/lib/livemig)")
    if any(c.isspace() or not c.isprintable() for c in root):
        raise _bad_root(root, "holds a space or a control character")
    if sockets and len(os.fsencode(root + LONGEST_SOCKET)) >= SUN_PATH:
        raise _bad_root(root, f"is too long: a UNIX socket under it needs {len(LONGEST_SOCKET)} more bytes, "
                              f"and a socket's path holds {SUN_PATH - 1} at most")
    found = []      # the parts that exist, from / down: the last is the root, or where it will be made
    for part in (Path(*path.parts[:i]) for i in range(1, len(path.parts) + 1)):
        try:
            found.append((part, os.lstat(part)))
        except FileNotFoundError:
            break       # made later, 0700, in a directory only root can write (checked below)
    for part, st in found:
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise _bad_root(root, f"passes through {part}, which is a symlink or not a directory")
        if st.st_uid != 0:
            raise _bad_root(root, f"passes through {part}, which is not root's")
        # sticky (/tmp): others may write in it, but not rename what is root's, below it
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (part == found[-1][0] or not st.st_mode & stat.S_ISVTX):
            raise _bad_root(root, f"passes through {part}, which others may write in")
    exists = found[-1][0] == path
    if exists:
        for entry in path.iterdir():
            if not _livemigs(entry):
                raise _bad_root(root, f"holds {entry.name}, which livemig did not put there: an image root is "
                                      "livemig's alone")


def _livemigs(entry: Path) -> bool:
    """Could livemig have put entry in an image root? Root's files (verdicts, a marker's
    temporary copy), root's private directories (work directories), its logs."""
    st = os.lstat(entry)
    if st.st_uid != 0 or stat.S_ISLNK(st.st_mode):
        return False
    if not stat.S_ISDIR(st.st_mode):
        return stat.S_ISREG(st.st_mode)
    return entry.name == "logs" or stat.S_IMODE(st.st_mode) & 0o077 == 0 or (entry / LOCK).is_file()


def _bad_root(root: str, why: str) -> PreflightError:
    return PreflightError(f"the image root {root} {why}", phase=Phase.PREFLIGHT,
                          hint="point --image-root at a directory of livemig's own: root's, 0700 or 0755")
