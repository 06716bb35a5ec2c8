"""--max-bandwidth: what one move sends, over all its streams together, at most so many
bytes a second (QEMU's max-bandwidth), so that a move does not starve production
traffic on a shared link.

Every byte a move puts on the wire leaves through streams.CompressedWriter, which asks
the move's Cap before it writes: pre-copy rounds, the final dump's pages, post-copy's
push and its faults, image files, bundles and container images alike. The cap hands the
link's time out piece by piece (at most SIZES.capped_piece bytes each) from two queues, a fault's
pages (urgent) before everything else: each piece waits until the pieces granted before
it have had their share at the capped rate (or is due within SIZES.capped_ahead). So faults go first,
and within the cap; over any second the move sends at most the cap, one piece and SIZES.capped_ahead's
worth. A link slower than the cap banks
no credit: the clock never runs behind the present.

A drain's moves share one budget (source/drain.py): each move's Cap reads its share, which the
drain rewrites as moves start and end, from a file, again every SIZES.capped_bucket seconds.

The Cap also counts what it let through in SIZES.capped_bucket-long slots, with or without a rate,
so that the report can say the highest rate the move reached over SIZES.capped_window seconds.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from collections import defaultdict, deque
from pathlib import Path

from ..options import SIZES

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?(?:/S)?\s*$")


def parse_size(text, what: str = "a size in bytes") -> int:
    """A size as users write it: bytes, with K, M, G or T for powers of 1024: "64M", "1.5G",
    "800K", "65536". ValueError otherwise."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        # ValueError, as the docstring says: config._parsed and the tests expect it for any refusal
        raise ValueError(f"{text!r} is not {what}")  # noqa: TRY004
    m = _RATE.match(str(text).upper())
    if not m:
        raise ValueError(f"{text!r} is not {what} (like 50M or 1G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_rate(text) -> int:
    """A rate as users write it: bytes a second, with K, M, G or T for powers of 1024 (as
    QEMU's max-bandwidth): "50M", "1G", "1.5G", "800K", "65536". ValueError otherwise."""
    rate = parse_size(text, "a rate in bytes a second")
    if rate < SIZES.capped_piece:
        raise ValueError(f"{text!r} is below {SIZES.capped_piece >> 10}K a second, the least livemig can keep to")
    return rate


class Cap:
    """One move's share of the link: rate bytes a second at most (None: no cap, counted only);
    share: the file a drain keeps this move's share of its budget in (the lower of the two holds)."""

    def __init__(self, rate: float | None = None, share: str = ""):
        self.rate, self._own, self._share = rate, rate, share
        self._share_read = -SIZES.capped_bucket
        self._reshare()
        self._clock = 0.0         # when the pieces granted so far will have had their share
        self._waiting: tuple[deque, deque] = (deque(), deque())     # (urgent, the rest): (bytes, future)
        self._granting: asyncio.Task | None = None
        self.sent = 0
        self._slots: dict[int, int] = defaultdict(int)

    async def take(self, n: int, urgent: bool = False) -> None:
        """Wait until n more bytes may go (n at most SIZES.capped_piece, for the cap to hold); they are
        counted as sent from then on."""
        self._reshare()
        if self.rate is not None:
            granted = asyncio.get_running_loop().create_future()
            self._waiting[0 if urgent else 1].append((n, granted))
            if self._granting is None or self._granting.done():
                self._granting = asyncio.create_task(self._grant())
            await granted
        self.count(n)

    async def _grant(self) -> None:
        """Hand the link's time out, urgent pieces first, until nobody waits."""
        while any(self._waiting):
            queue = self._waiting[0] or self._waiting[1]
            n, granted = queue[0]
            if granted.done():        # its writer was cancelled: its share goes to the next
                queue.popleft()
                continue
            self._reshare()
            now = time.monotonic()
            if self._clock - now > SIZES.capped_ahead:
                await asyncio.sleep(self._clock - now)
                continue              # an urgent piece may have come meanwhile
            queue.popleft()
            self._clock = max(self._clock, now) + n / self.rate
            granted.set_result(None)

    def _reshare(self) -> None:
        """A drain's move: its share of the budget, read again once a bucket's time has passed."""
        if not self._share:      # (every piece asks: a move outside a drain looks no further)
            return
        now = time.monotonic()
        if now - self._share_read < SIZES.capped_bucket:
            return
        self._share_read = now
        try:
            shared = float(Path(self._share).read_text())
        except (OSError, ValueError):   # (the drain writes it whole, by rename: a drain gone: its last share holds)
            return
        self.rate = shared if self._own is None else min(self._own, shared)

    def count(self, n: int) -> None:
        self.sent += n
        self._slots[int(time.monotonic() / SIZES.capped_bucket)] += n

    def peak(self) -> float:
        """The highest rate reached over any SIZES.capped_window seconds, in bytes a second."""
        if not self._slots:
            return 0.0
        span = int(SIZES.capped_window / SIZES.capped_bucket)
        first, last = min(self._slots), max(self._slots)
        best = 0
        for s in range(first, last + 1):
            best = max(best, sum(self._slots.get(s - i, 0) for i in range(span)))
        return best / SIZES.capped_window


# The cap of the move under way, for every stream it opens: set by the coordinator for the
# whole move (tasks inherit it), so that no stream's signature carries it. None: nothing counts.
current: contextvars.ContextVar[Cap | None] = contextvars.ContextVar("livemig_cap", default=None)
