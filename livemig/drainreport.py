"""What a drain did (`livemig drain`), for people (summary()) and for scripts (to_json()).

As in report.py, every field says what it holds in its doc comment; the JSON Schema of
`livemig drain --json` gives the same text (contract.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .recoverreport import Settled
from .report import Plan


@dataclass
class DrainPlacement:
    """Where one workload goes, and what its plan expects."""
    workload: str                 #: its name (or ID), or its PID for a process tree
    runtime: str                  #: "process", "podman", "runc" or "crun"
    target: str                   #: the target it goes to
    memory_bytes: int             #: its resident memory
    cpu: float                    #: the CPUs it used while it was planned (1.0: one CPU all the time)
    mode: str                     #: the mode its move would use
    expected_downtime_seconds: float   #: its plan's estimate, in that mode
    plan: Plan                    #: its whole plan against that target (`livemig move --dry-run`'s)


@dataclass
class DrainLeft:
    """A workload the drain leaves here: no target can take it."""
    workload: str                 #: its name (or ID), or its PID
    runtime: str                  #: "process", "podman", "runc" or "crun"
    reason: str                   #: why, for each target, in one line


@dataclass
class DrainEarlier:
    """A workload asked for that an earlier drain moved already."""
    workload: str                 #: its name (or ID), or its PID
    runtime: str                  #: "process", "podman", "runc" or "crun"
    target: str                   #: where it went
    moved_at: str                 #: when (UTC, ISO 8601)


@dataclass
class DrainMove:
    """One move of the drain, as its `livemig move --json` ended."""
    workload: str                 #: its name (or ID), or its PID
    runtime: str                  #: "process", "podman", "runc" or "crun"
    target: str                   #: where it went, or was going
    #: the move's outcome: "moved", "rolled back", "failed", "exited", "unresolved" or "target lost"
    #: (the move report's own), or "interrupted" (the drain was interrupted before it said more)
    outcome: str
    exit_code: int                #: the move's exit code (`livemig move`'s)
    error: str = ""               #: why it did not move ("" if it did)
    downtime_seconds: float = 0.0   #: how long the workload stood still (its report's)
    total_seconds: float = 0.0    #: the move from its start to its end
    started_seconds: float = 0.0  #: when it started, in seconds since the drain's moves began
    #: the move's whole `--json` object: its Report, or its Failure (error, phase, hint) where it had none
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class DrainReport:
    """What a drain found, planned and did."""
    source: str                   #: this host's name
    targets: list[str]            #: the targets, as they were named
    dry_run: bool                 #: the plan only: nothing was moved
    started_at: str = ""          #: UTC, ISO 8601
    ended_at: str = ""
    total_seconds: float = 0.0    #: from the start to the last move's end
    moving_seconds: float = 0.0   #: from the first move's start to the last one's end: the time to empty the host
    parallel: int = 1             #: moves at once, at most
    parallel_reason: str = ""     #: why that many
    order: str = "smallest"       #: which moved first: "smallest" or "largest"
    order_reason: str = ""        #: why
    max_bandwidth_bytes_per_s: int | None = None   #: the budget all moves shared (None: no cap)
    #: moves an earlier drain or move left unfinished here, settled before anything else moved
    settled: list[Settled] = field(default_factory=list)
    placements: list[DrainPlacement] = field(default_factory=list)   #: where each workload goes, in the order they start
    unplaced: list[DrainLeft] = field(default_factory=list)   #: the workloads no target takes: they stay here
    #: each move, in the order they started; a workload whose move was refused or rolled back is tried
    #: again once the others are done, on its target and then on the others: each try has its own
    moves: list[DrainMove] = field(default_factory=list)
    earlier: list[DrainEarlier] = field(default_factory=list)  #: asked for, and moved by an earlier drain
    #: every workload asked for is off this host (the exit code is 0 only then); a dry run: every one has a place
    empty: bool = False
    warnings: list[str] = field(default_factory=list)   #: what the drain let pass but said

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        head = "would drain" if self.dry_run else "drained" if self.empty else "drain incomplete"
        lines = [(f"{head}: {self.source} -> {', '.join(self.targets)}; {self.parallel} at once "
                  f"({self.parallel_reason}); {self.order} first")]
        for s in self.settled:
            lines.append(f"  settled first: {s.workload} ({s.outcome}: {s.detail})")
        for e in self.earlier:
            lines.append(f"  moved earlier: {named(e.runtime, e.workload)} -> {e.target} ({e.moved_at})")
        moved = {(m.runtime, m.workload): m for m in self.moves}
        for p in self.placements:
            m = moved.get((p.runtime, p.workload))
            said = (f"expected downtime {p.expected_downtime_seconds * 1000:.0f} ms ({p.mode})" if m is None
                    else f"{m.outcome}, downtime {m.downtime_seconds * 1000:.0f} ms, {m.total_seconds:.1f} s"
                    if m.exit_code == 0 else f"{m.outcome}: {m.error}")
            lines.append(f"  {named(p.runtime, p.workload)} ({p.memory_bytes / 2**20:.0f} MiB) -> {p.target}: {said}")
        for u in self.unplaced:
            lines.append(f"  stays here: {named(u.runtime, u.workload)}: {u.reason}")
        if not self.dry_run:
            lines.append(f"  {sum(m.exit_code == 0 for m in self.moves)} of {len(self.placements)} moved in "
                         f"{self.moving_seconds:.1f} s")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def named(runtime: str, workload: str) -> str:
    return f"PID {workload}" if runtime == "process" else f"{runtime} container {workload}"
