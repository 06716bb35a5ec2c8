"""The pages a lazy dump wrote into its images that CRIU meant to leave lazy, left lazy.

CRIU's lazy dump leaves every page of a private anonymous mapping to be served later,
but for the page under each thread's stack pointer (criu/mem.c, is_stack). Its test of
that page has compared the offsets within the page, not the pages, since CRIU 3.13
(commit 1bc68dd87, "lazy-pages: fix stack detection"; unchanged in 4.2): a stack pointer
off a page boundary matches no page, and one on a boundary (a thread frozen with its
stack 4 KiB-aligned: one dump in 256 at x86-64's 16-byte alignment) matches every page
of the tree's process. That process's whole memory then lands in the image files while it
is frozen: a 1 GiB service whose post-copy downtime is a tenth of a second took seconds,
its pages read and written twice before the copy could run. The lab's post-copy tests met
it about one move in a hundred.

It can often be foreseen (slips): a thread that waits in a system call as the dump freezes it
has its stack pointer where /proc/PID/task/TID/syscall shows it; the downtime's estimate counts
CRIU's writing (source/downtime.py), and the images go into memory, where it writes faster.

So, the tree still frozen, before anything reads the lazy ranges (the copy-on-write
sharing, pages/cow.py; the pushes): every page CRIU wrote within a mapping it would make
lazy (vma_entry_can_be_lazy: private, anonymous, not locked, not huge TLB, not the vDSO's)
becomes a lazy page again, its bytes out of the pages file. That is the dump CRIU makes
in every other case, the stack's own page lazy too, as every lazy restore since 3.13 has
had it. The pages the tree holds are as dumped (it stays frozen until the commit), and are
read there, as every other lazy page is.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .. import protobuf
from ..errors import LivemigError
from . import pagemap
from .pagemap import PAGE, PE_LAZY, PE_PARENT, PE_PRESENT, Entry

MM_MAGIC = 0x57492820
# include/uapi/asm-generic/mman*.h: the same on x86-64 and arm64
MAP_PRIVATE, MAP_ANONYMOUS, MAP_LOCKED, MAP_HUGETLB = 0x02, 0x20, 0x2000, 0x40000
# criu/include/image.h: a VmaEntry's status
VMA_AREA_VSYSCALL, VMA_AREA_VDSO, VMA_AREA_VVAR = 1 << 2, 1 << 3, 1 << 12
_U32 = struct.Struct("<I")
_COPY_PAGES = 256       # the kept pages copied so many at a time


# --- foreseen, before the freeze ---------------------------------------------------------------
def slips(pids: list[int]) -> list[int]:
    """The tree's processes whose whole private memory CRIU's lazy dump would write into its
    images were it to freeze them now (the module's docstring says why): one of its threads waits
    (in a system call, or stopped) with its stack pointer on a page boundary, as
    /proc/PID/task/TID/syscall shows it. A thread that runs is not foreseen: where its stack
    pointer is at the freeze is chance (about one time in 256)."""
    out = []
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:     # it exited meanwhile: nothing of it to dump
            continue
        for tid in tids:
            try:
                words = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            except OSError:     # exited meanwhile, or not ours to read: not foreseen
                continue
            # "NR args... sp pc" in a system call, "-1 sp pc" blocked outside one, "running"
            sp = int(words[-2], 16) if len(words) >= 3 and words[0] != "running" else 1
            if sp % PAGE == 0:
                out.append(pid)
                break
    return out


# --- undone, the tree frozen -------------------------------------------------------------------
class RelazyError(LivemigError):
    """A lazy dump's images that cannot be read or rewritten. No phase: the final dump's."""


def lazy_mappings(mm_image: bytes) -> list[tuple[int, int]]:
    """[start, end) of every mapping in an mm-PID.img whose pages CRIU's lazy dump leaves
    lazy (criu/include/vma.h, vma_entry_can_be_lazy), by address."""
    if len(mm_image) < 12 or _U32.unpack_from(mm_image, 0)[0] != pagemap.IMG_COMMON_MAGIC \
            or _U32.unpack_from(mm_image, 4)[0] != MM_MAGIC:
        raise RelazyError("not a CRIU mm image")
    (size,) = _U32.unpack_from(mm_image, 8)
    message = mm_image[12:12 + size]
    if len(message) != size:
        raise RelazyError("a truncated mm image")
    out = []
    try:
        for num, vma in protobuf.fields(message):
            if num != 14 or not isinstance(vma, bytes):      # MmEntry.vmas
                continue
            f = {n: v for n, v in protobuf.fields(vma) if isinstance(v, int)}
            flags, status = f.get(6, 0), f.get(7, 0)
            if flags & MAP_ANONYMOUS and flags & MAP_PRIVATE and not flags & (MAP_LOCKED | MAP_HUGETLB) \
                    and not status & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL):
                out.append((f.get(1, 0), f.get(2, 0)))
    except ValueError as e:
        raise RelazyError(f"a malformed mm image: {e}") from None
    return sorted(out)


def split(written: list[Entry], lazy: list[tuple[int, int]]) -> tuple[list[Entry], list[bool]]:
    """written with its present pages inside lazy made lazy: the entries, and for each
    present page of written, in order, whether its bytes stay in the pages file."""
    out: list[Entry] = []
    kept: list[bool] = []
    for e in written:
        if e.flags & (PE_LAZY | PE_PARENT) or not e.flags & PE_PRESENT:
            out.append(e)
            continue
        at, end = e.vaddr, e.vaddr + e.pages * PAGE
        while at < end:
            inside = next(((s, t) for s, t in lazy if s <= at < t), None)
            if inside is not None:
                upto = min(end, inside[1])
                flags = PE_LAZY
            else:
                upto = min([end, *(s for s, _ in lazy if s > at)])
                flags = e.flags
            n = (upto - at) // PAGE
            out.append(Entry(at, n, flags))
            kept += [flags == e.flags] * n
            at = upto
    return _merged(out), kept


def _merged(entries: list[Entry]) -> list[Entry]:
    out: list[Entry] = []
    for e in entries:
        last = out[-1] if out else None
        if last is not None and last.flags == e.flags == PE_LAZY and last.vaddr + last.pages * PAGE == e.vaddr:
            out[-1] = Entry(last.vaddr, last.pages + e.pages, PE_LAZY)
        else:
            out.append(e)
    return out


def undo_stack_slip(images: Path) -> int:
    """Every page of a lazy dump in images that CRIU wrote within a mapping it leaves lazy
    made lazy again: its pagemap rewritten, its bytes taken out of its pages file. How many
    pages (0: the dump was as CRIU means it, nothing touched)."""
    relazied = 0
    for vpid, path in pagemap.of_processes(images):     # (the shared memory's are never lazy)
        try:
            pages_id, written = pagemap.read(path.read_bytes())
            lazy = lazy_mappings((images / f"mm-{vpid}.img").read_bytes())
        except OSError as e:
            raise RelazyError(f"cannot read the images of PID {vpid}: {e.strerror}") from None
        entries, kept = split(written, lazy)
        if all(kept):
            continue
        _rewrite_pages(images / f"pages-{pages_id}.img", kept)
        path.write_bytes(pagemap.image(pages_id, entries))
        relazied += kept.count(False)
    return relazied


def _rewrite_pages(path: Path, kept: list[bool]) -> None:
    """path with only the pages kept says stay, in order."""
    new = path.with_name(path.name + ".new")
    try:
        with open(path, "rb") as old, open(os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            i = 0
            while i < len(kept):
                n = 1
                while i + n < len(kept) and kept[i + n] == kept[i] and n < _COPY_PAGES:
                    n += 1
                if kept[i]:
                    data = old.read(n * PAGE)
                    if len(data) != n * PAGE:
                        raise RelazyError(f"{path.name} ends before the pages its pagemap names")
                    out.write(data)
                else:
                    old.seek(n * PAGE, os.SEEK_CUR)
                i += n
        os.replace(new, path)
    except OSError as e:
        new.unlink(missing_ok=True)
        raise RelazyError(f"cannot rewrite {path.name}: {e.strerror}") from None
    except RelazyError:
        new.unlink(missing_ok=True)
        raise
