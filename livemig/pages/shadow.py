"""The target's copy of what pre-copy by page hashes sent (pagehash.py), until the final
copy places it.

In the agent's own memory, in 2 MiB slots, one per 2 MiB of a process's address space
that held a sent page: anonymous mappings, so a slot takes memory only for the pages
written into it, and nothing of it touches a disk; it goes with the agent. Placing from
a file instead cost a page fault per page while the workload stood still: the 512 MiB
fill took 2.4 s from a file, and the store's writes during pre-copy twice as long.
The target needs room for the workload twice over while its copy fills.

A page pushed just before the copy runs (stop-and-copy into memory) arrives in a buffer
of its own: a frame that covers a whole slot is kept as it came (hold), since copying it
into a slot cost the target as much CPU again (1.9 s at 2 GiB) while the workload stood.
"""

from __future__ import annotations

import mmap

from ..errors import LivemigError
from . import pagehash
from .pagehash import CHUNK_PAGES
from .pagemap import PAGE

SLOT = CHUNK_PAGES * PAGE


class MissingPages(LivemigError):
    """The source named pages as held here that never came (Store.pieces)."""


class Store:
    """The pages pre-copy by hashes sent, and those pushed before the copy runs, by process
    and address, until placed."""

    def __init__(self) -> None:
        # a slot: written into (an mmap), or a whole slot's frame kept as it came (a view)
        self._slots: dict[tuple[int, int], mmap.mmap | memoryview] = {}
        self._have: dict[tuple[int, int], bytearray] = {}
        self._placed: dict[tuple[int, int], bytearray] = {}   # released: in the copy already
        self.pages = 0        # pages held

    @staticmethod
    def _spans(pid: int, vaddr: int, n: int):
        """pagehash.spans, keyed as the slots are."""
        for i, chunk, k, take in pagehash.spans(vaddr, n):
            yield i, (pid, chunk), k, take

    def hold(self, pid: int, vaddr: int, data) -> None:
        """write(), keeping data itself where it fills a slot no page was written in."""
        view = memoryview(data)
        for i, key, k, take in self._spans(pid, vaddr, len(view) // PAGE):
            piece = view[i * PAGE:(i + take) * PAGE]
            if take == CHUNK_PAGES and key not in self._slots:
                self._slots[key] = piece
                self._have[key] = bytearray(b"\1" * CHUNK_PAGES)
                self.pages += CHUNK_PAGES
            else:
                self._write(key, k, take, piece)

    def write(self, pid: int, vaddr: int, data) -> None:
        """Pages from vaddr of process pid (its PID in the dump), whole."""
        view = memoryview(data)
        for i, key, k, take in self._spans(pid, vaddr, len(view) // PAGE):
            self._write(key, k, take, view[i * PAGE:(i + take) * PAGE])

    def _write(self, key: tuple[int, int], k: int, take: int, piece: memoryview) -> None:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = mmap.mmap(-1, SLOT)
            self._have.setdefault(key, bytearray(CHUNK_PAGES))
        elif not isinstance(slot, mmap.mmap):
            kept = slot
            slot = self._slots[key] = mmap.mmap(-1, SLOT)
            slot[:] = kept
        slot[k * PAGE:(k + take) * PAGE] = piece
        have = self._have[key]
        self.pages += take - have.count(1, k, k + take)
        have[k:k + take] = b"\1" * take

    def pieces(self, pid: int, vaddr: int, n: int) -> list[tuple[int, int, memoryview]]:
        """Pages [vaddr, +n) of pid as (first address, pages, bytes) pieces, at most one per
        slot and stretch, without the pages already in the copy (released): the source
        names a page again when the copy faulted on it while it was on its way.
        MissingPages if any of them never came."""
        out = []
        for i, key, k, take in self._spans(pid, vaddr, n):
            have = self._have.get(key) or bytearray(CHUNK_PAGES)
            held = 0
            for a, b in pagehash.runs(have, k, k + take):
                out.append((vaddr + (i + a - k) * PAGE, b - a, memoryview(self._slots[key])[a * PAGE:b * PAGE]))
                held += b - a
            if held < take:
                placed = self._placed.get(key) or bytearray(CHUNK_PAGES)
                for j in range(k, k + take):
                    if not have[j] and not placed[j]:
                        raise MissingPages(f"pages of PID {pid} at {vaddr + (i + j - k) * PAGE:#x} were never "
                                           "stored here")
        return out

    def release(self, pid: int, vaddr: int, n: int) -> None:
        """Pages [vaddr, +n) are in the copy: their memory goes back now, not at the end, so
        the target holds the workload about once, not twice, by the end of the fill (and the
        copy's next pages may be the ones just freed, which a VM's host backs already)."""
        for _, key, k, take in self._spans(pid, vaddr, n):
            have = self._have.get(key)
            if have is not None:
                self.pages -= have.count(1, k, k + take)
                have[k:k + take] = bytes(take)
                self._placed.setdefault(key, bytearray(CHUNK_PAGES))[k:k + take] = b"\1" * take
                slot = self._slots.get(key)
                if isinstance(slot, mmap.mmap):
                    slot.madvise(mmap.MADV_DONTNEED, k * PAGE, take * PAGE)
                elif slot is not None and not have.count(1):
                    del self._slots[key]        # a frame kept whole goes once all of it is in

    def close(self) -> None:
        """The memory goes; a slot still viewed (a page the placer holds) goes with its view."""
        for slot in self._slots.values():
            try:
                if isinstance(slot, mmap.mmap):
                    slot.close()
            except BufferError:     # still viewed: its memory goes with the last view, as said above
                pass
        self._slots.clear()
        self._have.clear()
        self._placed.clear()
