"""Copy-on-write sharing kept through a lazy restore: the source's half and the target's.

CRIU's restore keeps what a parent and its child share copy-on-write shared: it restores the
parent's private mappings before it forks the child, which inherits them, and then compares
each page of the child's image with the one inherited, writing only those that differ
(criu/mem.c, restore_priv_vma_content). Only pages read from image files take part: a lazy
page is in neither, and is placed into each process apart through its userfaultfd later, a
private copy each. A pre-fork server (PostgreSQL, gunicorn, Apache) moved by post-copy or a
fill came out needing its memory once per process.

So the pages the tree's processes share as it freezes leave the lazy ranges, and go where
CRIU's restore shares them again: into the images, in every process that shares them.
- source, the tree frozen after its lazy dump (into_images): a page a process shares with
  its parent (the same frame at the same address, in mappings the child inherited) is made
  present in both pagemaps. Its bytes cross once: the topmost process that holds it writes
  them into its pages file, read from its memory; or, where pre-copy by hashes left the very
  same bytes on the target, names them (from the target's store). The processes below it name
  them as their parent's. The names are SHARED, a file among the images.
- target, before the restore (complete): each process named there gets its pages file
  whole: the named pages copied from its parent's image (parents first) or its store.
The pushed pages (push.Pusher) and the placer (placer.Placer) take the lazy ranges from the
pagemaps rewritten here, so neither touches a shared page.

The cost: the shared pages cross before the restore (downtime, as into image files) unless
pre-copy by hashes sent them already, and the target writes them once per sharer, as CRIU would.
"""

from __future__ import annotations

import array
import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import proc
from ..errors import LivemigError
from ..options import SIZES
from . import pagemap, shadow
from .pagehash import Tracker
from .pagemap import PAGE, PE_LAZY, PE_PARENT, PE_PRESENT, Entry

SHARED = "cow-shared.json"      # the pages each process takes from elsewhere, among the images
_VERSION = 1
_PRESENT, _PFN = 1 << 63, (1 << 55) - 1      # /proc/PID/pagemap: present, page frame number
LAZY, OWN, STORED, PARENTS = 0, 1, 2, 3      # where a lazy page goes (marks, one byte a page)


class CowError(LivemigError):
    """The images cannot be made to keep the sharing (a process's memory unreadable, a SHARED
    file that does not fit its images). No phase: the final dump's or the restore's."""


@dataclass(frozen=True)
class Kept:
    pages: int = 0      # taken out of the lazy ranges, to stay shared
    sent: int = 0       # of them, those whose bytes cross in the images (the target holds or copies the rest)


@dataclass
class _Process:
    vpid: int                   # its PID in the dump
    pid: int                    # its PID here
    pages_id: int
    written: list[Entry]        # its pagemap's entries
    lazy: list[Entry]           # of them, the lazy ones, by address
    marks: list[bytearray] = field(default_factory=list)    # per lazy entry, a mark per page
    starts: list[int] = field(default_factory=list)         # where each lazy entry begins (bisect)


