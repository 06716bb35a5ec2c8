"""The final comparison of pre-copy by page hashes (pagehash.py): the frozen tree's pages
against what the target holds, read (but for those a watch vouches for) and hashed in two
processes, the coordinator and a forked Comparer, each with half of the pieces."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import signal
import struct
from typing import NamedTuple

from ..options import SIZES
from .pagehash import Tracker
from .pagemap import PAGE, Range
from .postcopy import chunks


class Piece(NamedTuple):
    """Pages [vaddr, +pages) of pid (its PID in the dump), as a push takes them."""
    pid: int
    vaddr: int
    pages: int
    vouched: int = 0    # of them, those the watch vouches for: never read (all of them: only named)

    @property
    def named(self) -> bool:
        return self.vouched == self.pages


def planned(tracker: Tracker, ranges: list[Range], slot: int, most: int):
    """A fill's pieces, in the push's order (postcopy.chunks: a store slot at most), as Pieces:
    a stretch of whole pieces of one lazy range that the watch vouches for goes as one, named
    in one frame (up to most pages), and so costs the frozen tree's downtime nothing per slot
    (measured at 2 GiB: 527 000 pages named a slot at a time were 1024 frames read, compared
    and placed in the store, while the restore ran beside them on the same two cores). Never
    across ranges: the target places a frame's pages in one (placer.py)."""
    settled = tracker.settled_pages > 0
    for r in sorted(ranges, key=lambda r: r.pages):
        stretch: Piece | None = None
        for pid, vaddr, n in chunks([r], slot, aligned=True):
            vouched = tracker.vouched(pid, vaddr, n) if settled else 0
            if vouched == n and stretch is not None and stretch.pages + n <= most:
                stretch = Piece(pid, stretch.vaddr, stretch.pages + n, stretch.pages + n)
                continue
            if stretch is not None:
                yield stretch
                stretch = None
            if vouched == n:
                stretch = Piece(pid, vaddr, n, n)
            else:
                yield Piece(pid, vaddr, n, vouched)
        if stretch is not None:
            yield stretch


def read_compared(tracker: Tracker, fd: int, vpid: int, vaddr: int, n: int, buf: bytearray):
    """Pages [vaddr, +n) of vpid, read through fd (its /proc/PID/mem) into buf but for those the
    tracker vouches for, as runs (first, pages, changed, their bytes) against what the target
    holds; None if they cannot all be read."""
    out = []
    view = memoryview(buf)
    for first, count, same in tracker.known(vpid, vaddr, n):
        if same:
            out.append((first, count, False, view[:0]))
            continue
        part = view[first - vaddr:first - vaddr + count * PAGE]
        try:
            got = os.preadv(fd, [part], first)
        except OSError:
            return None
        if got != count * PAGE:
            return None
        out += tracker.compared(vpid, first, part)
    return out


class Shared:
    """A fill's final comparison in two processes: past the first pieces, every other piece
    to read goes to a forked Comparer, and its runs come back in the push's order."""

    def __init__(self):
        self._comparer: Comparer | None = None
        self._theirs: collections.deque[Piece] = collections.deque()    # the comparer's pieces, in order

    def plan(self, tracker: Tracker, pieces, memory: dict[int, int]):
        """pieces, in their order, as they are to go: the comparer forked for its share."""
        pieces = list(pieces)
        read = [piece for piece in pieces if not piece.named and piece.pid in memory]
        # The first pieces (the smallest ranges, which the restore itself may touch) go
        # at once from here: the comparer starts a moment later. Those a watch vouches
        # for whole are only named; the pages it vouches for in the rest are not read.
        first, pages = 0, 0
        while first < len(read) and pages < SIZES.fill_compared_here_pages:
            pages += read[first].pages - read[first].vouched
            first += 1
        theirs = read[first + 1::2]
        if theirs:
            try:
                self._comparer = Comparer(tracker, [piece[:3] for piece in theirs], memory)
                self._theirs = collections.deque(theirs)
            except OSError:
                pass        # no fork: all of it here
        return iter(pieces)

    async def there(self, piece: Piece):
        """The piece's runs as the comparer found them, if the piece is its; else None (and
        if it could not read it, or is gone: the piece is read here)."""
        if not self._theirs or self._comparer is None or self._theirs[0] != piece:
            return None
        self._theirs.popleft()
        try:
            return await self._comparer.next()
        except EOFError:
            self._theirs.clear()        # the rest are compared here
            return None

    def close(self) -> None:
        if self._comparer is not None:
            self._comparer.close()
            self._comparer = None


