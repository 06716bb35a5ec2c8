"""Post-copy pages at wire speed: the source pushes every lazy page, and faults go first.

CRIU's lazy-pages daemon fetches on its own only one request at a time, and every
fault shrinks its next request back to 64 KiB; across SSH each request waits a round
trip, so a workload that keeps faulting keeps the rest of its memory waiting
(measured: 52.8 s to fetch 512 MiB that a plain copy moves in 3 s). So CRIU's requests
do not cross the link. Each end speaks CRIU's page-server protocol locally instead:

- source (`Pusher`): a client of the lazy dump's page server. It reads every lazy range
  (pagemap.lazy_ranges), smallest first, and pushes the pages, once the target's copy
  runs; before each read it serves what the target said a request is waiting for.
- target (`Server`): the page server of the lazy-pages daemon. It answers from the pages
  pushed so far, and asks the source for the first pages of any request it cannot
  answer yet.

The pages a request waits for go on a connection of their own when there is one (the
fault stream): on the pushing stream they would wait behind up to a window of pushed
pages, measured at 0.5 to 1 s of app-seen downtime at idle.

The daemon matches replies to requests by position, and checks their pid and address;
a reply may carry a prefix of what was asked (the daemon asks for the rest later), so
a request is answered as soon as its first page is here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
from dataclasses import dataclass, field

from . import streams
from .pagemap import PAGE, Range

# CRIU's struct page_server_iov as laid out on x86-64 and AArch64: cmd, nr_pages, vaddr, dst_id.
_IOV = struct.Struct("<I4xQQQ")
PS_IOV_GET = 7
PS_IOV_REPLY = (4 << 16) | 6    # encode_ps_cmd(PS_IOV_ADD_F, PE_PRESENT): CRIU's answer to a GET
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
_STATUS = struct.Struct("<i")

# Frames between the two ends, inside the zstd stream: kind, pid, vaddr, pages.
_FRAME = struct.Struct("<BIQI")
PAGES, PUSHED_ALL, STATUS = 1, 2, 3     # source -> target (STATUS carries it in pages)
NEED, CLOSE, ACK, FAULT = 1, 2, 3, 4     # target -> source (CLOSE: CRIU's command in pages; ACK: pages in;
                                         # FAULT: a NEED of one page, what a fault asks)
_ENDED = 0                               # not on the wire: the target's stream ended

# Without a fault stream a fault's pages wait behind whatever is already on its way: one
# read from CRIU and the window of pages pushed but not yet taken in by the target. The
# window then starts small, so that the burst of faults right after the resume waits
# milliseconds, grows while no fault comes, to fill the link, and shrinks back at the
# next fault. With a fault stream it is as wide as it goes from the start.
PUSH_PAGES = 64             # 256 KiB per read from CRIU
WINDOW_PAGES = (256, 4096)  # 1 MiB to 16 MiB
NEED_PAGES = 16     # what the target asks for at once: a fault's neighbours come along
# Pushed while the target restores, before it runs: the smallest ranges, where the first
# faults after the resume would land. More would compete with the restore for the CPU.
PREFETCH_PAGES = 4096   # 16 MiB
CLOSE_WAIT = 10.0    # seconds the source waits for the target to hang up first
# Once the target's copy runs, a side that hears nothing from the other for this long while
# pages are still missing calls the link lost (a cut link is silent: TCP would wait minutes).
# Each end then settles alone: the target kills a copy that lacks pages (agent.py), and
# the source keeps its copy stopped until it learns that (coordinator.py).
STALL_SECONDS = 30.0


class PageStreamError(Exception):
    pass


@dataclass
class Pushed:
    """The source's side of one post-copy."""
    sent: streams.Meter = field(default_factory=streams.Meter)
    pages_pushed: int = 0        # in push order, nobody waiting
    pages_on_demand: int = 0     # because a request on the target waited for them


@dataclass
class Served:
    """The target's side of one post-copy."""
    received: streams.Meter = field(default_factory=streams.Meter)
    pages_served: int = 0        # handed to the lazy-pages daemon
    requests: int = 0
    requests_waited: int = 0     # found their first page missing


def chunks(ranges: list[Range], size: int = PUSH_PAGES):
    """The order of the push: the smallest ranges first. A program's working set after
    the resume is mostly small mappings (stack, heap, an interpreter's arenas) while its
    large buffers wait; in address order a large buffer mapped late, below the earlier
    mappings, went first, and every small page the program touched meanwhile was a
    fault (measured: 500 ms to 1 s of stall at idle, growing with the buffer)."""
    for r in sorted(ranges, key=lambda r: r.pages):
        for first in range(0, r.pages, size):
            yield r.pid, r.vaddr + first * PAGE, min(size, r.pages - first)


