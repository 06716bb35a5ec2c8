"""The source's half of post-copy and of a fill (postcopy.py tells both halves): the
Pusher reads every lazy page of the frozen tree, smallest ranges first, and pushes it to
the target's placer (placer.py), serving first what a fault there waits for.

Its figures (reads, windows, the quiet after the resume) are tunables: options.SIZES and
options.WAITS, with why each is what it is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time

from ..options import SIZES, WAITS
from ..wire import streams
from . import compare, frames, pagehash
from .frames import PageBytes
from .pagemap import PAGE, Range
from .postcopy import (
    PS_IOV,
    PS_IOV_GET,
    PS_STATUS,
    LinkLost,
    PageStreamError,
    Pushed,
    check_fault,
    chunks,
    runs_without,
    told,
)

# A fill reads a store slot at once (pagehash's unit of the table, which the target's store
# keeps a piece in as it came): the format's figure, not a tunable.
FILL_PAGES = pagehash.CHUNK_PAGES


async def _send(out: streams.CompressedWriter | _Outbound, kind: int, pid: int = 0, vaddr: int = 0,
                pages: int = 0, data: PageBytes = b"") -> None:
    # one write: frames from two tasks never interleave
    await out.write(frames.frame(kind, pid, vaddr, pages) + data, flush=True)


class _Outbound:
    """The pushing stream's writer, in a task of its own. The pump hands it pages and goes
    back at once to what the target asks: waiting for the pushing stream to drain (a link
    saturated by the push) held a fault's pages back by as long."""

    DEPTH = 4    # reads from CRIU handed over and not yet written out

    def __init__(self, out: streams.CompressedWriter, wake: asyncio.Queue):
        self.out, self.wake = out, wake
        self.queue: asyncio.Queue = asyncio.Queue()

    def full(self) -> bool:
        return self.queue.qsize() >= self.DEPTH

    async def write(self, data: bytes, flush: bool = True) -> None:
        self.queue.put_nowait(data)

    async def close(self, writing: asyncio.Task) -> None:
        """Once everything handed over is out: the end of the stream."""
        self.queue.put_nowait(None)
        await writing

    async def run(self) -> None:
        while (data := await self.queue.get()) is not None:
            await self.out.write(data, flush=True)
            self.wake.put_nowait(None)       # room again: the pump may read on
        await self.out.close()