_LEN = struct.Struct("<Q")
_RUN = struct.Struct("<QI?")
_UNREAD = 0xFFFFFFFF      # in place of a count of runs: the piece could not be read there


class Comparer:
    """Half of a final comparison, in a process of its own: the frozen tree's memory read
    and hashed at twice the speed on two CPUs. Both are bound by the CPU (measured on
    2 GiB: read in 1.25 s, hashed in 0.67 s, the whole comparison 2.4 s of the 4 s of
    downtime), and in one Python process the GIL lets only one run at once. A fork
    inherits the table as it is, with nothing copied.

    The child reads its pieces in order and hands back, for each, its runs (first
    address, pages, changed) and the changed pages' bytes; the parent takes them in the
    same order."""

    def __init__(self, tracker: Tracker, pieces: list[tuple[int, int, int]], memory: dict[int, int]):
        r, w = os.pipe()
        # a piece's changed pages at once; refused (past the system's pipe-max-size), the pipe
        # only takes them in smaller bites
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            raise
        if pid == 0:         # only what follows runs here: no event loop, no import
            code = 1
            try:
                os.close(r)
                _compare_into(w, tracker, pieces, memory)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        os.set_blocking(r, False)
        # The pipe's end is read here with the loop's reader callbacks, never handed to a
        # transport: one owner, closed once by close(). (Handed to connect_read_pipe through a
        # file object, a connect cut short by a rollback left uvloop closing the descriptor
        # under that object: EBADF when it was collected, or a reused descriptor closed.)
        self.pid, self._fd = pid, r
        self._buf = bytearray()

    async def next(self) -> list[tuple[int, int, bool, memoryview]] | None:
        """The next piece's runs, each with the bytes of its pages if changed; None if the
        child could not read it (the caller reads it itself). EOFError: the child is gone."""
        (size,) = _LEN.unpack(await self._read(_LEN.size))
        blob = memoryview(await self._read(size))
        (count,) = struct.unpack_from("<I", blob)
        if count == _UNREAD:
            return None
        out, at = [], 4
        for _ in range(count):
            first, pages, changed = _RUN.unpack_from(blob, at)
            at += _RUN.size
            data = blob[at:at + pages * PAGE] if changed else blob[at:at]
            at += len(data)
            out.append((first, pages, changed, data))
        return out

    async def _read(self, n: int) -> bytes:
        """The pipe's next n bytes; EOFError if the child ends before them."""
        loop = asyncio.get_running_loop()
        while len(self._buf) < n:
            try:
                data = os.read(self._fd, 1 << 22)
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(self._fd, _set, readable)
                try:
                    await readable
                finally:
                    loop.remove_reader(self._fd)
                continue
            if not data:
                raise EOFError("the comparing process ended early")
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):     # it has exited already
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):      # reaped already: nothing left of it
            os.waitpid(self.pid, 0)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _set(f: asyncio.Future) -> None:
    if not f.done():
        f.set_result(None)


def _compare_into(w: int, tracker: Tracker, pieces: list[tuple[int, int, int]], memory: dict[int, int]) -> None:
    buf = bytearray(max((n for _, _, n in pieces), default=0) * PAGE)
    for vpid, vaddr, n in pieces:
        runs = read_compared(tracker, memory[vpid], vpid, vaddr, n, buf)
        parts: list[bytes | memoryview]
        if runs is None:
            parts = [struct.pack("<I", _UNREAD)]
        else:
            parts = [struct.pack("<I", len(runs))]
            for first, count, changed, data in runs:
                parts.append(_RUN.pack(first, count, changed))
                if changed:
                    parts.append(data)
        blob = b"".join(parts)
        _write_all(w, _LEN.pack(len(blob)) + blob)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