def _told(eg: BaseExceptionGroup, peer: str) -> BaseException:
    """The first failure is the one to tell; a broken socket, as the stream it broke."""
    e = eg.exceptions[0]
    if isinstance(e, ConnectionError):
        return PageStreamError(f"the {peer}'s page stream ended before the daemon was done ({e})")
    return e


async def _send(out: streams.CompressedWriter, kind: int, pid: int = 0, vaddr: int = 0, pages: int = 0,
                data: bytes = b"") -> None:
    # one write: frames from two tasks never interleave
    await out.write(_FRAME.pack(kind, pid, vaddr, pages) + data, flush=True)


# --- source ----------------------------------------------------------------------------------
class Pusher:
    """Reads the lazy dump's page server (local) and pushes to the target's `Server`."""

    def __init__(self, ranges: list[Range], level: int = 1, prefetch_pages: int = PREFETCH_PAGES,
                 stall_seconds: float = STALL_SECONDS):
        self.ranges = ranges
        self.total_pages = sum(r.pages for r in ranges)
        self.stall_seconds = stall_seconds
        self.level = level
        self.prefetch_pages = prefetch_pages
        self.stats = Pushed()
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._go = False
        self._in_flight = 0    # pushed pages that the target has not acknowledged
        self._window = WINDOW_PAGES[0]
        self._urgent: streams.CompressedWriter | None = None   # the fault stream's

    def progress(self) -> tuple[int, int]:
        """(pages sent, of all the target lacked): for whoever watches."""
        done = self.stats.pages_pushed + self.stats.pages_on_demand
        return done, max(done, self.total_pages)

    def start_pushing(self) -> None:
        """The target's copy runs: from now on every page goes, smallest ranges first."""
        self._go = True
        self._inbox.put_nowait(None)

    async def run(self, criu_side: tuple, remote: tuple, faults: tuple | None = None) -> Pushed:
        """faults: a (reader, writer) stream of its own for the pages a request waits for."""
        (c_reader, c_writer), (r_reader, r_writer) = criu_side, remote
        out = streams.CompressedWriter(r_writer, self.stats.sent, self.level)
        if faults is not None:
            self._urgent = streams.CompressedWriter(faults[1], self.stats.sent, self.level)
            self._window = WINDOW_PAGES[1]
        try:
            async with asyncio.TaskGroup() as tg:
                listening = tg.create_task(self._listen(streams.Decompressed(r_reader)))
                await self._pump(c_reader, c_writer, out)
                listening.cancel()
        except BaseExceptionGroup as eg:
            raise _told(eg, "target") from None
        finally:
            c_writer.close()
            r_writer.close()
            if faults is not None:
                faults[1].close()
        return self.stats

    async def _listen(self, inbound: streams.Decompressed) -> None:
        while True:
            try:
                frame = _FRAME.unpack(await inbound.need(_FRAME.size, "the target's page requests"))
            except EOFError:
                frame = (_ENDED, 0, 0, 0)     # after CLOSE, the end; before it, the target is gone
            self._inbox.put_nowait(frame)
            if frame[0] == _ENDED:
                return

    async def _pump(self, c_reader, c_writer, out) -> None:
        todo = chunks(self.ranges)
        pushed_all = False
        on_demand: dict[int, set[int]] = collections.defaultdict(set)
        while True:
            item = None if self._inbox.empty() else self._inbox.get_nowait()
            may_push = self._go or self.stats.pages_pushed < self.prefetch_pages
            if item is None and may_push and not pushed_all and self._in_flight < self._window:
                nxt = next(todo, None)
                if nxt is None:
                    pushed_all = True
                    await _send(out, PUSHED_ALL)
                    continue
                pid, vaddr, n = nxt
                for start, count in _runs_without(vaddr, n, on_demand.get(pid, ())):
                    self.stats.pages_pushed += await self._copy(c_reader, c_writer, out, pid, start, count)
                    self._in_flight += count
                continue
            if item is None:
                item = await self._next()
                if item is None:
                    continue
            kind, pid, vaddr, n = item
            if kind == ACK:
                self._in_flight -= n
                self._window = min(self._window + PUSH_PAGES, WINDOW_PAGES[1])
            elif kind in (NEED, FAULT):
                if self._urgent is None and kind == FAULT:
                    self._window = WINDOW_PAGES[0]
                self.stats.pages_on_demand += await self._copy(c_reader, c_writer, self._urgent or out,
                                                               pid, vaddr, n)
                if self._urgent is None:     # on the pushing stream: counted in its window
                    self._in_flight += n
                on_demand[pid].update(range(vaddr, vaddr + n * PAGE, PAGE))
            elif kind == CLOSE:
                # the daemon is done: pass its goodbye to CRIU, and CRIU's status back
                c_writer.write(_IOV.pack(n, 0, 0, 0))
                await c_writer.drain()
                (status,) = _STATUS.unpack(await c_reader.readexactly(_STATUS.size))
                await _send(out, STATUS, pages=status & 0xFFFFFFFF)
                await out.close()
                if self._urgent is not None:
                    await self._urgent.close()
                # Hang up only once the target has: its last acknowledgements and the end
                # of its stream may still be on their way, and writing into a closed
                # connection breaks it before the target has read our status.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_WAIT):
                        while (item := await self._inbox.get()) is None or item[0] != _ENDED:
                            pass
                return
            elif kind == _ENDED:
                raise PageStreamError("the target's page requests ended before the lazy-pages daemon was done")
            else:
                raise PageStreamError(f"unknown frame {kind} from the target")

    async def _next(self):
        """What the target says next. Once its copy runs, silence while pushed pages are
        unacknowledged means the link is lost; once every page is acknowledged, the
        target needs nothing more from here but the status, and its daemon may take long
        to hand what it holds to the copy (measured: over 30 s for 2 GiB)."""
        if not (self._go and self._in_flight):
            return await self._inbox.get()
        try:
            async with asyncio.timeout(self.stall_seconds):
                return await self._inbox.get()
        except TimeoutError:
            raise PageStreamError(f"the target acknowledged nothing for {self.stall_seconds:.0f} s: "
                                  "the link is lost") from None

    async def _copy(self, c_reader, c_writer, out, pid: int, vaddr: int, n: int) -> int:
        """Pages [vaddr, +n) of pid from CRIU to the target; CRIU may answer in parts."""
        done = 0
        while done < n:
            c_writer.write(_IOV.pack(PS_IOV_GET, n - done, vaddr + done * PAGE, pid))
            await c_writer.drain()
            try:
                _, got, _, _ = _IOV.unpack(await c_reader.readexactly(_IOV.size))
                if got == 0 or got > n - done:
                    raise PageStreamError(f"CRIU's page server answered {got} pages for {n - done}")
                data = await c_reader.readexactly(got * PAGE)
            except asyncio.IncompleteReadError:
                raise PageStreamError(f"CRIU's page server closed the connection at pid {pid} "
                                      f"address {vaddr + done * PAGE:#x}") from None
            await _send(out, PAGES, pid, vaddr + done * PAGE, got, data)
            done += got
        return done


