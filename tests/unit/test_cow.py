"""pages/cow.py on real processes: a parent and its forked child share pages copy-on-write;
the lazy dump's images (made here as CRIU writes them) are rewritten on the source so that
the shared pages are present, the child's named as its parent's, and made whole on the
target. What the lab proves end to end (tests/test_faithful.py), this checks page by page."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from livemig.pages import cow, pagehash, pagemap, shadow
from livemig.pages.pagemap import PAGE, PE_LAZY, PE_PARENT, PE_PRESENT, Entry

N = 64          # pages of the shared mapping
WRITTEN = 5     # of them, the child writes its own copy of this one


@pytest.fixture
def tree():
    """A parent (this test's fork) with N pages, and its child, which shares all but one."""
    if os.geteuid() != 0:
        pytest.fail("frame numbers in /proc/PID/pagemap need root, as livemig does")
    r, w = os.pipe()            # to this test
    kr, kw = os.pipe()          # from the child to the parent
    parent = os.fork()
    if parent == 0:     # the parent: fills its mapping, forks, waits to be killed
        m = mmap.mmap(-1, N * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for k in range(N):
            m[k * PAGE:(k + 1) * PAGE] = bytes([k + 1]) * PAGE
        base = _address(m)
        child = os.fork()
        if child == 0:
            m[WRITTEN * PAGE] = 0xEE        # its own copy of one page
            os.write(kw, b"c")
            signal.pause()
            os._exit(0)
        os.read(kr, 1)
        os.write(w, f"{base} {child}\n".encode())
        signal.pause()
        os._exit(0)
    line = b""
    while not line.endswith(b"\n"):
        line += os.read(r, 64)
    base, child = map(int, line.split())
    yield parent, child, base
    os.kill(child, signal.SIGKILL)
    os.kill(parent, signal.SIGKILL)
    os.waitpid(parent, 0)
    for fd in (r, w, kr, kw):
        os.close(fd)


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _images(d: Path, base: int, vpids: tuple[int, int]) -> None:
    """A lazy dump of the mapping, as CRIU writes it: one present page elsewhere, the rest lazy."""
    for vpid in vpids:
        (d / f"pagemap-{vpid}.img").write_bytes(pagemap.image(vpid, [
            Entry(0x400000, 1, PE_PRESENT), Entry(base, N, PE_LAZY)]))
        (d / f"pages-{vpid}.img").write_bytes(b"\x42" * PAGE)


def _memory(pid: int, vaddr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(vaddr)
        return f.read(n * PAGE)


def test_shared_pages_leave_the_lazy_ranges_and_are_whole_on_the_target(tree, tmp_path):
    parent, child, base = tree
    src, dst = tmp_path / "source", tmp_path / "target"
    src.mkdir()
    _images(src, base, (1, 2))
    kept = cow.into_images(src, {parent: 1, child: 2})
    # the page the child wrote is its own, and its parent's: each stays lazy, in each
    assert kept == cow.Kept(pages=2 * (N - 1), sent=N - 1)
    split = [Entry(0x400000, 1, PE_PRESENT), Entry(base, WRITTEN, PE_PRESENT),
             Entry(base + WRITTEN * PAGE, 1, PE_LAZY), Entry(base + (WRITTEN + 1) * PAGE, N - WRITTEN - 1, PE_PRESENT)]
    assert pagemap.entries((src / "pagemap-1.img").read_bytes()) == split
    assert pagemap.entries((src / "pagemap-2.img").read_bytes()) == split
    assert pagemap.lazy_ranges(src) == [pagemap.Range(1, base + WRITTEN * PAGE, 1),
                                        pagemap.Range(2, base + WRITTEN * PAGE, 1)]
    theirs = _memory(parent, base, N)
    shared = theirs[:WRITTEN * PAGE] + theirs[(WRITTEN + 1) * PAGE:]
    assert (src / "pages-1.img").read_bytes() == b"\x42" * PAGE + shared
    assert (src / "pages-2.img").read_bytes() == b"\x42" * PAGE     # named as its parent's: not sent

    # the target: the child reads its parent's pages as CRIU reads a pre-dump's, through
    # parent/, where its pagemap is its parent's and the pages file the parent's own
    shutil.copytree(src, dst)
    assert cow.complete(dst) == N - 1
    assert not (dst / cow.SHARED).exists()
    assert (dst / "pages-2.img").read_bytes() == b"\x42" * PAGE
    assert pagemap.entries((dst / "pagemap-2.img").read_bytes()) == [
        e if e.flags == PE_LAZY or e.vaddr == 0x400000 else Entry(e.vaddr, e.pages, PE_PARENT) for e in split]
    assert (dst / "parent" / "pagemap-2.img").read_bytes() == (dst / "pagemap-1.img").read_bytes()
    assert os.path.samefile(dst / "parent" / "pages-1.img", dst / "pages-1.img")
    assert sorted(p.name for p in (dst / "parent").iterdir()) == ["pagemap-2.img", "pages-1.img"]
    assert cow.complete(dst) == 0       # done once: a second call finds nothing to do


def test_below_a_pre_dump_s_images_a_child_s_shared_pages_are_copied(tree, tmp_path):
    # hybrid's final dump names its pre-dump as its parent/: the shared pages cannot be
    # named there too, and go into the child's own pages file
    parent, child, base = tree
    _images(tmp_path, base, (1, 2))
    cow.into_images(tmp_path, {parent: 1, child: 2})
    (tmp_path / "parent").mkdir()
    assert cow.complete(tmp_path) == N - 1
    theirs = _memory(parent, base, N)
    assert (tmp_path / "pages-2.img").read_bytes() == b"\x42" * PAGE + theirs[:WRITTEN * PAGE] \
        + theirs[(WRITTEN + 1) * PAGE:]
    assert not any(e.flags & PE_PARENT for e in pagemap.entries((tmp_path / "pagemap-2.img").read_bytes()))
    assert not any((tmp_path / "parent").iterdir())


def test_pages_the_target_holds_as_they_are_do_not_cross_again(tree, tmp_path, monkeypatch):
    parent, child, base = tree
    # read a few at a time: the pages the store holds are named in runs longer than any one read
    monkeypatch.setattr(cow, "SIZES", replace(cow.SIZES, cow_read_pages=16))
    src, dst = tmp_path / "source", tmp_path / "target"
    src.mkdir()
    _images(src, base, (1, 2))
    tracker, store = pagehash.Tracker(), shadow.Store()
    held = bytearray(_memory(parent, base, N))
    held[3 * PAGE] ^= 1             # the target's copy of page 3 is stale: it crosses
    tracker.changed(1, base, held)
    store.write(1, base, held)
    kept = cow.into_images(src, {parent: 1, child: 2}, tracker)
    assert kept.sent == 1
    assert (src / "pages-1.img").read_bytes() == b"\x42" * PAGE + _memory(parent, base + 3 * PAGE, 1)
    shutil.copytree(src, dst)
    cow.complete(dst, store)
    theirs = _memory(parent, base, N)
    assert (dst / "pages-1.img").read_bytes() == b"\x42" * PAGE + theirs[:WRITTEN * PAGE] \
        + theirs[(WRITTEN + 1) * PAGE:]
    assert (dst / "pages-2.img").read_bytes() == b"\x42" * PAGE    # named as its parent's
    assert store.pages == 1         # in the images now, the store lets them go: all but the lazy one


def test_shared_pages_are_found_whatever_the_lazy_entries_of_each_process_cover(tree, tmp_path):
    # the parent's first lazy entry ends before the child's begins, and its next one begins
    # after: the child's page in between is its own (no entry of its parent's holds it)
    parent, child, base = tree
    (tmp_path / "pagemap-1.img").write_bytes(pagemap.image(1, [Entry(base, 2, PE_LAZY),
                                                                Entry(base + 4 * PAGE, N - 4, PE_LAZY)]))
    (tmp_path / "pagemap-2.img").write_bytes(pagemap.image(2, [Entry(base + 3 * PAGE, N - 3, PE_LAZY)]))
    kept = cow.into_images(tmp_path, {parent: 1, child: 2})
    assert kept.pages == 2 * (N - 5)        # all but page 3 (the parent's lacks it) and page 5 (the child wrote it)
    assert pagemap.lazy_ranges(tmp_path)[:3] == [pagemap.Range(1, base, 2), pagemap.Range(1, base + WRITTEN * PAGE, 1),
                                                  pagemap.Range(2, base + 3 * PAGE, 1)]


def test_nothing_shared_writes_nothing(tree, tmp_path):
    parent, _, base = tree
    _images(tmp_path, base, (1,))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert cow.into_images(tmp_path, {parent: 1}) == cow.Kept()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_shared_file_that_does_not_fit_the_images_is_refused(tree, tmp_path):
    parent, child, base = tree
    _images(tmp_path, base, (1, 2))
    cow.into_images(tmp_path, {parent: 1, child: 2})
    (tmp_path / "pagemap-2.img").write_bytes(pagemap.image(2, [Entry(0x400000, 1, PE_PRESENT)]))
    with pytest.raises(cow.CowError, match="does not hold"):
        cow.complete(tmp_path)
    (tmp_path / cow.SHARED).write_text('{"version": 1, "processes": [{"pid": 2}]}')
    with pytest.raises(cow.CowError, match="does not say"):
        cow.complete(tmp_path)


def test_pre_copy_by_hashes_sends_what_a_child_shares_once_as_its_parent_s(tree):
    parent, child, base = tree

    def sent(pid: int, vpid: int, of: int | None) -> list[int]:
        """The mapping's pages a scan of pid sends, by page number."""
        return sorted({(r.vaddr - base) // PAGE + k for r in pagehash.Tracker().scan(pid, vpid, of)
                       for k in range(r.pages) if base <= r.vaddr + k * PAGE < base + N * PAGE})
    assert sent(parent, 1, None) == list(range(N))
    assert sent(child, 2, parent) == [WRITTEN]          # its own copy only
    assert sent(child, 2, None) == list(range(N))       # no parent named: all of it
