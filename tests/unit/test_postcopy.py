"""The source's side of post-copy (push.Pusher) against a stand-in for CRIU's page
server, and the reading of CRIU's pagemap images. The target's side, with real uffds, is
in test_placer.py; the lab's post-copy tests run the real CRIU."""

import asyncio
import ctypes
import dataclasses
import mmap
import os
import random
import struct
import types

import pytest

from livemig.options import SIZES
from livemig.pages import compare, frames, pagehash, pagemap, postcopy, push
from livemig.pages.pagemap import PAGE, Range
from livemig.wire import streams

from .pagefakes import fake_criu as _fake_criu
from .pagefakes import pair

RANGES = [Range(1, 0x10000, 600), Range(7, 0x500000, 40)]


def fake_criu(reader, writer, log):
    return _fake_criu(reader, writer, RANGES, log)


async def test_while_the_target_restores_only_the_smallest_ranges_go_ahead():
    (criu_end, pusher_end), (link_src, _) = await pair(), await pair()
    log: list = []
    pusher = push.Pusher(RANGES, prefetch_pages=40)
    async with asyncio.timeout(10):
        criu = asyncio.create_task(fake_criu(*criu_end, log))
        pushing = asyncio.create_task(pusher.run(pusher_end, link_src))
        while pusher.stats.pages_pushed < 40:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        # the 40-page range of pid 7 went, and nothing of the 600-page one
        assert [e[1] for e in log] == [7] and pusher.stats.pages_pushed == 40
        pushing.cancel()
        criu.cancel()


async def test_a_silent_target_fails_the_source_side_only_while_pages_await_acknowledgement():
    (criu_end, pusher_end), (link_src, link_dst) = await pair(), await pair()
    pusher = push.Pusher(RANGES, prefetch_pages=0, stall_seconds=0.5)
    async with asyncio.timeout(10):
        criu = asyncio.create_task(fake_criu(*criu_end, []))
        pushing = asyncio.create_task(pusher.run(pusher_end, link_src))
        await asyncio.sleep(1.2)
        assert not pushing.done()        # not running yet: nothing pushed, nothing awaited
        pusher.start_pushing()           # the window fills, and no acknowledgement comes back
        with pytest.raises(postcopy.PageStreamError, match="acknowledged nothing for 0 s"):
            await pushing
        assert pusher.stats.pages_pushed > 0
        criu.cancel()
    link_dst[1].close()


def test_runs_without_skips_pages_already_sent():
    v = 0x1000
    assert postcopy.runs_without(v, 5, set(), 512) == [(v, 5)]
    assert postcopy.runs_without(v, 5, {v + PAGE, v + 4 * PAGE}, 512) == [(v, 1), (v + 2 * PAGE, 2)]
    assert postcopy.runs_without(v, 2, {v, v + PAGE}, 512) == []
    # no run longer than asked: a named stretch read after all is read a store slot at a time
    assert postcopy.runs_without(v, 5, set(), 2) == [(v, 2), (v + 2 * PAGE, 2), (v + 4 * PAGE, 1)]
    assert postcopy.runs_without(v, 6, {v + 2 * PAGE}, 2) == [(v, 2), (v + 3 * PAGE, 2), (v + 5 * PAGE, 1)]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _entry(**fields) -> bytes:
    numbers = {"vaddr": 1, "compat": 2, "in_parent": 3, "flags": 4, "nr_pages": 5}
    msg = b"".join(_varint(numbers[k] << 3) + _varint(v) for k, v in fields.items())
    return struct.pack("<I", len(msg)) + msg


def test_pagemap_lazy_ranges_from_an_image(tmp_path):
    head = _entry(vaddr=1)    # PagemapHead's pages_id is field 1 too
    image = struct.pack("<II", pagemap.IMG_COMMON_MAGIC, pagemap.PAGEMAP_MAGIC) + head + b"".join([
        _entry(vaddr=0x400000, compat=0, flags=pagemap.PE_PRESENT, nr_pages=3),
        _entry(vaddr=0x7f0000000000, compat=0, flags=pagemap.PE_LAZY, nr_pages=70000),
        _entry(vaddr=0x7f1000000000, compat=0, flags=pagemap.PE_PARENT, nr_pages=2),
        _entry(vaddr=0x7f2000000000, compat=5, flags=pagemap.PE_LAZY | pagemap.PE_PRESENT),
        _entry(vaddr=0x7f3000000000, compat=4, in_parent=1),      # old image: no flags
    ])
    (tmp_path / "pagemap-42.img").write_bytes(image)
    (tmp_path / "pagemap-shmem-9.img").write_bytes(b"not a process")
    assert pagemap.lazy_ranges(tmp_path) == [Range(42, 0x7f0000000000, 70000), Range(42, 0x7f2000000000, 5)]
    assert pagemap.entries(image)[4] == pagemap.Entry(0x7f3000000000, 4, pagemap.PE_PARENT)
    with pytest.raises(pagemap.PagemapError):
        pagemap.entries(image[:-1])
    with pytest.raises(pagemap.PagemapError):
        pagemap.entries(b"\0" * 8 + head)
    with pytest.raises(pagemap.PagemapError):     # a fixed64 field cut short
        pagemap.entries(image[:8] + head + struct.pack("<I", 2) + b"\x09\x01")


