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

Where the kernel tracks writes by userfaultfd write-protection (wptrack.py), the Tracker
watches each process: a round reads only what was written since the last, and the final
comparison reads only the pages not vouched for (Tracker.settle); digests stay what the
target holds, so a page the watch cannot vouch for is compared as before.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
from dataclasses import dataclass

import xxhash

from .. import proc
from ..options import SIZES
from . import wptrack
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


def tree_runs(pids: list[int]) -> list[tuple[int, int, int]]:
    """(pid, first, end) of every run of the tree's own data in its private memory
    (present_runs of private_ranges); a process that exits meanwhile has none."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm:
                for start, end in private_ranges(pid):
                    out += [(pid, a, b) for a, b in present_runs(pm.fileno(), start, end)]
        except OSError:     # it exited meanwhile: nothing of it to read
            continue
    return out


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
    __slots__ = ("clean", "digests", "have", "same")

    def __init__(self):
        self.digests = bytearray(CHUNK_PAGES * DIGEST)
        self.have = bytearray(CHUNK_PAGES)      # 1: the target holds this page
        # watched (wptrack.py): 1, read since its last protection; and, once settled, 1: the
        # frozen page is surely what the target holds (read since protected, not written since)
        self.clean = bytearray(CHUNK_PAGES)
        self.same: bytearray | None = None


class Tracker:
    """What the target holds, page by page: the digest of the bytes sent to it."""

    def __init__(self, seed: int | None = None, watching: bool = False):
        """watching: each process's writes are tracked (wptrack.py) where it can be watched."""
        self.seed = secrets.randbits(64) if seed is None else seed
        self._chunks: dict[tuple[int, int], _Chunk] = {}
        self.pages = 0          # pages the target holds
        self.watching = watching
        self.watches: dict[int, wptrack.Watch] = {}     # PID in the dump -> its watch
        self.unwatched: dict[int, str] = {}             # PID in the dump -> why it is compared by hash
        self.settled_pages = 0      # pages the final comparison takes as the target has them, unread

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
        that vanishes while it is read is skipped: the final dump sees what became of it.
        Watched, only what the kernel says was written is read."""
        self._watch(pid, vpid)
        buf = bytearray(SIZES.hash_read_pages * PAGE)
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm, \
                open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, \
                contextlib.ExitStack() as theirs:
            parents = None
            if parent:
                with contextlib.suppress(OSError):      # gone meanwhile: its child's pages are all its own
                    parents = theirs.enter_context(open(f"/proc/{parent}/pagemap", "rb", buffering=0))
            for start, end in private_ranges(pid):
                written = self._written(vpid, start, end)
                for a, b in [(start, end)] if written is None else written:
                    for first, last in present_runs(pm.fileno(), a, b, parents.fileno() if parents else None):
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
                            if written is not None:
                                self._mark(vpid, at, got // PAGE, 1)

    def _watch(self, pid: int, vpid: int) -> None:
        """pid watched from its first round on (in watches), unless it cannot be (in unwatched:
        compared by hash)."""
        if not self.watching or vpid in self.unwatched:
            return
        watch = self.watches.get(vpid)
        if watch is not None and watch.pid != pid:      # another process under that PID now
            self.watches.pop(vpid).close()
        if vpid not in self.watches:
            try:
                self.watches[vpid] = wptrack.watch(pid)
            except wptrack.Gone:
                pass        # nothing of it to read either: the final dump knows what became of it
            except (wptrack.Unwatched, OSError) as e:
                self.unwatched[vpid] = e.message if isinstance(e, wptrack.Unwatched) else e.strerror or str(e)

    def _written(self, vpid: int, start: int, end: int):
        """The runs of [start, end) written since the last round, no longer clean; None:
        all of it is to be compared by hash (unwatched), and none of it is clean."""
        watch = self.watches.get(vpid)
        if watch is None:
            return None     # (its clean bits are never set, nor read: settle() takes only watches)
        try:
            written = watch.written(start, end)
        except wptrack.Unwatched as e:
            self.unwatched[vpid] = e.message
            self.watches.pop(vpid).close()
            return None
        for a, b in [(start, end)] if written is None else written:
            self._mark(vpid, a, (b - a) // PAGE, 0)
        return written

    def _mark(self, vpid: int, vaddr: int, n: int, clean: int) -> None:
        """Pages [vaddr, +n) of vpid: clean (read since protected) or not."""
        for _, chunk, k, take in spans(vaddr, n):
            c = self._chunks.get((vpid, chunk))
            if c is not None:
                c.clean[k:k + take] = bytes([clean]) * take

    def settle(self) -> None:
        """The tree frozen for its final dump: which pages surely hold what the target holds,
        so that the final comparison need not read them (known)."""
        for vpid, watch in self.watches.items():
            for start, end in private_ranges(watch.pid) if os.path.exists(f"/proc/{watch.pid}") else []:
                for a, b in watch.unchanged(start, end):
                    for _, chunk, k, take in spans(a, (b - a) // PAGE):
                        c = self._chunks.get((vpid, chunk))
                        if c is None:
                            continue
                        if c.same is None:
                            c.same = bytearray(CHUNK_PAGES)
                        # (bytes of 0 and 1: their AND, a page at a time, in one integer operation)
                        c.same[k:k + take] = (int.from_bytes(c.clean[k:k + take], "little")
                                              & int.from_bytes(c.have[k:k + take], "little")).to_bytes(take, "little")
        # counted once it is all set: a page two runs named (seen once: a move counted more pages
        # vouched for than its tree had) is one page
        self.settled_pages = sum(c.same.count(1) for c in self._chunks.values() if c.same is not None)

    def vouched(self, vpid: int, vaddr: int, n: int) -> int:
        """How many of pages [vaddr, +n) of vpid surely hold what the target holds (known)."""
        count = 0
        for _, chunk, k, take in spans(vaddr, n):
            c = self._chunks.get((vpid, chunk))
            if c is not None and c.same is not None:
                count += c.same.count(1, k, k + take)
        return count

    def known(self, vpid: int, vaddr: int, n: int) -> list[tuple[int, int, bool]]:
        """[vaddr, +n pages) of vpid as runs (first, pages, surely as the target has it)."""
        out: list[tuple[int, int, bool]] = []
        for i, chunk, k, take in spans(vaddr, n):
            c = self._chunks.get((vpid, chunk))
            if c is None or c.same is None:
                _add(out, vaddr + i * PAGE, take, False)
                continue
            at = k
            for a, b in runs(c.same, k, k + take):
                if a > at:
                    _add(out, vaddr + (i + at - k) * PAGE, a - at, False)
                _add(out, vaddr + (i + a - k) * PAGE, b - a, True)
                at = b
            if at < k + take:
                _add(out, vaddr + (i + at - k) * PAGE, k + take - at, False)
        return out

    def close(self) -> None:
        """Every watch ends: the workload's memory is as it was, unprotected."""
        for watch in self.watches.values():
            watch.close()
        self.watches.clear()