# --- the source: the frozen tree's shared pages into its images -------------------------------
def into_images(images: Path, processes: dict[int, int], tracker: Tracker | None = None) -> Kept:
    """Rewrite the lazy dump in images so that CRIU's restore shares again what the tree's
    processes (PID here -> PID in the dump) share. tracker: what pre-copy by hashes left on
    the target. Nothing is written when nothing is shared."""
    tree = _read(images, processes)
    parents = _parents(tree)
    related = set(parents) | set(parents.values())
    # each process's frames and mappings read once, however many children it has
    frames = {v: _frames(tree[v]) for v in related}
    mappings = {v: proc.private_mappings(tree[v].pid) for v in related}
    for child, parent in parents.items():
        _mark_shared(tree[child], tree[parent], (frames[child], frames[parent]), (mappings[child], mappings[parent]))
    marked = [t for t in tree.values() if any(m.count(LAZY) < len(m) for m in t.marks)]
    if not marked:
        return Kept()
    names, pages, sent = [], 0, 0
    for t in sorted(marked, key=lambda t: _depth(t.vpid, parents)):     # parents first
        taken = _rewrite(images, t, tracker)
        pages += sum(len(m) - m.count(LAZY) for m in t.marks)
        sent += taken.sent
        names.append({"pid": t.vpid, "parent": parents.get(t.vpid, 0),
                      "parents": _runs(t, PARENTS), "stored": _runs(t, STORED)})
    fd = os.open(images / SHARED, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": _VERSION, "processes": names}, f)
    return Kept(pages, sent)


def _read(images: Path, processes: dict[int, int]) -> dict[int, _Process]:
    tree = {}
    for pid, vpid in processes.items():
        path = images / f"pagemap-{vpid}.img"
        if not path.exists():       # a zombie: no memory
            continue
        pages_id, written = pagemap.read(path.read_bytes())
        lazy = [e for e in written if e.flags & PE_LAZY and e.pages]
        tree[vpid] = _Process(vpid, pid, pages_id, written, lazy, [bytearray(e.pages) for e in lazy],
                              [e.vaddr for e in lazy])
    return tree


def _parents(tree: dict[int, _Process]) -> dict[int, int]:
    """Child -> parent (PIDs in the dump), for the processes of the tree that run one
    program: CRIU looks for inherited mappings only there (prepare_cow_vmas)."""
    by_pid = {t.pid: t.vpid for t in tree.values()}
    out = {}
    for t in tree.values():
        parent = by_pid.get(proc.parent_of(t.pid) or 0)
        if parent is not None and proc.exe(t.pid) == proc.exe(tree[parent].pid) is not None:
            out[t.vpid] = parent
    return out


def _depth(vpid: int, parents: dict[int, int]) -> int:
    depth = 0
    while vpid in parents:
        vpid, depth = parents[vpid], depth + 1
    return depth


def _mark_shared(child: _Process, parent: _Process, frames: tuple[list[array.array], list[array.array]],
                 mappings: tuple[list[tuple[int, int]], list[tuple[int, int]]]) -> None:
    """Each lazy page child shares with parent: PARENTS in the child's marks, and at least OWN
    in the parent's (PARENTS there too, when it shares it with its own parent). frames: each
    one's (_frames); mappings: each one's private mappings."""
    kids, parents = frames
    kid_vmas, parent_vmas = mappings[0], set(mappings[1])
    starts = parent.starts
    for ci, e in enumerate(child.lazy):
        for start, end in _inherited(e, kid_vmas, parent_vmas):
            i = max(bisect.bisect_right(starts, start) - 1, 0)
            while i < len(parent.lazy) and parent.lazy[i].vaddr < end:
                p = parent.lazy[i]
                a, b = max(start, p.vaddr), min(end, p.vaddr + p.pages * PAGE)
                if a < b:       # (the entry found first may end before start)
                    ka, ja, n = (a - e.vaddr) // PAGE, (a - p.vaddr) // PAGE, (b - a) // PAGE
                    _mark_pair(kids[ci][ka:ka + n], parents[i][ja:ja + n], child.marks[ci], ka, parent.marks[i], ja)
                i += 1


def _mark_pair(kid: array.array, parent: array.array, kid_marks: bytearray, ka: int,
               parent_marks: bytearray, ja: int) -> None:
    """Marks the pages of one stretch the child and its parent share: the same frame, there."""
    n = len(kid)
    if kid == parent and n and min(kid) >= _PRESENT and min(w & _PFN for w in kid):
        kid_marks[ka:ka + n] = bytes([PARENTS]) * n      # the common case: all of it shared
        parent_marks[ja:ja + n] = parent_marks[ja:ja + n].replace(bytes([LAZY]), bytes([OWN]))
        return
    for k in range(n):
        frame = kid[k]
        if frame & _PRESENT and parent[k] & _PRESENT and frame & _PFN and frame & _PFN == parent[k] & _PFN:
            kid_marks[ka + k] = PARENTS
            if parent_marks[ja + k] == LAZY:
                parent_marks[ja + k] = OWN


def _frames(t: _Process) -> list[array.array]:
    """/proc/PID/pagemap's word for each page of each lazy entry (frame numbers: root only)."""
    out = []
    try:
        fd = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise CowError(f"cannot read the memory map of PID {t.pid}: {err.strerror}") from None
    try:
        for e in t.lazy:
            words = array.array("Q", os.pread(fd, e.pages * 8, e.vaddr // PAGE * 8))
            words.extend([0] * (e.pages - len(words)))      # past the mappings' end: nothing there
            out.append(words)
    finally:
        os.close(fd)
    return out


def _inherited(e: Entry, kid_vmas: list[tuple[int, int]], parent_vmas: set[tuple[int, int]]):
    """The parts of lazy entry e in mappings the child may have inherited: CRIU shares only
    what lies in a mapping with the very bounds of its parent's (check_cow_vmas)."""
    end = e.vaddr + e.pages * PAGE
    for start, stop in kid_vmas:
        if stop > e.vaddr and start < end and (start, stop) in parent_vmas:
            yield max(start, e.vaddr), min(stop, end)


def _rewrite(images: Path, t: _Process, tracker: Tracker | None) -> Kept:
    """t's pagemap with its marked pages present, and its pages file with the bytes of those
    it owns (but those the target's store holds as they are, marked STORED)."""
    old_path = images / f"pages-{t.pages_id}.img"
    new_path = images / f"pages-{t.pages_id}.img.new"
    old_path.touch(0o600)       # (CRIU writes none for a process with nothing present)
    written, sent = [], 0
    lazy_at = {e.vaddr: i for i, e in enumerate(t.lazy)}
    try:
        mem = os.open(f"/proc/{t.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise CowError(f"cannot read the memory of PID {t.pid}: {err.strerror}") from None
    try:
        with open(old_path, "rb") as old, open(os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                                               "wb") as new:
            for e in t.written:
                i = lazy_at.get(e.vaddr) if e.flags & PE_LAZY else None
                if i is None or e is not t.lazy[i]:
                    written.append(e)
                    if e.flags & PE_PRESENT:
                        new.write(_exactly(old, e.pages * PAGE))
                    continue
                if e.flags & PE_PRESENT:    # a lazy entry whose bytes are here too: never written by CRIU 4
                    old.seek(e.pages * PAGE, os.SEEK_CUR)
                for first, n, mark in _runs_of(t.marks[i]):
                    vaddr = e.vaddr + first * PAGE
                    if mark == LAZY:
                        written.append(Entry(vaddr, n, e.flags & ~PE_PRESENT))
                    elif mark == PARENTS:
                        written.append(Entry(vaddr, n, PE_PRESENT))
                    else:
                        sent += _own(new, written, mem, t, vaddr, n, tracker)
    except OSError as err:
        new_path.unlink(missing_ok=True)
        raise CowError(f"cannot rewrite the images of PID {t.vpid}: {err}") from None
    finally:
        os.close(mem)
    os.replace(new_path, old_path)
    (images / f"pagemap-{t.vpid}.img").write_bytes(pagemap.image(t.pages_id, written))
    return Kept(sent=sent)


def _own(new, written: list[Entry], mem: int, t: _Process, vaddr: int, n: int, tracker: Tracker | None) -> int:
    """Pages t owns from vaddr: into its pages file, but for those the target holds as they
    are (marked STORED then); the pages written."""
    sent = 0
    for at in range(0, n, SIZES.cow_read_pages):
        take = min(SIZES.cow_read_pages, n - at)
        start = vaddr + at * PAGE
        data = os.pread(mem, take * PAGE, start)
        if len(data) != take * PAGE:
            raise CowError(f"PID {t.pid}'s memory at {start:#x} could not be read whole")
        runs = tracker.changed(t.vpid, start, data, record=False) if tracker else [(start, take, True)]
        for first, k, changed in runs:
            written.append(Entry(first, k, PE_PRESENT))
            if changed:
                new.write(memoryview(data)[first - start:first - start + k * PAGE])
                sent += k
            else:
                _mark(t, first, k, STORED)
    return sent


def _mark(t: _Process, vaddr: int, n: int, mark: int) -> None:
    """n of t's lazy pages from vaddr (in one lazy entry) marked mark."""
    i = bisect.bisect_right(t.starts, vaddr) - 1
    k = (vaddr - t.lazy[i].vaddr) // PAGE
    t.marks[i][k:k + n] = bytes([mark]) * n


def _runs(t: _Process, mark: int) -> list[list[int]]:
    """[address, pages] of each run of t's pages marked mark."""
    return [[e.vaddr + first * PAGE, n] for e, marks in zip(t.lazy, t.marks)
            for first, n, m in _runs_of(marks) if m == mark]


def _runs_of(marks: bytearray):
    """(first page, pages, mark) of each run of equal marks."""
    first = 0
    for k in range(1, len(marks) + 1):
        if k == len(marks) or marks[k] != marks[first]:
            yield first, k - first, marks[first]
            first = k


def _exactly(f, n: int) -> bytes:
    data = f.read(n)      # (a short read: the file is shorter than its pagemap says)
    if len(data) != n:
        raise CowError(f"{f.name} ends before the pages its pagemap names")
    return data


# --- the target: each process's pages file made whole ----------------------------------------
def complete(images: Path, store: shadow.Store | None = None) -> int:
    """Before the restore: the pages each process takes from its parent's image or from
    store (SHARED) written into its pages file; the pages written. Nothing to do without SHARED."""
    try:
        named = json.loads((images / SHARED).read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as e:
        raise CowError(f"cannot read {SHARED}: {e}") from None
    if not isinstance(named, dict) or named.get("version") != _VERSION:
        raise CowError(f"{SHARED} is not of a version this livemig reads")
    # A child reads its parent's pages through a "parent" directory, as CRIU reads a pre-dump's
    # (pagemap.read_through_parents): no copy. Where a pre-dump's is there already (hybrid),
    # they are copied into its pages file instead.
    linked = not (images / pagemap.PARENT).exists()
    done, parents = 0, {}
    for one in named.get("processes", []):
        checked = _checked(one)
        done += _complete(images, checked, store, linked)
        if checked[2].runs:
            parents[checked[0]] = checked[1]
    if linked and parents:
        pagemap.read_through_parents(images, parents)
    (images / SHARED).unlink()
    return done


def _checked(one) -> tuple[int, int, _Runs, _Runs]:
    try:
        runs = [[(int(a), int(n)) for a, n in one[key]] for key in ("parents", "stored")]
        pid, parent = int(one["pid"]), int(one["parent"])
    except (KeyError, TypeError, ValueError):
        raise CowError(f"{SHARED} names pages it does not say where they are") from None
    if any(a % PAGE or n <= 0 for a, n in runs[0] + runs[1]) or (runs[0] and not parent):
        raise CowError(f"{SHARED} names pages no image could hold")
    return pid, parent, _Runs(runs[0]), _Runs(runs[1])


class _Runs:
    """Runs of a process's pages named in SHARED: each present entry of its pagemap lies in
    one, or in none."""

    def __init__(self, runs: list[tuple[int, int]]):
        self.runs = sorted(runs)
        self.starts = [a for a, _ in self.runs]
        self.left = sum(n for _, n in self.runs)      # pages named and not yet found in the pagemap

    def take(self, e: Entry) -> bool:
        i = bisect.bisect_right(self.starts, e.vaddr) - 1
        if i < 0 or e.vaddr + e.pages * PAGE > self.runs[i][0] + self.runs[i][1] * PAGE:
            return False
        self.left -= e.pages
        return True


def _complete(images: Path, one: tuple[int, int, _Runs, _Runs], store: shadow.Store | None, linked: bool) -> int:
    """One process's pages file whole; linked: the pages it takes from its parent are named
    in its pagemap as a pre-dump's (PE_PARENT), not copied. The pages it takes."""
    pid, parent, from_parent, stored = one
    if stored.left and store is None:
        raise CowError(f"{SHARED} names pages of PID {pid} held here, and none are")
    pages_id, written = pagemap.read((images / f"pagemap-{pid}.img").read_bytes())
    theirs = None if linked or not from_parent.left else pagemap.Index(images, parent)
    path = images / f"pages-{pages_id}.img"
    new_path = images / f"pages-{pages_id}.img.new"
    done, kept = 0, []
    with open(path, "rb") as old, open(os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                                       "wb") as new:
        for e in written:
            kept.append(e)
            if not e.flags & PE_PRESENT:
                continue
            if from_parent.take(e):
                if theirs is None:
                    kept[-1] = Entry(e.vaddr, e.pages, PE_PARENT)
                else:
                    new.flush()
                    theirs.copy_into(new.fileno(), e.vaddr, e.pages)
                    new.seek(0, os.SEEK_END)
            elif stored.take(e):
                assert store is not None
                pieces = store.pieces(pid, e.vaddr, e.pages)
                if sum(n for _, n, _ in pieces) != e.pages:     # (some placed already: none is, yet)
                    raise CowError(f"pages of PID {pid} at {e.vaddr:#x} are not all held here")
                new.writelines(data for _, _, data in pieces)
            else:
                new.write(_exactly(old, e.pages * PAGE))
                continue
            done += e.pages
    if from_parent.left or stored.left:
        new_path.unlink()
        raise CowError(f"{SHARED} names pages of PID {pid} its pagemap does not hold")
    os.replace(new_path, path)
    if kept != written:
        (images / f"pagemap-{pid}.img").write_bytes(pagemap.image(pages_id, kept))
    if store is not None:       # what pre-copy sent of its present pages: in the image now, never placed
        for e in written:
            if e.flags & PE_PRESENT:
                store.release(pid, e.vaddr, e.pages)
    return done
