"""A stand-in for the source's CRIU page server, speaking its protocol as criu/page-xfer.c
does, for the post-copy tests; the lab's post-copy tests run the real one."""

import asyncio
import socket
import struct

from livemig.pages import postcopy
from livemig.pages.pagemap import PAGE, Range
from livemig.wire.streams import socket_streams

IOV = struct.Struct("<I4xQQQ")
PIPE_PAGES = 100    # CRIU answers a GET with at most the rest of one page-pipe iovec


def page(pid: int, vaddr: int) -> bytes:
    """What the dump holds at vaddr of pid: different on every page."""
    return struct.pack("<IQ", pid, vaddr) * (PAGE // 12) + b"\0" * (PAGE % 12)


async def fake_criu(reader, writer, ranges: list[Range], log: list) -> None:
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
        r = next(r for r in ranges if r.pid == pid and r.vaddr <= vaddr < r.vaddr + r.pages * PAGE)
        index = (vaddr - r.vaddr) // PAGE
        n = min(n, PIPE_PAGES - index % PIPE_PAGES, r.pages - index)
        log.append(("get", pid, vaddr, n))
        writer.write(IOV.pack(postcopy.PS_IOV_REPLY, n, vaddr, pid))
        writer.write(b"".join(page(pid, vaddr + i * PAGE) for i in range(n)))
        await writer.drain()


async def pair():
    a, b = socket.socketpair()
    return await socket_streams(a), await socket_streams(b)


class GatedReader:
    """A stream reader whose reads wait while the gate is shut: a link stuck behind a
    backlog of pushed pages."""

    def __init__(self, reader):
        self.reader, self.open = reader, asyncio.Event()
        self.open.set()

    async def read(self, n: int) -> bytes:
        await self.open.wait()
        return await self.reader.read(n)
