"""The final comparison of pre-copy by page hashes (pagehash.py): the frozen tree's pages
against what the target holds, read (but for those a watch vouches for) and hashed in two
processes, the coordinator and a forked Comparer, each with half of the pieces."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct

from .pagehash import Tracker
from .pagemap import PAGE


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
