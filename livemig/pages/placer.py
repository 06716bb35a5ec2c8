"""Post-copy on the target: livemig puts each page into the restored copy as it lands.

CRIU's lazy-pages daemon (criu/uffd.c, v4.2) cannot take pages at the speed they come:
once the restore is done it spins on a poll with no timeout, asks its page server for
one page per fault, clips every reply to what it asked (`uffd_io_complete`), and shrinks
its own background fetch back to 64 KiB at every fault. A workload that keeps writing
got a few hundred pages a second that way, however fast the source pushed them.

So the agent takes the daemon's place. CRIU's restore hands each restored task's
userfaultfd over on `lazy-pages.socket` in its work directory, as it would to the
daemon: an int PID (negative: a zombie, no memory, no fd), then the uffd (SCM_RIGHTS on
one byte), and once every task is restored and its lazy ranges registered, the word
RESTORE_FINISHED. From then on every page the source pushes goes into its process the
moment it lands (UFFDIO_COPY, a run at a time), and a fault asks the source for the pages
it waits on, ahead of the push (frames.FAULT).

A uffd also reports what the process does to its memory meanwhile (the features CRIU's
restore asks for):
- fork: the child gets a uffd of its own and lacks what its parent lacked then; every
  page that lands afterwards goes to both (until the fork is read, the kernel refuses
  copies into the parent: uffd.Busy);
- mremap: the range's missing pages now live elsewhere;
- munmap, madvise(DONTNEED): the range needs nothing any more, and must never get the old
  pages afterwards: the program expects zeros there.
A fault on a page the image never had (never written on the source) gets zeros.

Once every page is in, the uffds stay open until the agent closes them (close()): the
guard holds duplicates (guard.py), and a fault on a never-written page must find someone
to give it zeros until the guard has let go.

The copy's pages go through the stages of Stage, in order (RESTORING, REPLAYING, PLACING,
WHOLE). Two things the placer tracks beside them are not steps of that one machine, and
stay flags: whether the copy runs (the agent's Resume: a post-copy's may come while the
early pages still go in, or after the copy is whole; a fill's only once every page is
here), and whether the source has pushed every page (PUSHED_ALL, which may come in any
stage, even while the restore is under way).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import enum
import itertools
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..errors import LivemigError
from ..options import SIZES, WAITS
from ..wire import streams
from . import frames, pagehash, postcopy, shadow, uffd
from .frames import ACK, CLOSE, FAULT, HAVE, PAGES, PUSHED_ALL, STATUS, PageBytes
from .pagemap import PAGE, Range
from .postcopy import PS_IOV_CLOSE, PageStreamError

SOCKET = "lazy-pages.socket"
RESTORE_FINISHED = 0x52535446       # "ReSTore Finished", as criu/uffd.c sends it
_WORD = struct.Struct("<I")
Link = tuple[tuple, "tuple | None"]     # the pushing stream and the fault stream (None: it shares the first)


class Stage(enum.Enum):
    """Where the copy's pages stand. Only the moves in _NEXT are allowed."""
    RESTORING = "restoring"   # CRIU's restore hands its uffds over: a page that lands waits (early),
                              # but for one a fault of the restore itself waits on
    REPLAYING = "replaying"   # every uffd is here, its ranges registered: the early pages go in
    PLACING = "placing"       # the early pages are in: every page goes in as it lands
    WHOLE = "whole"           # every task has every page: CLOSE sent, nothing more is placed


# WHOLE may come while the early pages go in: the last missing one may be among them (or a
# task's exit leaves nothing missing)
_NEXT = {Stage.RESTORING: {Stage.REPLAYING}, Stage.REPLAYING: {Stage.PLACING, Stage.WHOLE},
         Stage.PLACING: {Stage.WHOLE}, Stage.WHOLE: set()}