def _runs_without(vaddr: int, n: int, skip) -> list[tuple[int, int]]:
    """[vaddr, +n pages) minus the pages in skip, as (start, pages) runs."""
    if not skip:
        return [(vaddr, n)]
    runs, start = [], None
    for i in range(n):
        page = vaddr + i * PAGE
        if page in skip:
            if start is not None:
                runs.append((start, (page - start) // PAGE))
                start = None
        elif start is None:
            start = page
    if start is not None:
        runs.append((start, (vaddr + n * PAGE - start) // PAGE))
    return runs


# --- target ----------------------------------------------------------------------------------
class Server:
    """The lazy-pages daemon's page server, fed by the source's Pusher."""

    def __init__(self, stall_seconds: float = STALL_SECONDS):
        self.stall_seconds = stall_seconds
        self.stats = Served()
        self.pages: dict[int, dict[int, memoryview]] = collections.defaultdict(dict)
        self.served: dict[int, set[int]] = collections.defaultdict(set)
        self.asked: dict[int, set[int]] = collections.defaultdict(set)
        self.requests: collections.deque = collections.deque()
        self.status: int | None = None
        self.closed = False       # CLOSE sent: the daemon has every page, the copy is whole
        self.pushed_all = False   # the source has sent every page: what is missing is on its way
        self.running = False      # the copy runs: from now on the source must be heard from
        self.heard = 0.0          # when it last was
        self.changed = asyncio.Event()

    def resumed(self) -> None:
        """The target's copy runs, so a silent source leaves it waiting on missing pages."""
        self.running, self.heard = True, asyncio.get_running_loop().time()

    async def run(self, daemon_side: tuple, remote: tuple, faults: tuple | None = None) -> Served:
        """faults: the stream of pages that requests wait for, if the source has one."""
        (d_reader, d_writer), (r_reader, r_writer) = daemon_side, remote
        out = streams.CompressedWriter(r_writer, streams.Meter(), 1)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(streams.Decompressed(r_reader, self.stats.received), out))
                if faults is not None:
                    tg.create_task(self._receive(streams.Decompressed(faults[0], self.stats.received), None))
                tg.create_task(self._answer(d_writer))
                watching = tg.create_task(self._watch())
                await self._requests(d_reader, out)
                watching.cancel()
        except BaseExceptionGroup as eg:
            raise _told(eg, "source") from None
        finally:
            d_writer.close()
            r_writer.close()
        return self.stats

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1)
            if (self.running and not (self.pushed_all or self.closed)
                    and loop.time() - self.heard > self.stall_seconds):
                raise PageStreamError(f"nothing from the source for {self.stall_seconds:.0f} s while "
                                      "pages were missing: the link is lost")

    async def _requests(self, d_reader, out) -> None:
        """The daemon's requests, until it closes its end."""
        while True:
            try:
                cmd, n, vaddr, pid = _IOV.unpack(await d_reader.readexactly(_IOV.size))
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise PageStreamError("the lazy-pages daemon sent half a request") from None
                break
            if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                self.requests.append((cmd, 0, 0, 0))
                self.closed = True
                await _send(out, CLOSE, pages=cmd)
                await out.close()
            elif cmd == PS_IOV_GET and n:
                self.stats.requests += 1
                self.requests.append((cmd, pid, vaddr, n))
                await self._ask(out, pid, vaddr, n)
            else:
                raise PageStreamError(f"the lazy-pages daemon sent command {cmd:#x}")
            self.changed.set()
        if self.requests or self.status is None:
            raise PageStreamError("the lazy-pages daemon left before it had every page")

    async def _ask(self, out, pid: int, vaddr: int, n: int) -> None:
        """The source sends the first missing pages of a request nobody will answer soon."""
        have, asked = self.pages[pid], self.asked[pid]
        if vaddr in have:
            return
        self.stats.requests_waited += 1
        run = 0
        while run < min(n, NEED_PAGES) and (page := vaddr + run * PAGE) not in have and page not in asked:
            asked.add(page)
            run += 1
        if run:
            await _send(out, FAULT if n == 1 else NEED, pid, vaddr, run)

    async def _receive(self, inbound: streams.Decompressed, out) -> None:
        """Frames from one of the source's streams; out: where to acknowledge pushed pages
        (None: the fault stream, whose pages the source does not count in its window)."""
        while True:
            try:
                kind, pid, vaddr, n = _FRAME.unpack(await inbound.need(_FRAME.size, "the source's page stream"))
            except EOFError:
                # the fault stream ends once the source has our CLOSE, maybe before the
                # pushing stream brings the status
                if self.status is None and not (out is None and self.closed):
                    raise PageStreamError("the source's page stream ended before the daemon was done") from None
                return
            self.heard = asyncio.get_running_loop().time()
            if kind == PAGES:
                data = memoryview(await inbound.need(n * PAGE, "the source's page stream"))
                have, served, asked = self.pages[pid], self.served[pid], self.asked[pid]
                for i in range(n):
                    page = vaddr + i * PAGE
                    # a page already served comes again only when asked again (a child
                    # forked after the restore shares its parent's pid and ranges)
                    if page in asked or page not in served:
                        have[page] = data[i * PAGE:(i + 1) * PAGE]
                        asked.discard(page)
                if out is not None and not self.closed:     # the source's window moves on
                    await _send(out, ACK, pages=n)
            elif kind == STATUS:
                self.status = n
            elif kind == PUSHED_ALL:
                self.pushed_all = True
            else:
                raise PageStreamError(f"unknown frame {kind} from the source")
            self.changed.set()

    async def _answer(self, d_writer) -> None:
        """Replies, in the daemon's request order."""
        while True:
            self.changed.clear()
            if not self.requests:
                await self.changed.wait()
                continue
            cmd, pid, vaddr, n = self.requests[0]
            if cmd != PS_IOV_GET:
                if self.status is None:
                    await self.changed.wait()
                    continue
                # answered before the write: the daemon may close its end the moment it reads this
                self.requests.popleft()
                d_writer.write(_STATUS.pack(self.status - (1 << 32) if self.status >= 1 << 31 else self.status))
                await d_writer.drain()
                return
            have = self.pages[pid]
            if vaddr not in have:
                await self.changed.wait()
                continue
            served = self.served[pid]
            parts = []
            while len(parts) < n and (page := vaddr + len(parts) * PAGE) in have:
                parts.append(have.pop(page))
                served.add(page)
            d_writer.write(_IOV.pack(PS_IOV_REPLY, len(parts), vaddr, pid))
            d_writer.write(b"".join(parts))
            self.stats.pages_served += len(parts)
            self.requests.popleft()
            await d_writer.drain()
