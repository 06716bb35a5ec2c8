"""Shared memory pre-copied like private memory: the source's half and the target's.

CRIU dumps each shared memory object the tree holds (an anonymous shared mapping, a memfd, a
SysV segment) once, whoever maps it, into images of its own: pagemap-shmem-ID.img, ID the
object's inode number (criu/proc_parse.c, memfd.c), whose entries' addresses are offsets in
the object, and a pages file of their own; its restore reads them back into the one object
every mapper then shares. None of it is lazy (criu/include/vma.h: vma_entry_can_be_lazy takes
private anonymous memory only): all of it went into image files at the freeze, crossed the
link and was read back, the workload frozen all the while (1.5 GiB: 16 s, issue 33).

So pre-copy by hashes reads the objects too while the workload runs (scan): each once however
many map it, through a /proc path to it (host.shared_memory), only where it has data (CRIU
skips holes alike: SEEK_DATA). Its pages go into the target's store (shadow.Store) as a
process's would, under a key of its own in a PID's place (Keys: above every PID the kernel
gives) with offsets for addresses, their digests kept by the same pagehash.Tracker.
- source, the tree frozen and dumped (into_images): each object's pages file loses the pages
  the target holds as they are (the dump's bytes compared by digest), named in NAMED with
  where the copy will hold the object: a process of the tree (its PID in the dump) and the
  name of its mapping or descriptor under /proc/PID, which CRIU's restore keeps;
- target, before the restore (complete): such an object's pagemap loses the named pages, so
  that CRIU's restore leaves holes there and reads only what crossed; once it is restored,
  before anything runs (place), the named pages go from the store straight into the object,
  opened through that process, the store letting them go as they go (the copy's memory is
  then the store's, freed a moment before: on a VM, memory its host backs already). An object
  the source could not locate, or whose writes are sealed, gets them back in its pages file.
What crosses while the workload is frozen is what changed since the last round. CRIU still
writes every object into image files at the dump: its restore takes shared memory from
images alone, and its dump reads every page that holds data.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import host
from ..errors import LivemigError
from ..options import SIZES
from . import pagemap, shadow
from .pagehash import Run, Tracker
from .pagemap import PAGE, PE_PRESENT, Entry

NAMED = "shmem-named.json"      # the pages each object's pages file takes from the store, among the images
_VERSION = 1
_PAGEMAP = re.compile(r"pagemap-shmem-(\d+)\.img")
FIRST_KEY = 1 << 31             # the kernel's PIDs stay below 2^22 (PID_MAX_LIMIT)
_WRITES_SEALED = fcntl.F_SEAL_WRITE | 0x0010     # and F_SEAL_FUTURE_WRITE (which Python's fcntl lacks)


class ShmemError(LivemigError):
    """The shared memory's images cannot be made to name what the target holds, or made
    whole again from it. No phase: the final dump's or the restore's."""


@dataclass
class Keys:
    """The key each shared memory object's pages go by, in a PID's place: one per object
    (by inode number, as CRIU names its images), for the whole move."""
    by_inode: dict[int, int] = field(default_factory=dict)

    def of(self, inode: int) -> int:
        return self.by_inode.setdefault(inode, FIRST_KEY + len(self.by_inode))


@dataclass(frozen=True)
class Named:
    pages: int = 0      # pages the target's store gives back into the images
    sent: int = 0       # pages of shared memory that cross in them


# --- the source: read while the workload runs; the frozen objects' images, named ---------------
def scan(tracker: Tracker, keys: Keys, pids: list[int]) -> Iterator[Run]:
    """Each stretch of the tree's shared memory objects whose content changed since the
    target got it (all of it, the first time); the tracker takes the new digests as they
    are handed out."""
    buf = bytearray(SIZES.hash_read_pages * PAGE)
    for path in host.shared_memory(pids):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:     # unmapped or closed meanwhile: the final dump sees what became of it
            continue
        try:
            key = keys.of(os.fstat(fd).st_ino)
            for start, end in host.extents(fd):
                for at in range(start, end, len(buf)):
                    got = os.preadv(fd, [memoryview(buf)[:min(len(buf), end - at)]], at)
                    view = memoryview(buf)[:got - got % PAGE]
                    for first, n, changed in tracker.changed(key, at, view):
                        if changed:
                            yield Run(key, first, n, bytes(view[first - at:first - at + n * PAGE]))
        finally:
            os.close(fd)


def into_images(images: Path, keys: Keys, tracker: Tracker, tree: dict[int, int]) -> Named:
    """Rewrite the frozen tree's shared memory images in images: the pages the target holds
    as they are leave their pages files, named in NAMED, with where the target's copy will
    hold the object (its PID in the dump, and its mapping's or descriptor's name under
    /proc/PID: CRIU restores both as they were). tree: its processes, PID here -> in the
    dump. Nothing is written when no object was pre-copied."""
    named, pages, sent = [], 0, 0
    located = _located(tree)
    for path in sorted(images.iterdir()):
        m = _PAGEMAP.fullmatch(path.name)
        shmid = int(m.group(1)) if m else -1
        key = keys.by_inode.get(shmid)
        if key is None:     # not shared memory, or never pre-copied: it crosses as CRIU wrote it
            continue
        try:
            pages_id, written = pagemap.read(path.read_bytes())
            runs = _rewrite(images / f"pages-{pages_id}.img", written, key, tracker)
        except (OSError, pagemap.PagemapError) as e:
            raise ShmemError(f"cannot rewrite the images of shared memory {shmid}: {e}") from None
        count = sum(n for _, n in runs)
        pages += count
        sent += sum(e.pages for e in written if e.flags & PE_PRESENT) - count
        if runs:
            vpid, at = located.get(shmid, (0, ""))
            named.append({"shmid": shmid, "key": key, "stored": runs, "pid": vpid, "at": at})
    if named:
        fd = os.open(images / NAMED, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _VERSION, "objects": named}, f)
    return Named(pages, sent)


def _located(tree: dict[int, int]) -> dict[int, tuple[int, str]]:
    """Each shared memory object of the frozen tree by inode: a process of it that holds it
    (its PID in the dump) and the name of the mapping or descriptor under /proc/PID. One
    whose writes are sealed away (a memfd's F_SEAL_WRITE or FUTURE_WRITE) is left out: the
    target could not put its pages back after the restore, so they go in the images."""
    out: dict[int, tuple[int, str]] = {}
    for path in host.shared_memory(list(tree)):
        _, _, pid, at = path.split("/", 3)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:     # gone meanwhile: CRIU's images say what became of it
            continue
        try:
            if not host.seals(fd) & _WRITES_SEALED:
                out.setdefault(os.fstat(fd).st_ino, (tree[int(pid)], at))
        finally:
            os.close(fd)
    return out


def _rewrite(path: Path, written: list[Entry], key: int, tracker: Tracker) -> list[list[int]]:
    """path without the pages the target holds as they are; [offset, pages] of each of those."""
    runs: list[list[int]] = []
    new_path = path.with_name(path.name + ".new")
    buf = bytearray(SIZES.cow_read_pages * PAGE)       # (one buffer: no fresh memory per read)
    with open(path, "rb", buffering=0) as old, \
            open(os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as new:
        for e in written:
            if not e.flags & PE_PRESENT:
                continue
            for at in range(0, e.pages, SIZES.cow_read_pages):
                start, take = e.vaddr + at * PAGE, min(SIZES.cow_read_pages, e.pages - at)
                data = memoryview(buf)[:take * PAGE]
                if old.readinto(data) != len(data):
                    raise ShmemError(f"{path.name} ends before the pages its pagemap names")
                for first, n, changed in tracker.changed(key, start, data, record=False):
                    if changed:
                        new.write(data[first - start:first - start + n * PAGE])
                    elif runs and runs[-1][0] + runs[-1][1] * PAGE == first:
                        runs[-1][1] += n
                    else:
                        runs.append([first, n])
    os.replace(new_path, path)
    return runs


def _exactly(f, n: int) -> bytes:
    data = f.read(n)      # (a short read: the file is shorter than its pagemap says)
    if len(data) != n:
        raise ShmemError(f"{f.name} ends before the pages its pagemap names")
    return data


# --- the target: the named pages back where the restore puts the objects ---------------------
@dataclass(frozen=True)
class Placing:
    """An object's named pages, to place once the restore has made it: from the store (under
    key), runs of (offset, pages), into the object as process pid (its PID in the dump) holds
    it, at /proc/PID/<at>."""
    shmid: int
    key: int
    runs: list[tuple[int, int]]
    pid: int
    at: str


_AT = re.compile(r"map_files/[0-9a-f]+-[0-9a-f]+|fd/\d+")


def complete(images: Path, store: shadow.Store | None) -> list[Placing]:
    """Before the restore, NAMED read: an object the source located loses its named pages from
    its pagemap (CRIU's restore leaves holes there), and place() puts them in before the copy
    runs; one it could not locate gets them back in its pages file, for CRIU to read. What
    place() is to do. Nothing without NAMED."""
    try:
        named = json.loads((images / NAMED).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ShmemError(f"cannot read {NAMED}: {e}") from None
    if not isinstance(named, dict) or named.get("version") != _VERSION:
        raise ShmemError(f"{NAMED} is not of a version this livemig reads")
    out = []
    for one in named.get("objects", []):
        if store is None:
            raise ShmemError(f"{NAMED} names pages held here, and none are")
        try:
            shmid, key, pid, at = int(one["shmid"]), int(one["key"]), int(one["pid"]), str(one["at"])
            runs = sorted((int(a), int(n)) for a, n in one["stored"])
        except (KeyError, TypeError, ValueError):
            raise ShmemError(f"{NAMED} names pages it does not say where they are") from None
        if key < FIRST_KEY or any(a % PAGE or n <= 0 for a, n in runs) or (at and not _AT.fullmatch(at)):
            raise ShmemError(f"{NAMED} names pages no image could hold")
        if at and pid > 0:
            _unname(images, shmid, runs)
            out.append(Placing(shmid, key, runs, pid, at))
        else:
            _complete(images, shmid, key, runs, store)
    (images / NAMED).unlink()
    return out


def place(placings: list[Placing], pids: dict[int, int], store: shadow.Store) -> int:
    """After the restore, before the copy runs: each object's named pages from the store into
    the object the restore made, opened through a process that holds it (pids: PID in the dump
    -> here), the store letting them go as they go. The pages placed."""
    done = 0
    for one in placings:
        here = pids.get(one.pid)
        if here is None:
            raise ShmemError(f"no process of the restored tree is PID {one.pid} of the dump, which holds "
                             f"shared memory {one.shmid}")
        try:
            fd = os.open(f"/proc/{here}/{one.at}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ShmemError(f"cannot open shared memory {one.shmid} in PID {here}: {e.strerror}") from None
        try:
            for a, n in one.runs:
                for first, k, data in store.pieces(one.key, a, n):
                    _write_all(fd, data, first)
                    store.release(one.key, first, k)    # (a slot at a time: its memory is the next slot's)
                    done += k
        except OSError as e:
            raise ShmemError(f"cannot write shared memory {one.shmid}: {e.strerror}") from None
        finally:
            os.close(fd)
    return done


def _write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _split(e: Entry, runs: list[tuple[int, int]], starts: list[int]):
    """(address, pages, named) of each stretch of entry e, in order: named where one of runs
    covers it."""
    at, end = e.vaddr, e.vaddr + e.pages * PAGE
    i = max(bisect.bisect_right(starts, at) - 1, 0)
    while at < end:
        a, n = runs[i] if i < len(runs) else (end, 0)
        if a + n * PAGE <= at:      # a run before this stretch
            i += 1
        elif a > at:
            take = min(a, end) - at
            yield at, take // PAGE, False
            at += take
        else:
            take = min(a + n * PAGE, end) - at
            yield at, take // PAGE, True
            at += take


def _unname(images: Path, shmid: int, runs: list[tuple[int, int]]) -> None:
    """The object's pagemap without the named pages: its pages file holds the others alone."""
    path = images / f"pagemap-shmem-{shmid}.img"
    pages_id, written = pagemap.read(path.read_bytes())
    kept, gone, starts = [], 0, [a for a, _ in runs]
    for e in written:
        if not e.flags & PE_PRESENT:
            kept.append(e)
            continue
        for at, n, named in _split(e, runs, starts):
            if named:
                gone += n
            else:
                kept.append(Entry(at, n, e.flags))
    if gone != sum(n for _, n in runs):
        raise ShmemError(f"{NAMED} names pages of shared memory {shmid} its pagemap does not hold")
    path.write_bytes(pagemap.image(pages_id, kept))


def _complete(images: Path, shmid: int, key: int, runs: list[tuple[int, int]], store: shadow.Store) -> int:
    """One object's pages file whole: each present entry's pages from the store where a run
    names them, else, in order, from the file as it came. The pages taken from the store."""
    pages_id, written = pagemap.read((images / f"pagemap-shmem-{shmid}.img").read_bytes())
    path = images / f"pages-{pages_id}.img"
    new_path = path.with_name(path.name + ".new")
    starts, done = [a for a, _ in runs], 0
    with open(path, "rb") as old, open(os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                                       "wb") as new:
        for e in written:
            if not e.flags & PE_PRESENT:
                continue
            for at, n, named in _split(e, runs, starts):
                if not named:       # pages the source sent
                    new.write(_exactly(old, n * PAGE))
                    continue
                pieces = store.pieces(key, at, n)
                if sum(k for _, k, _ in pieces) != n:
                    raise ShmemError(f"pages of shared memory {shmid} at {at:#x} are not all held here")
                new.writelines(data for _, _, data in pieces)
                store.release(key, at, n)
                done += n
    if done != sum(n for _, n in runs):
        new_path.unlink()
        raise ShmemError(f"{NAMED} names pages of shared memory {shmid} its pagemap does not hold")
    os.replace(new_path, path)
    return done
