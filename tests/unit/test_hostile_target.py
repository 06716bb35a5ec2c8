"""What a compromised target can send the coordinator, and what it gets for it: a stream
that inflates a thousandfold is taken in bounded pieces, never whole into memory; a fault
asking for more pages than the placer ever does, or for pages no lazy range holds, ends the
push as the broken stream it is, before anything is read for it."""

from __future__ import annotations

import asyncio
import struct

import pytest
import zstandard

from livemig.options import SIZES
from livemig.pages import frames, pagemap, postcopy, push
from livemig.wire import streams

from .pagefakes import fake_criu, pair
from .test_postcopy import RANGES, _entry

MOST = 64 << 20      # what the coordinator may hold of one inflating read (SIZES.inflated_most is less)


def _bomb(plain: int) -> bytes:
    """A zstd stream of plain zero bytes: 32768 times smaller than what it inflates to."""
    c = zstandard.ZstdCompressor(level=1).compressobj()
    piece = b"\0" * (16 << 20)
    return b"".join(c.compress(piece) for _ in range(plain // len(piece))) + c.flush()


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader(limit=len(data) + 1)
    r.feed_data(data)
    r.feed_eof()
    return r


def test_inflating_at_once_is_bounded_by_the_options():
    assert SIZES.inflated_most <= MOST


async def test_a_stream_that_inflates_a_thousandfold_is_read_in_bounded_pieces():
    inbound = streams.Decompressed(_reader(_bomb(1 << 30)))     # 1 GiB from 32 KiB
    await inbound.need(frames.HEADER.size)
    assert len(inbound.buf) <= MOST


async def test_a_relay_passes_an_inflating_stream_on_in_bounded_pieces():
    written: list[int] = []

    class Sink:
        def write(self, data):
            written.append(len(data))

        async def drain(self):
            pass

        def can_write_eof(self):
            return False
    meter = streams.Meter()
    await streams.receive_compressed(_reader(_bomb(1 << 30)), Sink(), meter)
    assert meter.raw == 1 << 30 and max(written) <= MOST


@pytest.mark.parametrize("pid, vaddr, n", [
    (1, 0x10000, 1 << 31),                 # 8 TiB of pages for one fault
    (1, 0x10000, SIZES.fault_pages + 1),   # more than the placer ever asks at once
    (1, 0x7f0000000000, 1),                # a page no lazy range holds
    (9, 0x10000, 1),                       # a process the dump has not
    (1, 0x10000 + 599 * 4096, 2),          # past its range's end
])
async def test_a_fault_no_placer_would_send_ends_the_push_before_anything_is_read(pid, vaddr, n):
    (criu_end, pusher_end), (link_src, link_dst) = await pair(), await pair()
    log: list = []
    pusher = push.Pusher(RANGES)
    async with asyncio.timeout(10):
        criu = asyncio.create_task(fake_criu(*criu_end, RANGES, log))
        pushing = asyncio.create_task(pusher.run(pusher_end, link_src))
        out = streams.CompressedWriter(link_dst[1], streams.Meter(), 1)
        await out.write(frames.frame(frames.FAULT, pid, vaddr, n), flush=True)
        with pytest.raises(postcopy.PageStreamError, match="fault"):
            await pushing
        assert log == []
        criu.cancel()
    link_dst[1].close()


# --- the pagemaps a round's target sends back (SendPagemaps), which the source's CRIU reads as root
def _pagemap(*entries: bytes) -> bytes:
    return struct.pack("<II", pagemap.IMG_COMMON_MAGIC, pagemap.PAGEMAP_MAGIC) + _entry(vaddr=1) + b"".join(entries)


GOOD = _pagemap(_entry(vaddr=0x400000, compat=0, flags=pagemap.PE_PRESENT, nr_pages=3),
                _entry(vaddr=0x7f0000000000, compat=0, flags=pagemap.PE_PARENT, nr_pages=70000))


async def _sent_back(tmp_path, files: dict[str, bytes], **limits):
    src, dst = tmp_path / "target", tmp_path / "source"
    src.mkdir()
    dst.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    (a, b) = await pair()
    sending = asyncio.create_task(streams.send_files(src, list(files), a[1]))
    try:
        return await pagemap.receive(b[0], dst, **limits), sorted(p.name for p in dst.iterdir())
    finally:
        a[1].close()
        await asyncio.gather(sending, return_exceptions=True)


async def test_the_pagemaps_a_target_sends_back_arrive_when_they_are_what_criu_wrote(tmp_path):
    got, names = await _sent_back(tmp_path, {"pagemap-1.img": GOOD, "pagemap-shmem-9.img": GOOD, "pages-1.img": b""})
    assert got == (3, 2 * len(GOOD)) and names == ["pagemap-1.img", "pagemap-shmem-9.img", "pages-1.img"]


@pytest.mark.parametrize("files, limits", [
    ({"pagemap-1.img": GOOD, "core-1.img": b"x"}, {}),                # not a pagemap
    ({"pages-1.img": b"\0" * 4096}, {}),                             # pages sent back hold nothing
    ({"pagemap-1.img": GOOD, "pagemap-2.img": GOOD}, {"most": len(GOOD) + 1}),   # too much
    ({"pagemap-1.img": GOOD, "pagemap-2.img": GOOD}, {"files_most": 1}),
    ({"pagemap-1.img": _pagemap(_entry(vaddr=0x400001, flags=pagemap.PE_PRESENT, nr_pages=1))}, {}),
    ({"pagemap-1.img": _pagemap(_entry(vaddr=0x400000, flags=pagemap.PE_PRESENT, nr_pages=1 << 60))}, {}),
    ({"pagemap-1.img": _pagemap(_entry(vaddr=0x400000, flags=0x80, nr_pages=1))}, {}),
    ({"pagemap-1.img": GOOD[:-1]}, {}),
])
async def test_pagemaps_sent_back_that_criu_never_wrote_are_refused(tmp_path, files, limits):
    with pytest.raises(pagemap.PagemapError):
        await _sent_back(tmp_path, files, **limits)
