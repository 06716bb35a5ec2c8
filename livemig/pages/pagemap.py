"""The lazy ranges of a CRIU dump: the pages a lazy restore will ask the source for.

A pagemap-PID.img is CRIU's index of one process's pages: two magics, then entries
framed as [u32 length][protobuf], a PagemapHead first and PagemapEntry after it. The
entries flagged PE_LAZY are exactly what `criu dump --lazy-pages` kept in memory to
serve, and the only ranges its page server answers: asking for anything else closes
the connection. Reading them here lets the source push those pages before anyone asks.

Where a tree's processes share pages copy-on-write, a lazy dump's pagemaps are rewritten
(cow.py): image() writes one as CRIU does.

The pagemaps of a pre-copy round come back from the target (receive): the source's CRIU
reads them, as root, for a lazy final dump. They are checked on the way in: the names of
pagemaps and of (empty) pages files alone, bounded sizes, and entries that parse and name
pages of a user's address space.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .. import protobuf
from ..errors import LivemigError
from ..options import SIZES
from ..wire import streams

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
PARENT = "parent"        # a dump's directory of the images its PE_PARENT pages are in (CRIU's CR_PARENT_LINK)
PAGE = 4096

_U32 = struct.Struct("<I")
_FILE = re.compile(r"pagemap-(\d+)\.img")
_SENT_BACK = re.compile(r"(pagemap-(shmem-)?\d+|pages-\d+)\.img")     # what SendPagemaps sends
_FLAGS = PE_PARENT | PE_LAZY | PE_PRESENT
_USER_TOP = 1 << 57      # no user address reaches it (five-level paging's top)


class PagemapError(LivemigError, ValueError):
    """A pagemap image livemig cannot read. Still a ValueError, as it was: what a malformed
    image raises, for callers that catch that."""


@dataclass(frozen=True)
class Entry:
    vaddr: int
    pages: int
    flags: int


@dataclass(frozen=True)
class Range:
    """pages pages of process pid (its PID in the dump) from vaddr on."""
    pid: int
    vaddr: int
    pages: int


def entries(data: bytes) -> list[Entry]:
    """Every PagemapEntry of a pagemap image, with CRIU's own defaults filled in."""
    return read(data)[1]


def read(data: bytes) -> tuple[int, list[Entry]]:
    """A pagemap image: the N of the pages-N.img that holds its present pages (its
    PagemapHead), and its entries."""
    if len(data) < 8 or _U32.unpack_from(data, 0)[0] != IMG_COMMON_MAGIC \
            or _U32.unpack_from(data, 4)[0] != PAGEMAP_MAGIC:
        raise PagemapError("not a CRIU pagemap image")
    i, out, head, pages_id = 8, [], True, None
    while i < len(data):
        if i + 4 > len(data):
            raise PagemapError("truncated entry size")
        (size,) = _U32.unpack_from(data, i)
        msg = data[i + 4:i + 4 + size]
        if len(msg) != size:
            raise PagemapError("truncated entry")
        i += 4 + size
        try:
            f = {num: v for num, v in protobuf.fields(msg) if isinstance(v, int)}
        except ValueError as e:
            raise PagemapError(f"bad pagemap entry: {e}") from None
        if head:            # PagemapHead: which pages-N.img holds the present pages
            head, pages_id = False, f.get(1)
            continue
        if 1 not in f:
            raise PagemapError("pagemap entry without vaddr")
        flags = f.get(4)
        if flags is None:   # images older than flags: in_parent or present
            flags = PE_PARENT if f.get(3) else PE_PRESENT
        out.append(Entry(f[1], f.get(5, f.get(2, 0)), flags))
    if pages_id is None:
        raise PagemapError("a pagemap image without its head")
    return pages_id, out


def image(pages_id: int, written: list[Entry]) -> bytes:
    """A pagemap image of these entries, read by CRIU as one it wrote: the magics, the head,
    then each entry (vaddr, the page count in both its fields, flags)."""
    out = [_U32.pack(IMG_COMMON_MAGIC), _U32.pack(PAGEMAP_MAGIC)]
    for msg in [protobuf.varint_field(1, pages_id)] + [
            protobuf.varint_field(1, e.vaddr) + protobuf.varint_field(2, e.pages if e.pages < 1 << 32 else 0)
            + protobuf.varint_field(4, e.flags) + protobuf.varint_field(5, e.pages) for e in written]:
        out += [_U32.pack(len(msg)), msg]
    return b"".join(out)


def of_processes(images: Path) -> list[tuple[int, Path]]:
    """Each process's pagemap in a dump (not the shared memory's), by its PID in the dump."""
    return sorted((int(m.group(1)), path) for path in images.iterdir() if (m := _FILE.fullmatch(path.name)))


