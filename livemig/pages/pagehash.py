"""Pre-copy without dirty-page tracking: a page changed if its content did.

CRIU's pre-dump needs soft-dirty bits, which AArch64 kernels and kernels built without
CONFIG_MEM_SOFT_DIRTY lack; there no tool pre-copies a process. livemig reads the
running tree's memory itself (/proc/PID/mem, only the pages /proc/PID/pagemap says are
there), keeps a digest of every page it sent, and in each later round sends only the
pages whose digest changed. The target keeps what it got (shadow.py). At the final,
lazy dump every page CRIU holds is compared with the digest of what the target holds,
and only the differing ones cross the link (push.Pusher, the HAVE frame).

Reading a page while the program writes it is harmless: the digest is of the bytes
sent, so the target holds exactly what the table says, and the final comparison, made
on the frozen tree's pages, catches every page that differs from them.

The digest is XXH3-128 with a seed drawn per migration: 7 GB/s here against 1 GB/s for
SHA-1, and the final comparison is downtime. A collision would leave a stale page in the
copy; by chance that is 2^-128 per page, and the secret seed keeps a program's input
from being crafted to collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import struct
from dataclasses import dataclass

import xxhash

from .. import proc
from ..options import SIZES
from .pagemap import PAGE

CHUNK_SHIFT = 21                  # the table's unit: 2 MiB of address space
CHUNK_PAGES = 1 << (CHUNK_SHIFT - 12)
DIGEST = 16
_PM_PRESENT, _PM_SWAPPED, _PM_FILE = 1 << 63, 1 << 62, 1 << 61
_PM_PFN = (1 << 55) - 1
_NEVER = {"[vsyscall]", "[vvar]", "[vvar_vclock]", "[vdso]", "[uprobes]"}


@dataclass(frozen=True)
class Run:
    """Pages that changed since the target got them: n pages of process vpid (its PID
    as the dump and the target know it) from vaddr on, and their bytes."""
    vpid: int
    vaddr: int
    pages: int
    data: bytes


def private_ranges(pid: int) -> list[tuple[int, int]]:
    """The writable private mappings: what CRIU dumps as the process's own pages. Shared
    and read-only mappings come from files or are dumped apart; the kernel's own
    (vdso, vvar) are not the program's."""
    return [(start, end) for start, end, perms, name in proc.mappings(pid)
            if perms[1] == "w" and perms[3] == "p" and name not in _NEVER]


