"""The private work directories under an image root: one per move and side (the source's
ID-source, the target agent's ID), 0700, and held, by a lock on a file in it, for as long
as the process that owns it lives.

A coordinator or an agent killed outright cannot tidy up after itself, and its directory
may hold memory images. The lock is let go by the kernel when its owner dies, so the next
livemig to run on that host (a move, an agent, `livemig recover`) sweeps such directories
away, but those that a marker says are still needed: `livemig recover`'s record, a
throttle to lift, a restored copy left stopped. Those are recover's to settle.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

LOCK = ".owner"
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


def make(root: Path | str, work: Path) -> Held:
    """root (private), and work in it, fresh and held by this process."""
    root = Path(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    work.mkdir(mode=0o700)      # a fresh one: an existing directory is someone else's
    return hold(work)


def hold(work: Path) -> Held:
    # O_CLOEXEC: CRIU and the other children must not keep a dead owner's lock alive
    fd = os.open(work / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return Held(fd)


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
            if any((d / m).exists() for m in MARKERS):
                # the marker and what it names stay; the memory images (its directories) go
                for sub in d.iterdir():
                    if sub.is_dir() and not sub.is_symlink():
                        shutil.rmtree(sub, ignore_errors=True)     # what stays goes at the next sweep
                continue
            shutil.rmtree(d, ignore_errors=True)     # as above: the next sweep finds what is left
            gone.append(d.name)
        finally:
            os.close(fd)
    return gone


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
