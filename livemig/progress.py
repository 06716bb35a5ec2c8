"""What a migration (or a clone) tells whoever watches it, as it happens.

The API's `progress=` callback receives these events, one object each; the CLI draws
them (display.py). Events that repeat while bytes flow (Sending, Fetching) come from
a Ticker at most a few times a second, so a watcher never slows the move down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .wire import streams


@dataclass(frozen=True)
class Connecting:
    host: str


@dataclass(frozen=True)
class ModeChosen:
    mode: str
    reason: str
    memory_bytes: int          # resident memory of what moves: what the copy has to send


@dataclass(frozen=True)
class Copied:
    """Something other than memory pages reached a target: the container's image, its
    bundle (files), or the dump's image files."""
    what: str                  # "image", "bundle" or "images"
    raw: int
    wire: int
    host: str = ""


@dataclass(frozen=True)
class RoundDone:
    """A pre-copy round: pages dirtied since the round before, sent while the workload ran."""
    n: int
    pages: int
    wire: int
    seconds: float
    bandwidth: float           # bytes per second on the wire
    dirty_rate: float | None   # bytes per second the workload dirtied during the round before (None: round 1)
    expected_downtime: float   # if the final dump were taken now
    max_downtime: float        # the budget


@dataclass(frozen=True)
class Throttled:
    """Auto-converge: pre-copy did not converge, so the workload was slowed down."""
    after_round: int
    percent: int               # off the CPU it used unthrottled
    baseline_cpus: float
    quota_cpus: float


@dataclass(frozen=True)
class Stepping:
    """A phase begins (errors.Phase's names) or, within one, a step worth a line."""
    phase: str
    what: str                  # as a line says it: "final dump", "restoring on the target"...


@dataclass(frozen=True)
class Sending:
    """Everything this move has sent so far, all streams together."""
    raw: int
    wire: int
    seconds: float             # since the move started


@dataclass(frozen=True)
class Running:
    pids: list[int]
    lazy: bool = False         # the target runs, but some of its pages are still to come


@dataclass(frozen=True)
class Fetching:
    """Post-copy: pages sent to the running target (pushed or asked for), of all it lacked."""
    pages: int
    total: int
    seconds: float             # since the target runs


@dataclass(frozen=True)
class Finishing:
    """An interrupt came once the target's copy ran, before it had every page: the move
    waits for them, and is then done (undone, what the copy answered would be answered
    again by the source's, older)."""
    host: str


@dataclass(frozen=True)
class Reconnecting:
    """The link to the target broke while its copy runs: it is being reached again, for up
    to within seconds (the copy's faults on missing pages wait meanwhile)."""
    host: str
    why: str
    within: float


@dataclass(frozen=True)
class Reconnected:
    """The target's agent took us back after seconds without a link; pages: what its copy
    still lacked, pushed now."""
    host: str
    seconds: float
    pages: int


@dataclass(frozen=True)
class Cautioned:
    """Preflight found something the user should know before the move goes on (also among
    the report's warnings)."""
    text: str


@dataclass(frozen=True)
class Draining:
    """A drain's step (source/drain.py): a workload planned, placed, moving, moved or left here."""
    text: str


Event = (Connecting | ModeChosen | Copied | RoundDone | Throttled | Stepping | Sending | Running | Fetching
         | Finishing | Reconnecting | Reconnected | Cautioned | Draining)
Callback = Callable[[Event], None]


def quiet(event: Event) -> None:
    """The callback of nobody watching."""


@dataclass
class Ticker:
    """Samples the bytes sent (and, in post-copy, the pages) every `every` seconds and
    reports them when they moved. `tally` is the meter every stream of the move adds
    to (streams.tally); `pages` is set once post-copy starts."""
    emit: Callback
    tally: streams.Meter = field(default_factory=streams.Meter)
    every: float = 0.25
    pages: Callable[[], tuple[int, int]] | None = None    # (sent, total)
    pages_since: float = 0.0
    _t0: float = field(default_factory=time.monotonic)

    def tell(self, event: Event) -> None:
        """Pass event on, the bytes sent until then first: whoever draws a bar per step
        counts each byte in the step that sent it."""
        if not isinstance(event, (Sending, Fetching)) and self.pages is None:
            self.emit(Sending(self.tally.raw, self.tally.wire, time.monotonic() - self._t0))
        self.emit(event)

    async def run(self) -> None:
        last = (-1, -1)
        while True:
            await asyncio.sleep(self.every)
            now = time.monotonic()
            if self.pages is not None:
                sent, total = self.pages()
                if (sent, total) != last:
                    last = (sent, total)
                    self.emit(Fetching(sent, total, now - self.pages_since))
            elif (self.tally.raw, self.tally.wire) != last:
                last = (self.tally.raw, self.tally.wire)
                self.emit(Sending(self.tally.raw, self.tally.wire, now - self._t0))

    @contextlib.asynccontextmanager
    async def running(self):
        """While the block runs: every stream's bytes counted, and sampled."""
        token = streams.tally.set(self.tally)
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            try:
                # Waited for without suppressing CancelledError: its end is the cancel above,
                # and a cancel of this task that came meanwhile must not be swallowed with it.
                await asyncio.wait({task})
                if not task.cancelled():
                    task.result()      # it failed by itself (a progress callback raised): told, as before
            finally:
                streams.tally.reset(token)