@pytest.mark.parametrize("by_hashes", [False, True], ids=["stop-and-copy", "pre-copy by hashes"])
async def test_a_fill_reads_the_frozen_process_s_memory_and_sends_every_page_it_must(monkeypatch, by_hashes):
    """A fill reads the pages from /proc/PID/mem (here: this process's own), never through
    CRIU's page server. Stop-and-copy sends each once, as it is; pre-copy by hashes only
    those that differ from what the target holds, the rest named (HAVE), and every other
    piece is compared by a forked process."""
    pages = 12 * push.FILL_PAGES + 77         # pieces cut at 2 MiB boundaries, and a short one
    memory = mmap.mmap(-1, pages * PAGE)
    for i in range(pages):
        memory[i * PAGE:(i + 1) * PAGE] = random.Random(i).randbytes(PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    ranges = [Range(1, base, pages)]
    known, changed = None, set()
    if by_hashes:
        known = pagehash.Tracker()
        known.changed(1, base, memory, record=True)      # what pre-copy left on the target
        changed = {3, 4, 600, 4700, 5300, pages - 1}       # rewritten since, in pieces of both processes
        for i in changed:
            memory[i * PAGE] ^= 0xFF
    compared_there: list[int] = []

    class Counted(compare.Comparer):
        async def next(self):
            runs = await super().next()
            compared_there.append(runs[0][0])
            return runs
    monkeypatch.setattr(compare, "Comparer", Counted)
    (criu_end, pusher_end), (link_src, link_dst) = await pair(), await pair()
    log: list = []
    pusher = push.Pusher(ranges, known=known)
    pusher.read_in_place({1: os.getpid()})
    pusher.start_pushing(fill=True)
    got: dict[int, bytes] = {}
    named: set[int] = set()

    async def target(reader, writer):
        inbound, out = streams.Decompressed(reader), streams.CompressedWriter(writer, streams.Meter(), 1)
        while True:
            kind, _, vaddr, n = await frames.read(inbound, "the page stream")
            if kind == frames.PAGES:
                data = await inbound.need(n * PAGE)
                for i in range(n):
                    assert vaddr + i * PAGE not in got
                    got[vaddr + i * PAGE] = data[i * PAGE:(i + 1) * PAGE]
            elif kind == frames.HAVE:
                named.update(range(vaddr, vaddr + n * PAGE, PAGE))
            elif kind == frames.PUSHED_ALL:
                await out.write(frames.frame(frames.CLOSE, 0, 0, postcopy.PS_IOV_CLOSE), flush=True)
            elif kind == frames.STATUS:
                await out.close()
                return
            if kind in (frames.PAGES, frames.HAVE):
                await out.write(frames.frame(frames.ACK, 0, 0, n), flush=True)

    async with asyncio.timeout(30):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fake_criu(*criu_end, log))
            tg.create_task(target(*link_dst))
            stats = await pusher.run(pusher_end, link_src)
    sent = {(a - base) // PAGE for a in got}
    assert sent == (changed if by_hashes else set(range(pages)))
    assert all(got[base + i * PAGE] == memory[i * PAGE:(i + 1) * PAGE] for i in sent)
    assert len(named) == stats.pages_known == pages - len(sent) and not named & set(got)
    assert [e[0] for e in log] == ["close"]       # no page came through CRIU
    # the first 16 MiB here (the smallest ranges: the restore may touch them), then every other piece there
    pieces = [vaddr for _, vaddr, _ in postcopy.chunks(ranges, push.FILL_PAGES, aligned=True)]
    first = next(i for i in range(len(pieces)) if pieces[i] - pieces[0] >= SIZES.fill_compared_here_pages * PAGE)
    assert compared_there == (pieces[first + 1::2] if by_hashes else [])


async def test_the_push_waits_while_the_copys_first_faults_keep_coming_and_no_longer_than_the_cap(monkeypatch):
    # on a clock of the test's own: the push's timing, not the machine's
    now = [1000.0]
    monkeypatch.setattr(push, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(push, "WAITS", dataclasses.replace(push.WAITS, postcopy_push_quiet=0.05,
                                                          postcopy_push_quiet_cap=0.3))
    pusher = push.Pusher(RANGES)
    pusher.start_pushing()
    resumed = now[0]
    assert not pusher._quiet()                  # just resumed: its first faults go first
    now[0] += 0.04
    assert not pusher._quiet()                  # not yet quiet without one
    now[0] += 0.02
    assert pusher._quiet()                      # none came
    while now[0] - resumed < 1:                 # a fault every 20 ms
        pusher._fault_at = now[0]
        if pusher._quiet():
            break
        now[0] += 0.02
    # the faults never paused, and the push went on at the cap, counted from the resume
    assert pusher._quiet() and 0.3 < now[0] - resumed <= 0.3 + 0.02
    fill = push.Pusher(RANGES)
    fill.start_pushing(fill=True)
    assert fill._quiet()                        # a fill's copy does not run: nothing to wait for