class _Lazy:
    """The lazy ranges of one process in the dump, searchable by address."""

    def __init__(self, ranges: list[Range]):
        self.ranges = sorted(ranges, key=lambda r: r.vaddr)
        self.starts = [r.vaddr for r in self.ranges]
        self.pages = sum(r.pages for r in self.ranges)

    def find(self, vaddr: int) -> tuple[int, int] | None:
        """(range, page in it) of an address in the image, or None if no lazy page is there."""
        i = bisect.bisect_right(self.starts, vaddr) - 1
        if i >= 0 and (k := (vaddr - self.ranges[i].vaddr) // PAGE) < self.ranges[i].pages:
            return i, k
        return None

    def overlapping(self, start: int, end: int):
        """(range, first page, end page) of the lazy pages in [start, end) of the image."""
        for i in range(max(bisect.bisect_right(self.starts, start) - 1, 0), len(self.ranges)):
            r = self.ranges[i]
            if r.vaddr >= end:
                break
            a = max(0, (start - r.vaddr) // PAGE)
            b = min(r.pages, -(-(end - r.vaddr) // PAGE))
            if a < b:
                yield i, a, b


class _Task:
    """One restored process, or a child it forked since: its uffd, and which of its lazy
    pages it still lacks (a byte per page, 1: missing), by the addresses of the image."""

    def __init__(self, pid: int, fd: int, holes: list[bytearray], left: int,
                 remaps: list[tuple[int, int, int]] | None = None, forked: bool = False):
        self.pid, self.fd, self.holes, self.left = pid, fd, holes, left
        self.remaps = remaps or []      # (from, to, length) in the order the process moved them
        self.forked = forked            # a child forked since the restore: its pages are not counted as served
        self.index = -1                 # its uffd's among those told to the guard
        self.retry: list[int] = []      # faults to answer again: the kernel said Busy

    def current(self, vaddr: int) -> int:
        """Where the image's address is in the process now."""
        for frm, to, length in self.remaps:
            if frm <= vaddr < frm + length:
                vaddr += to - frm
        return vaddr

    def image(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) of the process now, as spans of the image's addresses. What a move
        left empty holds none of them (mremap reports the unmapping of its old place too)."""
        spans = [(start, end)]
        for frm, to, length in reversed(self.remaps):
            out = []
            for a, b in spans:
                for lo, hi, back in _split(a, b, to, to + length):
                    if back:
                        out.append((lo - to + frm, hi - to + frm))
                    else:
                        out += [(x, y) for x, y, vacated in _split(lo, hi, frm, frm + length) if not vacated]
            spans = out
        return spans


class _Lent:
    """A duplicate of a uffd lent to a fill's thread, closed by whichever side takes it
    first: the thread, once it has placed through it; or the loop, if the fill is
    cancelled before the thread started (the executor then never runs it, and the
    duplicate, holding the copy's memory map, would stay open in the agent for good)."""

    def __init__(self, fd: int):
        self._fd: int | None = os.dup(fd)
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            fd, self._fd = self._fd, None
        return fd

    def close(self) -> None:
        if (fd := self.take()) is not None:
            os.close(fd)


def _place_runs(lent: _Lent, base: int, k: int, runs: list[tuple[int, int]], view: memoryview) -> None:
    """In a fill's thread: pages a to b of each run (view's first is page k of the range at
    base) through a descriptor of the thread's own, closed here."""
    fd = lent.take()
    if fd is None:          # the fill was cancelled before this thread began: nothing to place
        return
    try:
        for a, b in runs:
            uffd.place(fd, base + a * PAGE, view[(a - k) * PAGE:(b - k) * PAGE])
    finally:
        os.close(fd)


def _or(holes: list[bytearray]) -> int:
    """The union of several processes' missing pages, as one number (a byte per page)."""
    union = 0
    for h in holes:
        union |= int.from_bytes(h, "big")
    return union


def _joined(runs: list[tuple[int, int, int, int]], gap: int) -> list[tuple[int, int, int, int]]:
    """runs, each joined with the next in its range when at most gap pages lie between."""
    out = [runs[0]]
    for pid, ri, a, b in runs[1:]:
        lpid, lri, la, lb = out[-1]
        if (pid, ri) == (lpid, lri) and a - lb <= gap:
            out[-1] = (pid, ri, la, b)
        else:
            out.append((pid, ri, a, b))
    return out


def _split(a: int, b: int, lo: int, hi: int) -> list[tuple[int, int, bool]]:
    """[a, b) cut at [lo, hi): (start, end, inside) for each non-empty piece."""
    cuts = sorted({a, b, min(max(lo, a), b), min(max(hi, a), b)})
    return [(x, y, lo <= x and y <= hi) for x, y in itertools.pairwise(cuts) if x < y]


class Placer:
    """The target's side of post-copy: takes the uffds from CRIU's restore, the pages from
    the source's push.Pusher, and puts the one into the other."""

    def __init__(self, images: Path, ranges: list[Range], stall_seconds: float = WAITS.page_stream_stall,
                 on_uffd=None, store: shadow.Store | None = None):
        """store: a fill's (the copy runs only once every page is on this host): the pages
        pre-copy by hashes left here, which the source names (HAVE), and those it pushes
        before the copy runs. Without one, post-copy: pages go in as they land."""
        self.images = images
        self.store = store
        self.stall_seconds = stall_seconds
        # on_uffd(pid, fd) for each uffd received, on_remap(index, from, to, length) for each move of
        # a range, index: the uffd's among those received: the guard holds a duplicate of each, and
        # what a successor needs to know of them
        self.on_uffd = on_uffd
        self.on_remap: Callable[[int, int, int, int], None] | None = None
        self._told = 0           # uffds received so far
        grouped = collections.defaultdict(list)
        for r in ranges:
            grouped[r.pid].append(r)
        self.lazy = {pid: _Lazy(rs) for pid, rs in grouped.items()}
        self.tasks: dict[int, list[_Task]] = {}
        self.asked: dict[int, set[int]] = collections.defaultdict(set)   # pages a fault asked for, on their way
        self.early: list[tuple[int, int, int, PageBytes]] = []   # pages that came before the restore was done
        self.stats = postcopy.Served()
        self.stage = Stage.RESTORING
        # Not stages of the pages (see the module's doc), so flags of their own:
        self.pushed_all = False   # the source has sent every page: what is missing is on its way
        self.running = False      # the copy runs: from now on the source must be heard from
        # Every frame of the source's push is read and every page it sent placed, so every
        # page still missing is one it named (HAVE), held in the store as it is now: from
        # here on a fault needs nothing from the source, and the copy may run (a fill).
        self.all_here = asyncio.Event()
        self.heard = 0.0
        self.status: int | None = None
        self._listener: socket.socket | None = None
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._ended = asyncio.Event()        # whole, and the source's status is here
        self._fills: asyncio.Queue = asyncio.Queue()    # store pages named, to place
        # A fill places its pages once the copy runs, not while it stands: until then the
        # CPUs belong to the pages still crossing, which the downtime waits for (on the lab's two
        # shared cores placing 2 GiB costs 2 to 3 s of CPU).
        self._filling = asyncio.Event()
        self._failed: asyncio.Future | None = None
        self._dropped: asyncio.Future | None = None    # set by drop_link(): the link in use goes
        self._whole = asyncio.Event()        # every page is in (CLOSE queued)
        self.relinks = 0                     # fresh links taken since the first

    @property
    def finished(self) -> bool:
        """The restore is done: every uffd is here, its ranges registered."""
        return self.stage is not Stage.RESTORING

    @property
    def whole(self) -> bool:
        """Every task has every page: CLOSE sent."""
        return self.stage is Stage.WHOLE

    def _advance(self, to: Stage) -> None:
        if to not in _NEXT[self.stage]:
            raise LivemigError(f"the placer cannot go from {self.stage.value} to {to.value}")
        self.stage = to

    # --- what the agent calls ------------------------------------------------------------------
    def listen(self) -> None:
        """Before the restore starts: CRIU's restore connects at once, and fails if nobody listens."""
        path = self.images / SOCKET
        path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        os.chmod(path, 0o600)
        s.listen(1)
        s.setblocking(False)
        self._listener = s

    def adopt(self, uffds: list[tuple[int, int]], remaps: list[tuple[int, int, int, int]]) -> None:
        """A successor's: the copy runs, its uffds come from the dead agent's guard (PID in
        the dump, uffd; remaps: (index in uffds, from, to, length), in the order they came),
        and which pages it lacks is not known: every lazy page is taken for missing (one
        there already is skipped as it lands). Its faults read and left unanswered by the
        dead agent are woken, to fault again."""
        for pid, fd in uffds:
            os.set_blocking(fd, False)
            lazy = self.lazy.get(pid) or _Lazy([])
            task = _Task(pid, fd, [bytearray(b"\1") * r.pages for r in lazy.ranges], lazy.pages,
                         forked=bool(self.tasks.get(pid)))
            self.tasks.setdefault(pid, []).append(task)
            task.index, self._told = self._told, self._told + 1
        tasks = [t for ts in self.tasks.values() for t in ts]
        for index, frm, to, length in remaps:
            tasks[index].remaps.append((frm, to, length))
        if self._listener is not None:
            self._listener.close()       # CRIU's restore is long over: nobody hands uffds over there
            self._listener = None
        self._advance(Stage.REPLAYING)
        self._advance(Stage.PLACING)
        self.resumed()
        for task in tasks:
            self._watch_uffd(task)
            with contextlib.suppress(uffd.Gone):     # its process exited meanwhile: nothing waits there
                uffd.wake_all(task.fd)

    def resumed(self) -> None:
        """The copy runs, so a silent source leaves it waiting on missing pages; a fill's
        threads start placing."""
        self.running, self.heard = True, asyncio.get_running_loop().time()
        self._filling.set()

    def close(self) -> None:
        """Let go of every uffd: call only once the copy is whole, or dead."""
        loop = asyncio.get_running_loop()
        for task in (t for ts in self.tasks.values() for t in ts):
            if task.fd >= 0:
                loop.remove_reader(task.fd)
                os.close(task.fd)
                task.fd = -1
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def run(self, remote: tuple | None, faults: tuple | None = None,
                   relink: Callable[[], Awaitable[Link]] | None = None) -> postcopy.Served:
        """Until every page is in and the source has said how its page server ended.
        faults: the stream of pages that faults wait for, if the source has one.

        relink: should the link break once the copy runs (postcopy.LinkLost), the next link,
        awaited while the copy's faults wait (they are asked again on it, and missing() is
        what its push brings); it raises once none will come. A copy that needs nothing more
        from the source (whole, or a fill's with every page here) goes on without one."""
        self._failed = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.TaskGroup() as tg:
                background = [tg.create_task(self._until_failed())]
                if self.store is not None:
                    background += [tg.create_task(self._filler()) for _ in range(SIZES.fill_threads)]
                handover = tg.create_task(self._handover())
                link: Link = (remote, faults) if remote is not None else await self._first(relink)
                while True:
                    try:
                        await self._over(*link)
                        break
                    except postcopy.LinkLost:
                        if self.whole or (self.running and self.store is not None and self.all_here.is_set()):
                            await self._whole.wait()     # nothing more is wanted from the source
                            break
                        if relink is None or not self.running:
                            raise
                    link = await relink()
                    self._relinked()
                await handover
                for t in background:
                    t.cancel()
        except BaseExceptionGroup as eg:
            raise postcopy.told(eg, "source") from None
        return self.stats

    @staticmethod
    async def _first(relink: Callable[[], Awaitable[Link]] | None) -> Link:
        """A successor's first link: the one its coordinator opens once it took the copy over."""
        if relink is None:
            raise LivemigError("no link to take the pages on")
        return await relink()

    async def _over(self, remote: tuple, faults: tuple | None) -> None:
        """One link's part: until every page is in and the source's status is here, or the
        link breaks (postcopy.LinkLost)."""
        r_reader, r_writer = remote
        out = streams.CompressedWriter(r_writer, streams.Meter(), 1)
        self._dropped = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(streams.Decompressed(r_reader, self.stats.received), acks=True))
                if faults is not None:
                    tg.create_task(self._receive(streams.Decompressed(faults[0], self.stats.received), acks=False))
                tg.create_task(self._send(out))
                watching = [tg.create_task(self._watch()), tg.create_task(self._until_dropped())]
                await self._ended.wait()
                for t in watching:
                    t.cancel()
        except BaseExceptionGroup as eg:
            raise postcopy.told(eg, "source") from None
        finally:
            r_writer.close()
            if faults is not None:
                faults[1].close()

    def drop_link(self) -> None:
        """The source is back on a fresh link: the one in use, which it gave up, goes (it may
        look alive from here: a cut link is silent)."""
        if self._dropped is not None and not self._dropped.done():
            self._dropped.set_result(None)

    async def _until_dropped(self) -> None:
        if self._dropped is not None:
            await self._dropped
            raise postcopy.LinkLost("the source came back on a fresh link")

    def _relinked(self) -> None:
        """A fresh link: what was queued for the old one goes (its acknowledgements count
        pages the new push never sent), and the pages the copy's faults wait for are asked
        again (their answers may have been lost with the old link)."""
        while not self._outbox.empty():
            self._outbox.get_nowait()
        self.pushed_all, self.status = False, None
        self.heard = asyncio.get_running_loop().time()
        self.relinks += 1
        for pid, asked in self.asked.items():
            lazy = self.lazy.get(pid)
            runs: list[list[int]] = []      # [range, first page, pages]: a fault's worth at most, in one range
            for page in sorted(asked):
                where = lazy.find(page) if lazy else None
                if where is None:
                    continue
                last = runs[-1] if runs else None
                if last and last[0] == where[0] and page == last[1] + last[2] * PAGE and last[2] < SIZES.fault_pages:
                    last[2] += 1
                else:
                    runs.append([where[0], page, 1])
            for _, first, n in runs:
                self._queue(FAULT, pid, first, n)

    def missing(self) -> list[Range]:
        """What the copy still lacks, for a fresh link's push: its runs of missing pages in
        any process of the copy, by the image's addresses. Runs past SIZES.rejoin_runs are
        joined across their smallest gaps (the pages between, in already, are skipped as
        they land): the list crosses in one control message."""
        runs: list[tuple[int, int, int, int]] = []      # (pid, range, first page, end page)
        for pid, lazy in self.lazy.items():
            tasks = [t for t in self.tasks.get(pid, []) if t.fd >= 0 and t.left]
            for ri in range(len(lazy.ranges)):
                holes = [t.holes[ri] for t in tasks if 1 in t.holes[ri]]
                if not holes:
                    continue
                # a child forked: what any of them lacks (a byte per page, 0 or 1: OR is union)
                lacks = holes[0] if len(holes) == 1 else bytearray(_or(holes).to_bytes(len(holes[0]), "big"))
                runs += [(pid, ri, a, b) for a, b in pagehash.runs(lacks, 0, len(lacks))]
        gap = 1
        while len(runs) > SIZES.rejoin_runs:
            runs, gap = _joined(runs, gap), gap * 2
        return [Range(pid, self.lazy[pid].ranges[ri].vaddr + a * PAGE, b - a) for pid, ri, a, b in runs]

    # --- the restore's side ----------------------------------------------------------------------
    async def _handover(self) -> None:
        if self.stage is not Stage.RESTORING:
            return      # a successor's: the uffds came from the guard (adopt)
        loop = asyncio.get_running_loop()
        listener = self._listener
        if listener is None:
            raise LivemigError("the placer was not listening (listen() first)")
        conn, _ = await loop.sock_accept(listener)
        listener.close()
        self._listener = None
        with conn:
            conn.setblocking(False)
            while True:
                (word,) = _WORD.unpack(await self._recv_exactly(conn, _WORD.size))
                if word == RESTORE_FINISHED:
                    break
                pid = word - (1 << 32) if word >= 1 << 31 else word
                if pid < 0:
                    continue          # a zombie: no memory to fill
                fd = await self._recv_uffd(conn)
                lazy = self.lazy.get(pid) or _Lazy([])
                task = _Task(pid, fd, [bytearray(b"\1") * r.pages for r in lazy.ranges], lazy.pages)
                self.tasks.setdefault(pid, []).append(task)
                self._tell_uffd(task)
                self._watch_uffd(task)      # the restore itself may fault (a task's stack, say)
        self._advance(Stage.REPLAYING)
        early, self.early = self.early, []
        for pid, vaddr, n, data in early:
            if self.store is not None and not self.running:
                self._fills.put_nowait((pid, vaddr, n, data))    # a view of the store already
            else:
                await self._arrived(pid, vaddr, n, data)
        if self.stage is Stage.REPLAYING:     # (else WHOLE already)
            self._advance(Stage.PLACING)
        self._maybe_all_here()
        self._check_whole()

    def _maybe_all_here(self) -> None:
        if self.pushed_all and self.stage in (Stage.PLACING, Stage.WHOLE):
            self.all_here.set()

    @staticmethod
    async def _recv_exactly(conn: socket.socket, n: int) -> bytes:
        """Never a byte more: the next one may carry a uffd, which a plain read would drop."""
        loop, buf = asyncio.get_running_loop(), b""
        while len(buf) < n:
            got = await loop.sock_recv(conn, n - len(buf))
            if not got:
                raise PageStreamError("CRIU's restore hung up before it was done")
            buf += got
        return buf

    @staticmethod
    async def _recv_uffd(conn: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(conn, 1, 1, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(conn.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(conn.fileno())
                continue
            if not fds:
                raise PageStreamError("CRIU's restore sent a PID without its userfaultfd" if msg else
                                      "CRIU's restore hung up before it was done")
            os.set_blocking(fds[0], False)
            return fds[0]

    # --- the source's side ---------------------------------------------------------------------
    async def _receive(self, inbound: streams.Decompressed, acks: bool) -> None:
        """Frames from one of the source's streams (acks: the pushing one, whose pages the
        source counts in its window until acknowledged)."""
        while True:
            try:
                kind, pid, vaddr, n = await frames.read(inbound, "the source's page stream")
            except EOFError:
                # the fault stream ends once the source has our CLOSE, maybe before the
                # pushing stream brings the status
                if self.status is None and not (not acks and self.whole):
                    raise postcopy.LinkLost("the source's page stream ended before every page was here") from None
                return
            self.heard = asyncio.get_running_loop().time()
            if kind == PAGES:
                data = await inbound.need(n * PAGE, "the source's page stream")
                if acks and not self.whole:
                    self._queue(ACK, pages=n)
                if self.store is not None and not self.running:
                    # a fill: the page waits in the store with the rest (a fault's first),
                    # and the next frame is read at once
                    try:
                        self.store.hold(pid, vaddr, data)
                    except (OSError, MemoryError) as e:
                        raise PageStreamError(f"no memory here for the copy's pages: {e}") from None
                    await self._held(pid, vaddr, n)
                else:
                    await self._arrived(pid, vaddr, n, data)
                await asyncio.sleep(0)      # the copy's faults, read by a callback, go between frames
            elif kind == HAVE:        # (not acknowledged: named, they took no room in the push's window)
                if self.store is None:
                    raise PageStreamError("the source named pages as held here, and this host holds none")
                await self._held(pid, vaddr, n)
                self.stats.pages_known += n
                await asyncio.sleep(0)
            elif kind == STATUS:
                self.status = n
                if self.whole:
                    self._ended.set()
            elif kind == PUSHED_ALL:
                self.pushed_all = True
                self._maybe_all_here()
            else:
                raise PageStreamError(f"unknown frame {kind} from the source")

    def _store(self) -> shadow.Store:
        """The store, where only a fill's frames lead."""
        if self.store is None:
            raise PageStreamError("the source named pages as held here, and this host holds none")
        return self.store

    async def _held(self, pid: int, vaddr: int, n: int) -> None:
        """Pages [vaddr, +n) of pid are in the store as they are now: to the fill."""
        try:
            pieces = self._store().pieces(pid, vaddr, n)
        except shadow.MissingPages as e:
            raise PageStreamError(str(e)) from None
        for first, count, view in pieces:
            if self.finished and not self.running:
                # read on at once: the copy may run once every frame is read
                self._fills.put_nowait((pid, first, count, view))
            else:
                await self._arrived(pid, first, count, view)

    def _queue(self, kind: int, pid: int = 0, vaddr: int = 0, pages: int = 0) -> None:
        self._outbox.put_nowait(frames.frame(kind, pid, vaddr, pages))

    async def _send(self, out: streams.CompressedWriter) -> None:
        """Frames to the source, as many at once as are waiting."""
        while True:
            waiting = [await self._outbox.get()]
            while not self._outbox.empty():
                waiting.append(self._outbox.get_nowait())
            await out.write(b"".join(waiting), flush=True)
            if any(frames.kind_of(f) == CLOSE for f in waiting):
                await out.close()
                return

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WAITS.page_stream_stall_poll)
            if (self.running and not (self.pushed_all or self.whole)
                    and loop.time() - self.heard > self.stall_seconds):
                raise postcopy.LinkLost(f"nothing from the source for {self.stall_seconds:.0f} s while "
                                      "pages were missing: the link is lost")

    async def _until_failed(self) -> None:
        if self._failed is not None:      # (made by run(), before this runs)
            await self._failed

    def _fail(self, e: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(e)

    # --- placing ---------------------------------------------------------------------------------
    async def _arrived(self, pid: int, vaddr: int, n: int, data: PageBytes) -> None:
        if self.whole:
            return
        asked = self.asked.get(pid)
        tasks = self.tasks.get(pid, [])
        if not self.finished:
            # The restore is under way: its tasks' memory may not be where it belongs yet
            # (CRIU moves it into place, then registers it), so only a page a fault waits
            # on goes in now, where it faulted; the rest wait for the end of the restore.
            # (looked at page by page only where a fault asked: a fill names its store's
            # gigabytes in a few frames, and the restore runs beside them)
            self.early.append((pid, vaddr, n, data))
            waited = sorted(a for a in asked if vaddr <= a < vaddr + n * PAGE) if asked else []
            for page in waited:
                self.asked[pid].discard(page)
                chunk = memoryview(data)[page - vaddr:page - vaddr + PAGE]
                for task in tasks:
                    await self._place(task, page, 1, chunk)
            return
        if asked:
            asked.difference_update(range(vaddr, vaddr + n * PAGE, PAGE))
        i = 0
        while i < len(tasks):      # a child forked meanwhile is appended, and gets them too
            await self._place(tasks[i], vaddr, n, data)
            i += 1
        self._check_whole()

    def _span(self, pid: int, vaddr: int, n: int) -> tuple[int, int, int] | None:
        """(range, first page, end page) of [vaddr, +n pages) in pid's lazy ranges; None if
        vaddr is in none. Every frame's pages lie in one range (the push reads by range)."""
        lazy = self.lazy.get(pid)
        where = lazy.find(vaddr) if lazy else None
        if lazy is None or where is None:
            return None
        ri, k = where
        return ri, k, min(k + n, lazy.ranges[ri].pages)

    async def _place(self, task: _Task, vaddr: int, n: int, data: PageBytes) -> None:
        span = self._span(task.pid, vaddr, n)
        if span is None:
            return
        ri, k, end = span
        view = memoryview(data)
        while task.fd >= 0:
            try:
                for a, b in pagehash.runs(task.holes[ri], k, end):
                    self._place_run(task, ri, a, b, view[(a - k) * PAGE:(b - k) * PAGE])
                return
            except uffd.Busy:
                # an event (a fork, say) is to be read first; then the runs are worked out
                # again, since it may have removed some of them
                self._drain(task)
                await asyncio.sleep(WAITS.uffd_busy_retry)
            except uffd.Gone:
                self._gone(task)

    async def _filler(self) -> None:
        await self._filling.wait()
        while True:
            await self._fill(*await self._fills.get())

    async def _fill(self, pid: int, first: int, n: int, view: memoryview) -> None:
        """Pages from the store into the copy (pre-copy by hashes), which may run by now:
        the copies in a thread, several at once; the bookkeeping here, between. A fault's
        page may come first (from the store too): the kernel then skips it here. Pages
        placed in every task, a child forked meanwhile included, the store lets their
        memory go."""
        span = self._span(pid, first, n)
        if span is not None:
            ri, k, end = span
            base = self.lazy[pid].ranges[ri].vaddr
            tasks, i = self.tasks.get(pid, []), 0
            while i < len(tasks):      # a child forked while a thread placed is appended
                task, i = tasks[i], i + 1
                runs = list(pagehash.runs(task.holes[ri], k, end)) if task.fd >= 0 else []
                if not runs:
                    continue
                if task.remaps:
                    await self._place(task, first, n, view)
                    continue
                # The thread's own descriptor of the uffd, closed by the thread: the task's may be
                # closed meanwhile on this thread (its process exited: _gone), and the thread then
                # placed through a closed descriptor (EBADF), or one reused since for another file.
                lent = _Lent(task.fd)
                try:
                    await asyncio.to_thread(_place_runs, lent, base, k, runs, view)
                except asyncio.CancelledError:
                    lent.close()
                    raise
                except (uffd.Busy, uffd.Gone):
                    await self._place(task, first, n, view)    # events first, on this thread
                    continue
                for a, b in runs:
                    self._mark(task, ri, a, b, placed=True)
        self._store().release(pid, first, n)
        self._check_whole()

    def _place_run(self, task: _Task, ri: int, a: int, b: int, chunk: memoryview) -> None:
        base = self.lazy[task.pid].ranges[ri].vaddr
        if not task.remaps:
            try:
                uffd.place(task.fd, base + a * PAGE, chunk)
            except uffd.Busy as e:
                self._mark(task, ri, a, a + e.done // PAGE, placed=True)
                raise
        else:
            for i in range(a, b):       # a moved range: page by page, each where it is now
                try:
                    uffd.place(task.fd, task.current(base + i * PAGE), chunk[(i - a) * PAGE:(i - a + 1) * PAGE])
                except uffd.Busy:
                    self._mark(task, ri, a, i, placed=True)
                    raise
        self._mark(task, ri, a, b, placed=True)

    def _mark(self, task: _Task, ri: int, a: int, b: int, placed: bool) -> None:
        """Pages a to b of range ri are no longer missing (placed, or no longer wanted)."""
        holes = task.holes[ri]
        missing = holes.count(1, a, b)
        if missing:
            holes[a:b] = bytes(b - a)
            task.left -= missing
            if placed and not task.forked:
                self.stats.pages_served += missing

    def _check_whole(self) -> None:
        if self.stage not in (Stage.REPLAYING, Stage.PLACING):
            return
        if all(t.left == 0 or t.fd < 0 for ts in self.tasks.values() for t in ts):
            self._advance(Stage.WHOLE)
            self._whole.set()
            self.all_here.set()     # the source may answer our CLOSE before it says PUSHED_ALL
            self._queue(CLOSE, pages=PS_IOV_CLOSE)
            if self.status is not None:
                self._ended.set()

    def _gone(self, task: _Task) -> None:
        """Its process has exited: nothing more goes to it."""
        if task.fd >= 0:
            asyncio.get_running_loop().remove_reader(task.fd)
            os.close(task.fd)
            task.fd = -1
        task.left = 0

    # --- the uffds' events -------------------------------------------------------------------------
    def _watch_uffd(self, task: _Task) -> None:
        asyncio.get_running_loop().add_reader(task.fd, self._readable, task)

    def _readable(self, task: _Task) -> None:
        try:
            self._drain(task)
            self._check_whole()
        except Exception as e:  # noqa: BLE001 -- a callback's exception would go nowhere: run() raises it
            self._fail(e)

    def _drain(self, task: _Task) -> None:
        """Every event the uffd holds now."""
        retry, task.retry = task.retry, []
        events: list[uffd.Event] = []
        try:
            for address in retry:
                self._fault(task, address, again=True)
            while task.fd >= 0 and (events := uffd.read_events(task.fd)):
                while events:
                    e = events.pop(0)
                    if isinstance(e, uffd.PageFault):
                        self._fault(task, e.address)
                    elif isinstance(e, uffd.Fork):
                        self._fork(task, e.uffd)
                    elif isinstance(e, uffd.Remap):
                        task.remaps.append((e.old, e.new, e.length))
                        if self.on_remap is not None:
                            self.on_remap(task.index, e.old, e.new, e.length)
                    elif isinstance(e, uffd.Removed):
                        self._removed(task, e)
        except uffd.Gone:         # a fault answered again, too, may find its process gone
            # A child it forked before it exited may live on: that fork's uffd, read already
            # (and so a descriptor of ours), is taken up all the same, or the child's faults
            # would wait for good and the descriptor stay open.
            for e in events:
                if isinstance(e, uffd.Fork):
                    self._fork(task, e.uffd)
            self._gone(task)
            return
        if task.retry:
            asyncio.get_running_loop().call_later(WAITS.uffd_busy_retry, self._readable, task)

    def _fault(self, task: _Task, address: int, again: bool = False) -> None:
        if not again:
            self.stats.requests += 1
        lazy = self.lazy.get(task.pid)
        spans = task.image(address, address + PAGE)
        vaddr = spans[0][0] if spans else -1
        where = lazy.find(vaddr) if lazy and spans else None
        try:
            if lazy is None or where is None:
                uffd.zero(task.fd, address)       # never written on the source
                return
            ri, k = where
            holes = task.holes[ri]
            if not holes[k]:
                uffd.wake(task.fd, address)       # placed while the fault was queued
                return
        except uffd.Busy:
            task.retry.append(address)
            return
        if self.store is not None and self.all_here.is_set():
            try:
                if self._from_store(task, ri, k):
                    return
            except uffd.Busy:
                task.retry.append(address)
                return
        if not self.finished and (chunk := self._early_page(task.pid, vaddr)) is not None:
            try:
                self._place_run(task, ri, k, k + 1, chunk)     # the restore faults on a page pushed ahead
            except uffd.Busy:
                task.retry.append(address)
            return
        asked = self.asked[task.pid]
        if vaddr in asked:
            return                                # on its way already
        # during the restore, the page alone: its neighbours may not be in place yet
        base, run, most = lazy.ranges[ri].vaddr, 0, SIZES.fault_pages if self.finished else 1
        while k + run < len(holes) and run < most and holes[k + run] \
                and base + (k + run) * PAGE not in asked:
            asked.add(base + (k + run) * PAGE)
            run += 1
        self.stats.requests_waited += 1
        self._queue(FAULT, task.pid, vaddr, run)

    def _early_page(self, pid: int, vaddr: int) -> memoryview | None:
        """The page at vaddr of pid, if it came before the restore was done (the latest)."""
        for p, first, n, data in reversed(self.early):
            if p == pid and first <= vaddr < first + n * PAGE:
                return memoryview(data)[vaddr - first:vaddr - first + PAGE]
        return None

    def _from_store(self, task: _Task, ri: int, k: int) -> bool:
        """A fault answered here, every frame read: the page and the missing ones after it,
        up to a fault's worth, from the store, ahead of the fill. False if the store no
        longer has the page (placed and let go before a child forked): the source's is asked."""
        base, holes = self.lazy[task.pid].ranges[ri].vaddr, task.holes[ri]
        run = 1
        while k + run < len(holes) and run < SIZES.fault_pages and holes[k + run]:
            run += 1
        try:
            pieces = self._store().pieces(task.pid, base + k * PAGE, run)
        except shadow.MissingPages:     # let go already: the source's page is asked for instead
            return False
        if not pieces or pieces[0][0] != base + k * PAGE:
            return False
        for first, count, view in pieces:
            a = (first - base) // PAGE
            self._place_run(task, ri, a, a + count, view)
        return True

    def _fork(self, parent: _Task, fd: int) -> None:
        os.set_blocking(fd, False)
        child = _Task(parent.pid, fd, [bytearray(h) for h in parent.holes], parent.left,
                      list(parent.remaps), forked=True)
        self.tasks[parent.pid].append(child)
        self._tell_uffd(child)
        self._watch_uffd(child)

    def _tell_uffd(self, task: _Task) -> None:
        task.index, self._told = self._told, self._told + 1
        if self.on_uffd is not None:
            self.on_uffd(task.pid, task.fd)

    def _removed(self, task: _Task, e: uffd.Removed) -> None:
        if not e.unmapped:
            # the range stays mapped: its faults must get the kernel's zeros from now on,
            # not come here for pages it threw away
            uffd.unregister(task.fd, e.start, e.end - e.start)
        lazy = self.lazy.get(task.pid)
        if lazy is None:
            return
        for start, end in task.image(e.start, e.end):
            for ri, a, b in lazy.overlapping(start, end):
                self._mark(task, ri, a, b, placed=False)

