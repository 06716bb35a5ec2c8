"""The source's side of post-copy (postcopy.Pusher) against a stand-in for CRIU's page
server, and the reading of CRIU's pagemap images. The target's side, with real uffds, is
in test_placer.py; the lab's post-copy tests run the real CRIU."""

import asyncio
import struct

import pytest

from livemig import pagemap, postcopy
from livemig.pagemap import PAGE, Range

from .pagefakes import fake_criu as _fake_criu, pair

RANGES = [Range(1, 0x10000, 600), Range(7, 0x500000, 40)]


def fake_criu(reader, writer, log):
    return _fake_criu(reader, writer, RANGES, log)


async def test_while_the_target_restores_only_the_smallest_ranges_go_ahead():
    (criu_end, pusher_end), (link_src, _) = await pair(), await pair()
    log: list = []
    pusher = postcopy.Pusher(RANGES, prefetch_pages=40)
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
    pusher = postcopy.Pusher(RANGES, prefetch_pages=0, stall_seconds=0.5)
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
    assert postcopy._runs_without(v, 5, set()) == [(v, 5)]
    assert postcopy._runs_without(v, 5, {v + PAGE, v + 4 * PAGE}) == [(v, 1), (v + 2 * PAGE, 2)]
    assert postcopy._runs_without(v, 2, {v, v + PAGE}) == []


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