def present_runs(pagemap_fd: int, start: int, end: int, parents_fd: int | None = None):
    """(first, end) addresses of the runs of pages in [start, end) that hold the process's
    own data (present or swapped, and not a file's page): never-touched pages are not
    read, so a large reservation costs nothing. parents_fd: its parent's pagemap, whose
    pages it shares copy-on-write (the same frame there) are its parent's to send: the
    final dump names them so (cow.py)."""
    first = None
    step = 64 << 10     # pagemap entries per read: 256 MiB of address space
    for base in range(start, end, step * PAGE):
        n = min(step, (end - base) // PAGE)
        raw = os.pread(pagemap_fd, n * 8, base // PAGE * 8)
        theirs = struct.unpack(f"<{len(raw) // 8}Q", os.pread(parents_fd, len(raw), base // PAGE * 8).ljust(
            len(raw), b"\0")) if parents_fd is not None else None
        for i, e in enumerate(struct.unpack(f"<{len(raw) // 8}Q", raw)):
            mine = e & (_PM_PRESENT | _PM_SWAPPED) and not e & _PM_FILE and not (
                theirs and e & _PM_PRESENT and e & _PM_PFN and e & _PM_PFN == theirs[i] & _PM_PFN
                and theirs[i] & _PM_PRESENT)
            if mine and first is None:
                first = base + i * PAGE
            elif not mine and first is not None:
                yield first, base + i * PAGE
                first = None
        if len(raw) < n * 8:
            break
    if first is not None:
        yield first, end


def runs(flags: bytearray, a: int, b: int):
    """The runs (start, end) of the set bytes in flags[a:b] (one per page: missing, held...)."""
    count = flags.count(1, a, b)
    if count == b - a:
        yield a, b
    elif count:
        start = None
        for i in range(a, b):
            if flags[i] and start is None:
                start = i
            elif not flags[i] and start is not None:
                yield start, i
                start = None
        if start is not None:
            yield start, b


def spans(vaddr: int, n: int):
    """[vaddr, +n pages) cut where the 2 MiB chunks end: (pages before it, chunk number,
    first page in the chunk, pages). The table here and the target's store are both kept
    by chunk."""
    i = 0
    while i < n:
        addr = vaddr + i * PAGE
        k = (addr >> 12) & (CHUNK_PAGES - 1)
        take = min(n - i, CHUNK_PAGES - k)
        yield i, addr >> CHUNK_SHIFT, k, take
        i += take


def _add(out: list[tuple[int, int, bool]], addr: int, pages: int, changed: bool) -> None:
    """pages from addr onto the runs in out: the last one grows if it ends there alike."""
    if out and out[-1][2] == changed and out[-1][0] + out[-1][1] * PAGE == addr:
        out[-1] = (out[-1][0], out[-1][1] + pages, changed)
    else:
        out.append((addr, pages, changed))


class _Chunk:
    __slots__ = ("digests", "have")

    def __init__(self):
        self.digests = bytearray(CHUNK_PAGES * DIGEST)
        self.have = bytearray(CHUNK_PAGES)      # 1: the target holds this page


class Tracker:
    """What the target holds, page by page: the digest of the bytes sent to it."""

    def __init__(self, seed: int | None = None):
        self.seed = secrets.randbits(64) if seed is None else seed
        self._chunks: dict[tuple[int, int], _Chunk] = {}
        self.pages = 0          # pages the target holds

    def changed(self, vpid: int, vaddr: int, data, record: bool = True) -> list[tuple[int, int, bool]]:
        """data (whole pages from vaddr) against what the target holds, as runs
        (first address, pages, changed). record: the changed pages are being sent, so
        the table takes their new digests."""
        view, seed = memoryview(data), self.seed
        out: list[tuple[int, int, bool]] = []
        for i, chunk, k, take in spans(vaddr, len(view) // PAGE):
            addr = vaddr + i * PAGE
            c = self._chunks.get((vpid, chunk))
            if c is None and record:
                c = self._chunks[(vpid, chunk)] = _Chunk()
            digests = [xxhash.xxh3_128_digest(view[p:p + PAGE], seed)
                       for p in range(i * PAGE, (i + take) * PAGE, PAGE)]
            if c is not None and c.have.count(1, k, k + take) == take \
                    and c.digests[k * DIGEST:(k + take) * DIGEST] == b"".join(digests):
                _add(out, addr, take, False)   # the common case at the final dump: all as the target has it
                continue
            for j, d in enumerate(digests):
                at = (k + j) * DIGEST
                same = c is not None and c.have[k + j] and c.digests[at:at + DIGEST] == d
                if not same and record and c is not None:     # (recording, c was made above)
                    c.digests[at:at + DIGEST] = d
                    if not c.have[k + j]:
                        c.have[k + j] = 1
                        self.pages += 1
                _add(out, addr + j * PAGE, 1, not same)
        return out

    def compared(self, vpid: int, vaddr: int, data) -> list[tuple[int, int, bool, memoryview]]:
        """changed(), recording nothing, each run with its bytes in data: what the final
        comparison sends (the changed runs) and names (the rest)."""
        view = memoryview(data)
        return [(first, n, changed, view[first - vaddr:first - vaddr + n * PAGE])
                for first, n, changed in self.changed(vpid, vaddr, view, record=False)]

    def scan(self, pid: int, vpid: int, parent: int | None = None):
        """Run for each stretch of pid's private memory that changed since the last scan
        (everything, the first time), but for what it shares with parent (its parent in the
        tree, if any); the table takes the new digests as they are handed out. A mapping
        that vanishes while it is read is skipped: the final dump sees what became of it."""
        buf = bytearray(SIZES.hash_read_pages * PAGE)
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm, \
                open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, \
                contextlib.ExitStack() as theirs:
            parents = None
            if parent:
                with contextlib.suppress(OSError):      # gone meanwhile: its child's pages are all its own
                    parents = theirs.enter_context(open(f"/proc/{parent}/pagemap", "rb", buffering=0))
            for start, end in private_ranges(pid):
                for first, last in present_runs(pm.fileno(), start, end, parents.fileno() if parents else None):
                    for at in range(first, last, SIZES.hash_read_pages * PAGE):
                        size = min(SIZES.hash_read_pages * PAGE, last - at)
                        try:
                            got = os.preadv(mem.fileno(), [memoryview(buf)[:size]], at)
                        except OSError:     # unmapped meanwhile: skipped, as the docstring says
                            continue
                        got -= got % PAGE
                        view = memoryview(buf)[:got]
                        for addr, n, changed in self.changed(vpid, at, view):
                            if changed:
                                off = addr - at
                                yield Run(vpid, addr, n, bytes(view[off:off + n * PAGE]))


# --- the final comparison, in two processes ---------------------------------------------------
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
        view = memoryview(buf)[:n * PAGE]
        try:
            got = os.preadv(memory[vpid], [view], vaddr)
        except OSError:
            got = 0
        parts: list[bytes | memoryview]
        if got != n * PAGE:
            parts = [struct.pack("<I", _UNREAD)]
        else:
            runs = tracker.compared(vpid, vaddr, view)
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
