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
And a drain's move that is frozen goes first: while it is (from its final dump until its copy
runs on the target) it leaves a marker beside that file, and the other moves' pieces wait
(but a fault's: a copy that runs waits on those), so that its switchover has the CPUs and the
link to itself and its downtime is what it would be alone. A marker whose move died is passed
over, and none is waited on longer than WAITS.drain_yield_most.

The Cap also counts what it let through in SIZES.capped_bucket-long slots, with or without a rate,
so that the report can say the highest rate the move reached over SIZES.capped_window seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import re
import time
from collections import defaultdict, deque
from pathlib import Path

from ..options import SIZES, WAITS

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_FROZEN = "frozen-"     # a drain's move frozen: frozen-PID beside its share
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
        self._drain = Path(share).parent if share else None     # where a drain's moves leave their markers
        self._mine: Path | None = None         # ours, while this move is frozen
        self._others_looked, self._others = -1.0, False
        self._clock = 0.0         # when the pieces granted so far will have had their share
        self._waiting: tuple[deque, deque] = (deque(), deque())     # (urgent, the rest): (bytes, future)
        self._granting: asyncio.Task | None = None
        self.sent = 0
        self._slots: dict[int, int] = defaultdict(int)

    async def take(self, n: int, urgent: bool = False) -> None:
        """Wait until n more bytes may go (n at most SIZES.capped_piece, for the cap to hold); they are
        counted as sent from then on."""
        self._reshare()
        if not urgent:
            await self._behind_a_freeze()
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
        now = time.monotonic()
        if not self._share or now - self._share_read < SIZES.capped_bucket:
            return
        self._share_read = now
        try:
            shared = float(Path(self._share).read_text())
        except (OSError, ValueError):   # (the drain writes it whole, by rename: a drain gone: its last share holds)
            return
        self.rate = shared if self._own is None else min(self._own, shared)

    def frozen(self, now: bool) -> None:
        """A drain's move: it is frozen (its switchover under way), or no longer (said again: nothing)."""
        if self._drain is None or now == (self._mine is not None):
            return
        if self._mine is None:
            self._mine = self._drain / f"{_FROZEN}{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):    # (its drain is gone: nobody to tell)
                self._mine.touch()
        else:
            self._mine.unlink(missing_ok=True)
            self._mine = None

    async def _behind_a_freeze(self) -> None:
        """A drain's move not frozen waits while another is (see the module's doc)."""
        if self._drain is None or self._mine is not None:
            return
        deadline = time.monotonic() + WAITS.drain_yield_most
        while self._another_frozen() and time.monotonic() < deadline:
            await asyncio.sleep(WAITS.drain_yield_poll)

    def _another_frozen(self) -> bool:
        """Is a live move of the drain frozen? Looked at once a poll's time at most."""
        now = time.monotonic()
        if now - self._others_looked >= WAITS.drain_yield_poll:
            self._others_looked, self._others = now, False
            for marker in self._drain.glob(f"{_FROZEN}*") if self._drain else ():
                try:
                    os.kill(int(marker.name.removeprefix(_FROZEN)), 0)
                    self._others = True
                except (ProcessLookupError, ValueError):   # its move died frozen: not waited on
                    marker.unlink(missing_ok=True)
        return self._others

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


def frozen(now: bool) -> None:
    """The move under way is frozen now, or no longer: its Cap tells a drain's other moves."""
    cap = current.get()
    if cap is not None:
        cap.frozen(now)
