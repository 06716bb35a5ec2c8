"""The post-copy pump between a stand-in for CRIU's page server and a stand-in for its
lazy-pages daemon, speaking CRIU's protocol as its source describes it (criu/page-xfer.c,
criu/uffd.c). The lab's post-copy tests run the real ones."""

import asyncio
import socket
import struct

import pytest

from livemig import pagemap, postcopy
from livemig.pagemap import PAGE, Range
from livemig.streams import socket_streams

IOV = struct.Struct("<I4xQQQ")
RANGES = [Range(1, 0x10000, 600), Range(7, 0x500000, 40)]
PIPE_PAGES = 100    # CRIU answers a GET with at most the rest of one page-pipe iovec


def page(pid: int, vaddr: int) -> bytes:
    return struct.pack("<IQ", pid, vaddr) * (PAGE // 12) + b"\0" * (PAGE % 12)


async def fake_criu(reader, writer, log: list) -> None:
    while True:
        try:
            cmd, n, vaddr, pid = IOV.unpack(await reader.readexactly(IOV.size))
        except asyncio.IncompleteReadError:
            return
        if cmd in (postcopy.PS_IOV_CLOSE, postcopy.PS_IOV_FORCE_CLOSE):
            log.append(("close", cmd))
            writer.write(struct.pack("<i", 0))
            await writer.drain()
            await reader.read()
            writer.close()
            return
        r = next(r for r in RANGES if r.pid == pid and r.vaddr <= vaddr < r.vaddr + r.pages * PAGE)
        index = (vaddr - r.vaddr) // PAGE
        n = min(n, PIPE_PAGES - index % PIPE_PAGES, r.pages - index)
        log.append(("get", pid, vaddr, n))
        writer.write(IOV.pack(postcopy.PS_IOV_REPLY, n, vaddr, pid))
        writer.write(b"".join(page(pid, vaddr + i * PAGE) for i in range(n)))
        await writer.drain()


class FakeDaemon:
    """Asks as CRIU's daemon does: requests pipelined, replies taken in order, and
    whatever a reply lacks asked again."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.got: dict[tuple[int, int], bytes] = {}
        self.pending: list[tuple[int, int, int]] = []

    async def ask(self, pid: int, vaddr: int, n: int) -> None:
        self.pending.append((pid, vaddr, n))
        self.writer.write(IOV.pack(postcopy.PS_IOV_GET, n, vaddr, pid))
        await self.writer.drain()

    async def take(self) -> None:
        pid, vaddr, n = self.pending.pop(0)
        _, got, r_vaddr, r_pid = IOV.unpack(await self.reader.readexactly(IOV.size))
        assert (r_pid, r_vaddr) == (pid, vaddr) and 1 <= got <= n
        data = await self.reader.readexactly(got * PAGE)
        for i in range(got):
            self.got[(pid, vaddr + i * PAGE)] = data[i * PAGE:(i + 1) * PAGE]
        if got < n:
            await self.ask(pid, vaddr + got * PAGE, n - got)
            await self.take()

    async def close(self) -> int:
        self.writer.write(IOV.pack(postcopy.PS_IOV_FORCE_CLOSE, 0, 0, 0))
        await self.writer.drain()
        (status,) = struct.unpack("<i", await self.reader.readexactly(4))
        self.writer.close()
        return status


async def pair():
    a, b = socket.socketpair()
    return await socket_streams(a), await socket_streams(b)


@pytest.mark.parametrize("fault_stream", [False, True], ids=["one stream", "fault stream"])
async def test_faults_are_answered_before_pushing_starts_then_every_page_arrives_in_order(fault_stream):
    (criu_end, pusher_end), (daemon_end, server_end), (link_src, link_dst) = \
        await pair(), await pair(), await pair()
    faults_src = faults_dst = None
    if fault_stream:
        faults_src, faults_dst = await pair()
    log: list = []
    pusher, server = postcopy.Pusher(RANGES, prefetch_pages=0), postcopy.Server()
    daemon = FakeDaemon(*daemon_end)
    async with asyncio.timeout(20):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fake_criu(*criu_end, log))
            pushed = tg.create_task(pusher.run(pusher_end, link_src, faults_src))
            served = tg.create_task(server.run(server_end, link_dst, faults_dst))
            # a fault while the target is restored and not yet running: nothing is pushed yet
            fault = RANGES[0].vaddr + 550 * PAGE
            await daemon.ask(1, fault, 1)
            await daemon.take()
            assert daemon.got[(1, fault)] == page(1, fault)
            assert all(e[0] == "get" and e[2] == fault for e in log)   # only what the fault needed
            pusher.start_pushing()
            # CRIU's own background fetch, one request at a time, with a fault pipelined behind
            for r in RANGES:
                for first in range(0, r.pages, 64):
                    await daemon.ask(r.pid, r.vaddr + first * PAGE, min(64, r.pages - first))
                    if first == 128:
                        await daemon.ask(7, RANGES[1].vaddr + 39 * PAGE, 1)
                        await daemon.take()
                    await daemon.take()
            assert await daemon.close() == 0
    every = {(r.pid, r.vaddr + i * PAGE) for r in RANGES for i in range(r.pages)}
    assert set(daemon.got) == every
    assert all(daemon.got[k] == page(*k) for k in every)
    assert log[-1] == ("close", postcopy.PS_IOV_FORCE_CLOSE)
    p, s = pushed.result(), served.result()
    assert p.pages_on_demand >= 1 and p.pages_pushed + p.pages_on_demand >= len(every)
    assert s.pages_served >= len(every) and s.requests_waited >= 1
    assert p.sent.wire < p.sent.raw      # compressed on the link


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


class GatedReader:
    """A stream reader whose reads wait while the gate is shut: a link stuck behind a
    backlog of pushed pages."""

    def __init__(self, reader):
        self.reader, self.open = reader, asyncio.Event()
        self.open.set()

    async def read(self, n: int) -> bytes:
        await self.open.wait()
        return await self.reader.read(n)


async def test_a_fault_is_answered_on_its_own_stream_while_the_pushing_stream_is_stuck():
    (criu_end, pusher_end), (daemon_end, server_end), (link_src, link_dst) = \
        await pair(), await pair(), await pair()
    faults_src, faults_dst = await pair()
    gated = GatedReader(link_dst[0])
    pusher, server = postcopy.Pusher(RANGES), postcopy.Server()
    daemon = FakeDaemon(*daemon_end)
    async with asyncio.timeout(20):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fake_criu(*criu_end, []))
            pushed = tg.create_task(pusher.run(pusher_end, link_src, faults_src))
            tg.create_task(server.run(server_end, (gated, link_dst[1]), faults_dst))
            gated.open.clear()
            pusher.start_pushing()
            await asyncio.sleep(0.2)     # pushed pages pile up on the stuck stream
            fault = RANGES[0].vaddr + 599 * PAGE    # the last page: the push reaches it last
            await daemon.ask(1, fault, 1)
            await daemon.take()
            assert daemon.got[(1, fault)] == page(1, fault)
            assert server.stats.pages_served == 1     # nothing came in on the stuck stream
            gated.open.set()
            for r in RANGES:
                await daemon.ask(r.pid, r.vaddr, r.pages)
                await daemon.take()
            assert await daemon.close() == 0
    assert all(daemon.got[(r.pid, r.vaddr + i * PAGE)] == page(r.pid, r.vaddr + i * PAGE)
               for r in RANGES for i in range(r.pages))
    assert pushed.result().pages_on_demand >= 1


async def test_the_source_gone_mid_copy_fails_the_target_side_loudly():
    (daemon_end, server_end), (link_src, link_dst) = await pair(), await pair()
    daemon = FakeDaemon(*daemon_end)
    async with asyncio.timeout(10):
        serving = asyncio.create_task(postcopy.Server().run(server_end, link_dst))
        await daemon.ask(1, RANGES[0].vaddr, 1)
        link_src[1].close()
        with pytest.raises(postcopy.PageStreamError, match="source's page stream ended"):
            await serving


async def test_a_silent_link_fails_the_target_side_once_its_copy_runs_and_not_before():
    # the link is cut: the source's end stays open, and nothing more arrives
    (daemon_end, server_end), (_, link_dst) = await pair(), await pair()
    daemon = FakeDaemon(*daemon_end)
    server = postcopy.Server(stall_seconds=0.5)
    async with asyncio.timeout(10):
        serving = asyncio.create_task(server.run(server_end, link_dst))
        await daemon.ask(1, RANGES[0].vaddr, 1)
        await asyncio.sleep(1.6)
        assert not serving.done()        # restored, stopped: the source may take its time
        server.resumed()
        with pytest.raises(postcopy.PageStreamError, match="nothing from the source for 0 s"):
            await serving


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
