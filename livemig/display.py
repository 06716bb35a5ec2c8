"""How the command line shows a move while it runs, on stderr (stdout is the report's).

On a terminal, a live display (rich): the phase under way with a bar of the bytes or
pages it has sent, its rate and time, and a line above it for every step done. Anywhere
else (a log, a failover script's pipe), one plain line per step, and a line about the
bytes at most every few seconds. With --json, nothing: the report is the output.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Self

from .progress import (
    Cautioned,
    Connecting,
    Copied,
    Draining,
    Event,
    Fetching,
    Finishing,
    ModeChosen,
    Reconnected,
    Reconnecting,
    RoundDone,
    Running,
    Sending,
    Stepping,
    Throttled,
)

PAGE = 4096

# What a terminal would act on rather than show: C0 controls but tab and newline, DEL, C1
# (0x9b is CSI on many terminals), and the bidirectional overrides that reorder what is shown.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escaped(text: str) -> str:
    """text as it may reach a terminal: what the target says (its errors, CRIU's log lines,
    its host's names) could otherwise move the cursor, clear the screen or set the title."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _size(n: float) -> str:
    return _mib(n) if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def line(e: Event) -> str | None:
    """The line a step gets; None for the events that only move a bar."""
    if isinstance(e, Connecting):
        return f"connecting to {e.host}..."
    if isinstance(e, Draining):
        return e.text
    if isinstance(e, ModeChosen):
        return f"mode {e.mode}: {e.reason} ({_mib(e.memory_bytes)} resident)"
    if isinstance(e, Copied):
        what = {"image": "container image", "bundle": "bundle", "images": "dump's image files"}[e.what]
        return f"{what} sent{f' to {e.host}' if e.host else ''}: {_size(e.raw)} ({_size(e.wire)} on the wire)"
    if isinstance(e, RoundDone):
        dirty = "" if e.dirty_rate is None else f"; dirtying {_mib(e.dirty_rate)}/s"
        return (f"round {e.n}: {e.pages} pages, {_mib(e.wire)} sent in {e.seconds:.2f} s at "
                f"{_mib(e.bandwidth)}/s{dirty}; downtime now would be {e.expected_downtime * 1000:.0f} ms "
                f"(budget {e.max_downtime * 1000:.0f} ms)")
    if isinstance(e, Throttled):
        return (f"auto-converge: pre-copy is not converging, so the workload is slowed by {e.percent} % "
                f"({e.baseline_cpus:.2f} -> {e.quota_cpus:.3f} CPU) until the final dump")
    if isinstance(e, Stepping):
        return f"{e.what}..."
    if isinstance(e, Running):
        return "running on the target" + ("; its remaining pages follow..." if e.lazy else "")
    if isinstance(e, Cautioned):
        return f"warning: {e.text}"
    if isinstance(e, Reconnecting):
        return (f"the link to {e.host} broke ({e.why}): reaching it again for up to {e.within:g} s; "
                "its copy waits on the pages it lacks meanwhile...")
    if isinstance(e, Reconnected):
        return f"back on {e.host} after {e.seconds:.1f} s: the {e.pages} pages its copy still lacks follow..."
    if isinstance(e, Finishing):
        return (f"interrupted once the copy on {e.host} ran: waiting until it has every page, "
                "and then the move is done (it cannot be undone now)")
    return None


class Lines:
    """One line per step; how many bytes (or post-copy pages) went, every `every` seconds
    at most, and once more when post-copy has sent every page."""

    def __init__(self, out=None, every: float = 5.0):
        self.out, self.every, self._last = out or sys.stderr, every, time.monotonic()

    def __call__(self, e: Event) -> None:
        text = line(e)
        now = time.monotonic()
        if text is None and isinstance(e, Sending) and now - self._last >= self.every:
            text = f"sent {_mib(e.raw)} ({_mib(e.wire)} on the wire) in {e.seconds:.0f} s"
        elif text is None and isinstance(e, Fetching) and (now - self._last >= self.every or e.pages == e.total):
            text = f"post-copy: {e.pages} of {e.total} pages sent ({e.pages / max(e.total, 1):.0%})"
        if text is not None:
            self._last = now
            print(escaped(text), file=self.out, flush=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        pass


class Live:
    """rich's progress display: one bar, for the step under way; each step done leaves a
    line above it."""

    def __init__(self, console=None):
        # rich costs 36 ms: loaded only when a progress display is shown
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            ProgressColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        # rich costs 36 ms: loaded only when a progress display is shown
        from rich.text import Text

        class Rate(ProgressColumn):     # in MiB/s, as the sizes beside it and every line livemig prints
            def render(self, task) -> Text:
                return Text("" if task.speed is None else f"{_mib(task.speed)}/s", style="progress.data.speed")
        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                             DownloadColumn(binary_units=True), Rate(), TimeElapsedColumn(),
                             console=console or Console(stderr=True))
        self.memory = 0          # what a full copy sends: a bar's length
        self.task = None
        self.tell_end = False    # a line when the step ends (a pre-copy round has its own)
        self.sent = 0            # bytes sent so far, as last told
        self.base = 0            # ... when the current bar began

    def __enter__(self) -> Self:
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self._close_bar()
        self.bars.stop()

    def _bar(self, what: str, total: float | None, tell_end: bool = True) -> None:
        self._close_bar()
        self.task, self.base, self.tell_end = self.bars.add_task(escaped(what), total=total), self.sent, tell_end

    def _close_bar(self) -> None:
        if self.task is None:
            return
        t = next(t for t in self.bars.tasks if t.id == self.task)
        self.bars.remove_task(self.task)
        self.task = None
        if self.tell_end:
            sent = f", {_mib(t.completed)}" if t.completed >= 2**20 else ""   # not a lazy dump's few images
            self.bars.console.print(escaped(f"{t.description}: done in {t.elapsed or 0:.2f} s{sent}"),
                                    highlight=False, markup=False)

    def __call__(self, e: Event) -> None:
        text = line(e)
        if isinstance(e, Stepping):
            # bytes flow in the final dump; a restore has none to count
            self._bar(e.what, (self.memory or None) if e.phase == "final dump" else None)
            return                # the bar says it
        if isinstance(e, Sending):
            self.sent = e.raw
            if self.task is not None:
                self.bars.update(self.task, completed=e.raw - self.base)
            return
        if isinstance(e, Fetching):
            if self.task is not None:
                self.bars.update(self.task, completed=e.pages * PAGE, total=e.total * PAGE)
            return
        if isinstance(e, (RoundDone, Running)):
            self._close_bar()     # the step before ends here: its line first
        if text is not None:     # plain text: no rich markup in what the target says either
            self.bars.console.print(escaped(text), highlight=False, markup=False)
        if isinstance(e, ModeChosen):
            self.memory = e.memory_bytes
            if e.mode in ("precopy", "hybrid"):
                self._bar("pre-copy, round 1", self.memory or None, tell_end=False)
        elif isinstance(e, RoundDone):
            self._bar(f"pre-copy, round {e.n + 1}", self.memory or None, tell_end=False)
        elif isinstance(e, Running) and e.lazy:
            self._bar("post-copy: the pages the target lacks", None)


def for_cli(json: bool, terminal: bool | None = None):
    """The view a command gets: None with --json; live on a terminal; else lines."""
    if json:
        return None
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal:
        try:
            return Live()
        except ImportError:      # rich missing (a bare checkout): lines do as well
            pass
    return Lines()