def lazy_ranges(images: Path) -> list[Range]:
    """The PE_LAZY ranges of every process in a dump, by PID then address."""
    out = []
    for pid, path in of_processes(images):
        out += [Range(pid, e.vaddr, e.pages) for e in entries(path.read_bytes()) if e.flags & PE_LAZY and e.pages]
    return sorted(out, key=lambda r: (r.pid, r.vaddr))


class Index:
    """Where a process's present pages are in its pages file."""

    def __init__(self, images: Path, pid: int):
        pages_id, written = read((images / f"pagemap-{pid}.img").read_bytes())
        self.path = images / f"pages-{pages_id}.img"
        self.spans, at = [], 0
        for e in written:
            if e.flags & PE_PRESENT:
                self.spans.append((e.vaddr, e.pages, at))
                at += e.pages * PAGE
        self.starts = [s[0] for s in self.spans]

    def copy_into(self, fd: int, vaddr: int, n: int) -> None:
        """Pages [vaddr, +n) of the process, appended to fd."""
        with open(self.path, "rb") as f:
            while n:
                i = bisect.bisect_right(self.starts, vaddr) - 1
                start, pages, at = self.spans[i] if i >= 0 else (0, 0, 0)
                k = (vaddr - start) // PAGE
                if i < 0 or k >= pages:
                    raise PagemapError(f"{self.path.name} lacks the page at {vaddr:#x} a child shares")
                take = min(n, pages - k)
                left, offset = take * PAGE, at + k * PAGE
                while left:
                    copied = os.copy_file_range(f.fileno(), fd, left, offset)
                    if copied <= 0:
                        raise PagemapError(f"{self.path.name} ends before its pagemap says")
                    left, offset = left - copied, offset + copied
                vaddr, n = vaddr + take * PAGE, n - take


def read_through_parents(images: Path, parents: dict[int, int]) -> None:
    """Each process of parents (child -> parent, PIDs in the dump) reads the pages its pagemap
    names as PE_PARENT from its parent's image, as CRIU reads a pre-dump's: from the pagemap
    of the same PID in the directory PARENT. There, its pagemap is its parent's, and the pages
    file that pagemap names is the parent's own (a link: nothing is copied). A parent that
    names pages as its own parent's has them read a directory further up, and so on."""
    readers, d = dict(parents), images     # reader -> whose pagemap it reads at this level
    while readers:
        d = d / PARENT
        d.mkdir(mode=0o700)
        further = {}
        for reader, owner in readers.items():
            data = (images / f"pagemap-{owner}.img").read_bytes()
            pages_id, written = read(data)
            (d / f"pagemap-{reader}.img").write_bytes(data)
            if not (d / f"pages-{pages_id}.img").exists():
                os.link(images / f"pages-{pages_id}.img", d / f"pages-{pages_id}.img")
            if any(e.flags & PE_PARENT for e in written):
                if owner not in parents:
                    raise PagemapError(f"pagemap-{owner}.img names pages as its parent's, and has none")
                further[reader] = parents[owner]
        readers = further


def check(data: bytes) -> None:
    """PagemapError unless every entry of the image parses and names whole pages of a user's
    address space, with flags CRIU writes."""
    for e in entries(data):
        if e.vaddr % PAGE or e.pages <= 0 or e.vaddr + e.pages * PAGE > _USER_TOP or e.flags & ~_FLAGS:
            raise PagemapError(f"a pagemap entry no dump writes: {e.pages} pages at {e.vaddr:#x}, "
                               f"flags {e.flags:#x}")


async def receive(reader: streams.Reader, directory: Path, most: int = SIZES.pagemaps_most,
                  files_most: int = SIZES.pagemaps_files_most) -> tuple[int, int]:
    """A round's pagemaps as the target sends them back (SendPagemaps), into directory, each
    checked before the source's CRIU may read it; (files, bytes). A target that sends
    anything else, or more, is refused with a PagemapError."""
    got: list[str] = []
    total = 0

    def accept(name: str, size: int) -> None:
        nonlocal total
        total += size
        if not _SENT_BACK.fullmatch(name):
            raise PagemapError(f"refusing {name!r} among the pagemaps sent back: not a pagemap")
        if size and name.startswith("pages-"):
            raise PagemapError(f"refusing {name!r}: a pages file sent back holds nothing")
        if total > most or len(got) >= files_most:
            raise PagemapError(f"refusing the pagemaps sent back: more than {most} bytes or {files_most} files")
        got.append(name)
    received = await streams.receive_files(reader, directory, accept)
    for name in got:
        if name.startswith("pagemap-"):
            check((directory / name).read_bytes())
    return received
