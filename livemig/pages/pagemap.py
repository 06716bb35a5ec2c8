"""The lazy ranges of a CRIU dump: the pages a lazy restore will ask the source for.

A pagemap-PID.img is CRIU's index of one process's pages: two magics, then entries
framed as [u32 length][protobuf], a PagemapHead first and PagemapEntry after it. The
entries flagged PE_LAZY are exactly what `criu dump --lazy-pages` kept in memory to
serve, and the only ranges its page server answers: asking for anything else closes
the connection. Reading them here lets the source push those pages before anyone asks.

The pagemaps of a pre-copy round come back from the target (receive): the source's CRIU
reads them, as root, for a lazy final dump. They are checked on the way in: the names of
pagemaps and of (empty) pages files alone, bounded sizes, and entries that parse and name
pages of a user's address space.
"""

from __future__ import annotations

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
    if len(data) < 8 or _U32.unpack_from(data, 0)[0] != IMG_COMMON_MAGIC \
            or _U32.unpack_from(data, 4)[0] != PAGEMAP_MAGIC:
        raise PagemapError("not a CRIU pagemap image")
    i, out, head = 8, [], True
    while i < len(data):
        if i + 4 > len(data):
            raise PagemapError("truncated entry size")
        (size,) = _U32.unpack_from(data, i)
        msg = data[i + 4:i + 4 + size]
        if len(msg) != size:
            raise PagemapError("truncated entry")
        i += 4 + size
        if head:            # PagemapHead: which pages-N.img holds the present pages
            head = False
            continue
        try:
            f = {num: v for num, v in protobuf.fields(msg) if isinstance(v, int)}
        except ValueError as e:
            raise PagemapError(f"bad pagemap entry: {e}") from None
        if 1 not in f:
            raise PagemapError("pagemap entry without vaddr")
        flags = f.get(4)
        if flags is None:   # images older than flags: in_parent or present
            flags = PE_PARENT if f.get(3) else PE_PRESENT
        out.append(Entry(f[1], f.get(5, f.get(2, 0)), flags))
    return out


def lazy_ranges(images: Path) -> list[Range]:
    """The PE_LAZY ranges of every process in a dump, by PID then address."""
    out = []
    for path in images.iterdir():
        m = _FILE.fullmatch(path.name)
        if m:
            pid = int(m.group(1))
            out += [Range(pid, e.vaddr, e.pages) for e in entries(path.read_bytes())
                    if e.flags & PE_LAZY and e.pages]
    return sorted(out, key=lambda r: (r.pid, r.vaddr))


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