class Pusher:
    """Pushes the lazy dump's pages to the target's placer.Placer: read in the frozen
    tree's memory where it can (read_in_place), else from the dump's page server."""

    def __init__(self, ranges: list[Range], level: int = 1, prefetch_pages: int = 0,
                 stall_seconds: float = WAITS.page_stream_stall, known: pagehash.Tracker | None = None):
        """known: what pre-copy by hashes left in the target's store; a page it holds as
        CRIU has it now is named (frames.HAVE), not sent. prefetch_pages: pushed, smallest
        ranges first, before start_pushing (while the target restores; see WAITS.postcopy_push_quiet)."""
        self.ranges = ranges
        self._lazy: dict[int, list[Range]] = collections.defaultdict(list)   # PID -> its ranges, by address
        for r in sorted(ranges, key=lambda r: r.vaddr):
            self._lazy[r.pid].append(r)
        self._starts = {pid: [r.vaddr for r in rs] for pid, rs in self._lazy.items()}
        self.known = known
        self.total_pages = sum(r.pages for r in ranges)
        self.stall_seconds = stall_seconds
        self.level = level
        self.prefetch_pages = prefetch_pages
        self.stats = Pushed()
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._go = False
        self._go_at = self._fault_at = 0.0
        self._waking = False
        self._in_flight = 0    # pushed pages that the target has not acknowledged
        self._window = SIZES.push_window_pages[0]
        self._fill = False
        self._memory: dict[int, int] = {}     # PID in the dump -> its /proc/PID/mem, open
        self._buffer = bytearray()             # what is read there, one read at a time
        self._shared = compare.Shared()      # a fill's comparison, in two processes
        self._urgent: streams.CompressedWriter | None = None   # the fault stream's

    def progress(self) -> tuple[int, int]:
        """(pages sent, of all the target lacked): for whoever watches."""
        done = self.stats.pages_pushed + self.stats.pages_on_demand
        return done, max(done, self.total_pages)

    def read_in_place(self, memory: dict[int, int]) -> None:
        """memory: the frozen tree's processes (PID in the dump -> PID here), whose pages
        are read where they are, unchanged since the dump: through CRIU's page server every
        byte was copied three times more, on the CPU that the push, the restore and the
        copy's first faults share."""
        for vpid, pid in memory.items():
            try:
                self._memory[vpid] = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass        # read through CRIU, then

    def start_pushing(self, fill: bool = False) -> None:
        """The target's copy runs: from now on every page goes, smallest ranges first.
        fill: it does not run, and waits for every page (pre-copy by hashes)."""
        self._go = True
        self._go_at = time.monotonic()
        if fill:
            self._fill = True
            self._window = SIZES.fill_window_pages
        self._inbox.put_nowait(None)

    async def run(self, criu_side: tuple | None, remote: tuple, faults: tuple | None = None) -> Pushed:
        """faults: a (reader, writer) stream of its own for the pages a fault waits for.
        criu_side: the lazy dump's page server; None once it is gone (a push after the link
        broke and came back: every page is read in the frozen tree)."""
        (c_reader, c_writer), (r_reader, r_writer) = criu_side or (None, None), remote
        if criu_side is None:
            self.stats.criu_gone = True
        out = _Outbound(streams.CompressedWriter(r_writer, self.stats.sent, self.level), self._inbox)
        if faults is not None:
            self._urgent = streams.CompressedWriter(faults[1], self.stats.sent, self.level, urgent=True)
            self._window = SIZES.push_window_pages[1]
        try:
            async with asyncio.TaskGroup() as tg:
                listening = tg.create_task(self._listen(streams.Decompressed(r_reader)))
                writing = tg.create_task(out.run())
                await self._pump(c_reader, c_writer, out, writing)
                listening.cancel()
        except BaseExceptionGroup as eg:
            raise told(eg, "target") from None
        finally:
            self._shared.close()     # first: the closes below may raise
            if c_writer is not None:
                c_writer.close()
            r_writer.close()
            if faults is not None:
                faults[1].close()
            for fd in self._memory.values():
                os.close(fd)
            self._memory.clear()
        return self.stats

    async def _listen(self, inbound: streams.Decompressed) -> None:
        while True:
            try:
                frame = await frames.read(inbound, "the target's page requests")
            except EOFError:
                frame = (frames.ENDED, 0, 0, 0)     # after frames.CLOSE, the end; before it, the target is gone
            self._inbox.put_nowait(frame)
            if frame[0] == frames.ENDED:
                return

    async def _pump(self, c_reader, c_writer, out: _Outbound, writing: asyncio.Task) -> None:
        todo = self._order()
        pushed_all = False
        on_demand: dict[int, set[int]] = collections.defaultdict(set)
        while True:
            item = None if self._inbox.empty() else self._inbox.get_nowait()
            may_push = (self._go and self._quiet()) or self.stats.pages_pushed < self.prefetch_pages
            if item is None and may_push and not pushed_all and self._in_flight < self._window and not out.full():
                nxt = next(todo, None)
                if nxt is None:
                    pushed_all = True
                    await _send(out, frames.PUSHED_ALL)
                    continue
                pid, vaddr, n = nxt[:3]
                runs = [(vaddr, n, False, b"")] if nxt.named else await self._shared.there(nxt)
                if runs is not None and not any(vaddr <= a < vaddr + n * PAGE for a in on_demand.get(pid, ())):
                    await self._frames(out, pid, runs)
                    self.stats.pages_pushed += n
                    continue
                for start, count in runs_without(vaddr, n, on_demand.get(pid, ()), FILL_PAGES):
                    self.stats.pages_pushed += await self._copy(c_reader, c_writer, out, pid, start, count)
                continue
            if item is None:
                item = await self._next()
                if item is None:
                    continue
            kind, pid, vaddr, n = item
            if kind == frames.ACK:
                self._in_flight -= n
                if not self._fill:
                    self._window = min(self._window + SIZES.push_read_pages, SIZES.push_window_pages[1])
            elif kind == frames.FAULT:
                check_fault(self._lazy.get(pid, []), self._starts.get(pid, []), pid, vaddr, n)
                self._fault_at = time.monotonic()
                if not self._fill:
                    self._window = SIZES.push_window_pages[0]
                self.stats.pages_on_demand += await self._copy(c_reader, c_writer, self._urgent or out,
                                                               pid, vaddr, n)
                on_demand[pid].update(range(vaddr, vaddr + n * PAGE, PAGE))
            elif kind == frames.CLOSE:
                # the target has every page: end CRIU's page server, and pass its status back
                status = await self._close_criu(c_reader, c_writer, n)
                await _send(out, frames.STATUS, pages=status & 0xFFFFFFFF)
                await out.close(writing)
                if self._urgent is not None:
                    await self._urgent.close()
                # Hang up only once the target has: its last acknowledgements and the end
                # of its stream may still be on their way, and writing into a closed
                # connection breaks it before the target has read our status.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WAITS.page_stream_close):
                        while (item := await self._inbox.get()) is None or item[0] != frames.ENDED:
                            pass
                return
            elif kind == frames.ENDED:
                raise LinkLost("the target's page requests ended before the copy had every page")
            else:
                raise PageStreamError(f"unknown frame {kind} from the target")

    async def _close_criu(self, c_reader, c_writer, command: int) -> int:
        """CRIU's status once told the target has every page. A CRIU already gone (killed,
        say) changes nothing by then: the pages were read in the frozen tree, which it left
        stopped (a SIGSTOP queued at the dump), and every one is in the target's copy."""
        if c_writer is None:
            return 0
        try:
            c_writer.write(PS_IOV.pack(command, 0, 0, 0))
            await c_writer.drain()
            (status,) = PS_STATUS.unpack(await c_reader.readexactly(PS_STATUS.size))
            return status
        except (ConnectionError, asyncio.IncompleteReadError):
            self.stats.criu_gone = True
            return 0

    def _quiet(self) -> bool:
        """May the push go on? Not during the copy's first burst of faults (WAITS.postcopy_push_quiet); until
        then a wake-up is set, since no frame may come to wake the pump."""
        if self._fill:
            return True       # nothing runs there: no fault to make room for
        now = time.monotonic()
        if now - self._go_at > WAITS.postcopy_push_quiet_cap or now - max(self._fault_at, self._go_at) > WAITS.postcopy_push_quiet:
            return True
        if not self._waking:
            self._waking = True
            asyncio.get_running_loop().call_later(WAITS.postcopy_push_quiet / 2, self._wake)
        return False

    def _wake(self) -> None:
        self._waking = False
        self._inbox.put_nowait(None)

    async def _next(self):
        """What the target says next. Once its copy runs, silence while pushed pages are
        unacknowledged means the link is lost; once every page is acknowledged, the
        target needs nothing more from here but the status, and asks for it only once
        every page is in its copy."""
        if not (self._go and self._in_flight):
            return await self._inbox.get()
        try:
            async with asyncio.timeout(self.stall_seconds):
                return await self._inbox.get()
        except TimeoutError:
            raise LinkLost(f"the target acknowledged nothing for {self.stall_seconds:.0f} s: "
                                  "the link is lost") from None

    async def _copy(self, c_reader, c_writer, out, pid: int, vaddr: int, n: int) -> int:
        """Pages [vaddr, +n) of pid from CRIU to the target; CRIU may answer in parts."""
        if (fd := self._memory.get(pid)) is not None:
            if len(self._buffer) < n * PAGE:
                self._buffer = bytearray(n * PAGE)
            if self.known is not None and (runs := compare.read_compared(self.known, fd, pid, vaddr, n,
                                                                         self._buffer)) is not None:
                await self._frames(out, pid, runs)      # (not all read: pagehash.Tracker.settle)
                return n
            view = memoryview(self._buffer)[:n * PAGE]
            try:
                got = os.preadv(fd, [view], vaddr)
            except OSError:
                got = 0
            if got == n * PAGE:
                await self._forward(out, pid, vaddr, n, view)    # which copies what it keeps
                return n
        if c_writer is None:
            raise PageStreamError(f"pages at {vaddr:#x} of process {pid} cannot be read in the frozen tree, "
                                  "and CRIU's page server, which would serve them, is gone")
        done = 0
        while done < n:
            c_writer.write(PS_IOV.pack(PS_IOV_GET, n - done, vaddr + done * PAGE, pid))
            await c_writer.drain()
            try:
                _, got, _, _ = PS_IOV.unpack(await c_reader.readexactly(PS_IOV.size))
                if got == 0 or got > n - done:
                    raise PageStreamError(f"CRIU's page server answered {got} pages for {n - done}")
                data = await c_reader.readexactly(got * PAGE)
            except asyncio.IncompleteReadError:
                raise PageStreamError(f"CRIU's page server closed the connection at pid {pid} "
                                      f"address {vaddr + done * PAGE:#x}") from None
            await self._forward(out, pid, vaddr + done * PAGE, got, data)
            done += got
        return done

    async def _forward(self, out, pid: int, vaddr: int, n: int, data: PageBytes) -> None:
        if self.known is None:
            await _send(out, frames.PAGES, pid, vaddr, n, data)
            self._sent(out, n)
            return
        await self._frames(out, pid, self.known.compared(pid, vaddr, data))

    async def _frames(self, out, pid: int, runs) -> None:
        """Runs (first, pages, changed, their bytes) as compared with what the target holds:
        the changed ones go, the rest are named."""
        parts, sent = [], 0
        for first, count, changed, data in runs:
            if changed:
                parts += [frames.frame(frames.PAGES, pid, first, count), data]
                sent += count
            else:
                parts.append(frames.frame(frames.HAVE, pid, first, count))
                self.stats.pages_known += count
        await out.write(b"".join(parts), flush=True)     # one write: see _send
        self._sent(out, sent)

    def _sent(self, out, pages: int) -> None:
        """pages' bytes went: on the pushing stream, they are in its window until acknowledged
        (a named page takes no room there: nothing of it crosses, nor is acknowledged)."""
        if out is not self._urgent:
            self._in_flight += pages

    def _order(self):
        """The push's pieces, in its order (chunks); a fill's as the watch vouches for them
        (compare.planned), compared in two processes (compare.Shared)."""
        if not self._fill:
            return (compare.Piece(*c) for c in chunks(self.ranges))
        if self.known is None:
            return (compare.Piece(*c) for c in chunks(self.ranges, FILL_PAGES, aligned=True))
        planned = compare.planned(self.known, self.ranges, FILL_PAGES, SIZES.fill_named_pages)
        return self._shared.plan(self.known, planned, self._memory) if self._memory else planned

