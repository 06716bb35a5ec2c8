"""Post-copy pages at wire speed: the source pushes every lazy page, and faults go first.

CRIU's own post-copy (its lazy-pages daemon asking the dump's page server) fetches one
request at a time, and every fault shrinks its next request back to 64 KiB; across SSH
each request waits a round trip, so a workload that keeps faulting keeps the rest of its
memory waiting (measured: 52.8 s to fetch 512 MiB that a plain copy moves in 3 s). So
livemig runs neither end of that conversation across the link:

- source (push.Pusher): reads every lazy range (pagemap.lazy_ranges), smallest first, in
  the frozen tree's memory (the lazy dump's page server when that cannot be read), and
  pushes the pages once the target's copy runs and its first faults are served; before
  each read it serves what the target said a request is waiting for.
- target (placer.Placer): puts every page into the restored copy as it lands, and asks
  the source for the pages a fault waits on.

The pages a fault waits for go on a connection of their own when there is one (the
fault stream): on the pushing stream they would wait behind up to a window of pushed
pages, measured at 0.5 to 1 s of app-seen downtime at idle.

This module holds what both halves share: CRIU's page-server words, the order of the push
(chunks), what each side counts, and the stream's failure. The frames on the wire are
frames.py's.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

from ..errors import LivemigError
from ..options import SIZES
from ..wire import streams
from .pagemap import PAGE, Range

# CRIU's struct page_server_iov as laid out on x86-64 and AArch64: cmd, nr_pages, vaddr, dst_id.
PS_IOV = struct.Struct("<I4xQQQ")
PS_IOV_GET = 7
PS_IOV_REPLY = (4 << 16) | 6    # encode_ps_cmd(PS_IOV_ADD_F, PE_PRESENT): CRIU's answer to a GET
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
PS_STATUS = struct.Struct("<i")


class PageStreamError(LivemigError):
    """The page stream between the hosts (or the one with CRIU) broke, or said what it must
    not. Raised without a phase: post-copy's or a fill's, as its catcher knows (the agent
    names it; the source tells it as a lost connection)."""


class LinkLost(PageStreamError):
    """The link under the page stream broke: it ended, was reset, or went silent. Unlike a
    stream that said what it must not, a fresh link may carry on where it stopped."""


@dataclass
class Pushed:
    """The source's side of one post-copy."""
    sent: streams.Meter = field(default_factory=streams.Meter)
    pages_pushed: int = 0        # in push order, nobody waiting
    pages_on_demand: int = 0     # because a request on the target waited for them
    pages_known: int = 0         # of both, named only: the target's store held them as they are
    criu_gone: bool = False      # the lazy dump's CRIU had ended before every page was across


@dataclass
class Served:
    """The target's side of one post-copy."""
    received: streams.Meter = field(default_factory=streams.Meter)
    pages_served: int = 0        # placed in the copy
    requests: int = 0            # the copy's faults
    requests_waited: int = 0     # faults that had to ask the source for their page
    pages_known: int = 0         # placed from the store of pre-copy by hashes


def chunks(ranges: list[Range], size: int = SIZES.push_read_pages, aligned: bool = False):
    """The order of the push: the smallest ranges first. A program's working set after
    the resume is mostly small mappings (stack, heap, an interpreter's arenas) while its
    large buffers wait; in address order a large buffer mapped late, below the earlier
    mappings, went first, and every small page the program touched meanwhile was a
    fault (measured: 500 ms to 1 s of stall at idle, growing with the buffer).
    aligned: no piece crosses a multiple of size pages in the address space (a fill's:
    the target's store keeps a piece that fills one of its slots as it came)."""
    for r in sorted(ranges, key=lambda r: r.pages):
        first = 0
        while first < r.pages:
            vaddr = r.vaddr + first * PAGE
            n = min(size - (vaddr // PAGE) % size if aligned else size, r.pages - first)
            yield r.pid, vaddr, n
            first += n


def told(eg: BaseExceptionGroup, peer: str) -> BaseException:
    """The first failure is the one to tell; a broken socket, as the stream it broke."""
    e = eg.exceptions[0]
    if isinstance(e, (ConnectionError, EOFError)):
        return LinkLost(f"the {peer}'s page stream ended before the copy had every page ({e})")
    return e


def check_fault(ranges: list[Range], starts: list[int], pid: int, vaddr: int, n: int) -> None:
    """A fault's pages as a placer asks for them: SIZES.fault_pages at most, all in one lazy
    range of pid's (ranges, by address, and their starts). Anything else is no placer's (the
    target is not to be trusted with how much the source reads and sends for it, nor with
    which memory): the stream is broken."""
    i = bisect.bisect_right(starts, vaddr) - 1
    if not 0 < n <= SIZES.fault_pages or vaddr % PAGE or i < 0 \
            or vaddr + n * PAGE > ranges[i].vaddr + ranges[i].pages * PAGE:
        raise PageStreamError(f"the target asked for {n} pages at {vaddr:#x} of process {pid} for a fault, "
                              "which no lazy range of the dump holds in one request")


def runs_without(vaddr: int, n: int, skip, most: int) -> list[tuple[int, int]]:
    """[vaddr, +n pages) minus the pages in skip, as (start, pages) runs of most pages at most."""
    runs, start = [] if skip else [(vaddr, n)], None
    for i in range(n) if skip else ():
        page = vaddr + i * PAGE
        if page in skip:
            if start is not None:
                runs.append((start, (page - start) // PAGE))
                start = None
        elif start is None:
            start = page
    if start is not None:
        runs.append((start, (vaddr + n * PAGE - start) // PAGE))
    return [(a + i * PAGE, min(most, count - i)) for a, count in runs for i in range(0, count, most)]
