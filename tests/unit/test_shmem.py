"""pages/shmem.py: the tree's shared memory read while it runs (a real memfd of this test's,
with a hole, as host.shared_memory finds it), and a frozen object's images (made here as CRIU
writes them: pagemap-shmem-ID.img, offsets for addresses, a pages file of its own) rewritten
on the source to name what the target's store holds, and made whole on the target from it.
What the lab proves end to end (tests/test_shared_memory.py), this checks page by page."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import pytest

from livemig.pages import pagehash, pagemap, shadow, shmem
from livemig.pages.pagemap import PAGE, PE_PRESENT, Entry

N = 48


def _page(k: int, version: int = 0) -> bytes:
    return bytes([k + 1, version]) * (PAGE // 2)


def test_each_object_is_read_once_where_it_has_data_under_a_key_above_every_pid():
    fd = os.memfd_create("livemig-test", 0)
    try:
        os.ftruncate(fd, N * PAGE)
        for k in range(10):      # pages 10.. stay a hole: never read, never sent
            os.pwrite(fd, _page(k), k * PAGE)
        m = mmap.mmap(fd, N * PAGE)     # mapped too: still one object
        tracker, keys = pagehash.Tracker(), shmem.Keys()
        runs = list(shmem.scan(tracker, keys, [os.getpid()]))
        key = keys.of(os.fstat(fd).st_ino)
        assert key >= shmem.FIRST_KEY and len(keys.by_inode) == 1
        mine = [r for r in runs if r.vpid == key]
        assert [(r.vaddr, r.pages) for r in mine] == [(0, 10)]
        assert mine[0].data == b"".join(_page(k) for k in range(10))
        # the next round: only what changed
        m[3 * PAGE:4 * PAGE] = _page(3, 1)
        again = [r for r in shmem.scan(tracker, keys, [os.getpid()]) if r.vpid == key]
        assert [(r.vaddr, r.pages, r.data) for r in again] == [(3 * PAGE, 1, _page(3, 1))]
        m.close()
    finally:
        os.close(fd)


def _images(tmp: Path, shmid: int, entries: list[Entry], pages: dict[int, bytes]) -> bytes:
    """pagemap-shmem-SHMID.img and its pages file, as CRIU's dump writes them."""
    (tmp / f"pagemap-shmem-{shmid}.img").write_bytes(pagemap.image(7, entries))
    data = b"".join(pages[e.vaddr // PAGE + i] for e in entries if e.flags & PE_PRESENT for i in range(e.pages))
    (tmp / "pages-7.img").write_bytes(data)
    return data


def test_the_pages_the_target_holds_leave_the_images_and_come_back_from_its_store(tmp_path):
    shmid = 4242
    tracker, keys, store = pagehash.Tracker(), shmem.Keys(), shadow.Store()
    key = keys.of(shmid)
    held = {k: _page(k) for k in range(N)}
    # pre-copy sent pages 0..39 (and the target stored them); 40.. never went
    for k in range(40):
        assert tracker.changed(key, k * PAGE, held[k]) == [(k * PAGE, 1, True)]
        store.write(key, k * PAGE, held[k])
    # frozen: 5 and 20..21 written since, 40.. new; two extents, a hole between them
    frozen = dict(held)
    for k in (5, 20, 21):
        frozen[k] = _page(k, 9)
    entries = [Entry(0, 30, PE_PRESENT), Entry(32 * PAGE, 16, PE_PRESENT)]
    whole = _images(tmp_path, shmid, entries, frozen)
    (tmp_path / "pagemap-shmem-99.img").write_bytes(pagemap.image(8, [Entry(0, 1, PE_PRESENT)]))  # not ours

    named = shmem.into_images(tmp_path, keys, tracker, {})      # located nowhere: through the images
    assert named == shmem.Named(pages=30 - 3 + 8, sent=3 + 8)
    assert (tmp_path / "pages-7.img").read_bytes() == b"".join(frozen[k] for k in (5, 20, 21, *range(40, 48)))
    said = json.loads((tmp_path / shmem.NAMED).read_text())
    assert said["objects"] == [{"shmid": shmid, "key": key,
                                "stored": [[0, 5], [6 * PAGE, 14], [22 * PAGE, 8], [32 * PAGE, 8]],
                                "pid": 0, "at": ""}]

    # the target: the pages file whole again, the store's pages let go
    assert shmem.complete(tmp_path, store) == []
    assert (tmp_path / "pages-7.img").read_bytes() == whole
    assert not (tmp_path / shmem.NAMED).exists()
    assert store.pages == 40 - 35       # 5, 20, 21 (stale) and 30, 31 (a hole now) still held
    store.close()


def test_nothing_named_nothing_touched_and_a_store_missing_pages_is_said(tmp_path):
    tracker, keys = pagehash.Tracker(), shmem.Keys()
    entries = [Entry(0, 4, PE_PRESENT)]
    whole = _images(tmp_path, 77, entries, {k: _page(k) for k in range(4)})
    assert shmem.into_images(tmp_path, keys, tracker, {}) == shmem.Named()     # never pre-copied
    assert (tmp_path / "pages-7.img").read_bytes() == whole and not (tmp_path / shmem.NAMED).exists()
    assert shmem.complete(tmp_path, None) == []

    key = keys.of(77)
    for k in range(4):
        tracker.changed(key, k * PAGE, _page(k))
    shmem.into_images(tmp_path, keys, tracker, {})
    with pytest.raises(shmem.ShmemError, match="held here, and none are"):
        shmem.complete(tmp_path, None)
    store = shadow.Store()
    store.write(key, 0, _page(0))       # the others never came
    with pytest.raises(shadow.MissingPages):
        shmem.complete(tmp_path, store)
    store.close()


def test_an_object_the_tree_holds_is_left_with_holes_for_the_restore_and_filled_before_it_runs(tmp_path):
    # the source: this test's memfd, held by "PID 77 of the dump"; pre-copy sent all of it
    fd = os.memfd_create("livemig-test", 0)
    fresh = os.memfd_create("livemig-restored", 0)
    try:
        os.ftruncate(fd, N * PAGE)
        for k in range(N):
            os.pwrite(fd, _page(k), k * PAGE)
        shmid = os.fstat(fd).st_ino
        tracker, keys, store = pagehash.Tracker(), shmem.Keys(), shadow.Store()
        for run in shmem.scan(tracker, keys, [os.getpid()]):
            store.write(run.vpid, run.vaddr, run.data)
        os.pwrite(fd, _page(7, 3), 7 * PAGE)        # written since the last round
        frozen = {k: os.pread(fd, PAGE, k * PAGE) for k in range(N)}
        _images(tmp_path, shmid, [Entry(0, N, PE_PRESENT)], frozen)
        named = shmem.into_images(tmp_path, keys, tracker, {os.getpid(): 77})
        assert named == shmem.Named(pages=N - 1, sent=1)
        said = json.loads((tmp_path / shmem.NAMED).read_text())["objects"][0]
        assert said["pid"] == 77 and said["at"] in (f"fd/{fd}",)

        # the target: the pagemap keeps the one page sent; CRIU restores a memfd with a hole
        # elsewhere, at the same descriptor (fresh, put there as the restore would)
        placings = shmem.complete(tmp_path, store)
        assert [(p.shmid, p.pid, p.at) for p in placings] == [(shmid, 77, f"fd/{fd}")]
        _, left = pagemap.read((tmp_path / f"pagemap-shmem-{shmid}.img").read_bytes())
        assert left == [Entry(7 * PAGE, 1, PE_PRESENT)]
        assert (tmp_path / "pages-7.img").read_bytes() == _page(7, 3)
        os.ftruncate(fresh, N * PAGE)
        os.pwrite(fresh, (tmp_path / "pages-7.img").read_bytes(), 7 * PAGE)   # what CRIU reads in
        os.dup2(fresh, fd)
        before = store.pages        # (this test's process may hold other shared memory, scanned too)
        assert shmem.place(placings, {77: os.getpid()}, store) == N - 1
        assert all(os.pread(fresh, PAGE, k * PAGE) == frozen[k] for k in range(N))
        assert store.pages == before - (N - 1)
        with pytest.raises(shmem.ShmemError, match="no process of the restored tree is PID 77"):
            shmem.place(placings, {}, store)
        store.close()
    finally:
        os.close(fd)
        os.close(fresh)
