"""The page stream's one format, written and read here and nowhere else.

Pages cross inside a zstd stream (wire/streams.py) as frames: a header (kind, the
process's PID in the dump, its first address, a count of pages) and, for PAGES, the
pages' bytes. The source writes them (push.py, and pre-copy's rounds by page
hashes in source/rounds.py); the target reads them (placer.py, and the agent's store
of pre-copied pages). The target answers on the same stream's other direction with
frames of its own, header only.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<BIQI")     # kind, pid, vaddr, pages

# source -> target
PAGES = 1          # pages' bytes follow
PUSHED_ALL = 2     # every page was sent; pages: how many
STATUS = 3         # CRIU's answer to CLOSE, in pages
HAVE = 4           # pages the target's store holds as they are now: named, not sent

# target -> source
CLOSE = 2          # CRIU's command (in pages): the restore is done with the stream
ACK = 3            # pages sent (PAGES) taken in: the push's window opens
FAULT = 4          # pages a fault waits on: sent before anything else

ENDED = 0          # never on the wire: the reader's own word for a stream that ended

# Pages' bytes as they come: off the wire (a bytearray, the reader's own), or a view of a
# buffer they were read into (the store's slots, the frozen tree's memory), never copied to bytes
PageBytes = bytes | bytearray | memoryview


def frame(kind: int, pid: int = 0, vaddr: int = 0, pages: int = 0) -> bytes:
    """A frame's header; PAGES' bytes follow it on the stream."""
    return HEADER.pack(kind, pid, vaddr, pages)


def kind_of(header: bytes) -> int:
    return HEADER.unpack(header)[0]


async def read(inbound, what: str) -> tuple[int, int, int, int]:
    """The next frame's header from inbound (a streams.Decompressed): (kind, pid, vaddr,
    pages); EOFError, naming what, if the stream ends first."""
    return HEADER.unpack(await inbound.need(HEADER.size, what))
