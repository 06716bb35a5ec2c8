"""What `livemig recover` settled, and what `recover --list` finds to settle: its reports, for
people and for scripts (the JSON Schemas give each field's doc comment as its description)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Settled:
    """One move as `livemig recover` left it."""
    migration_id: str             #: the move's (its report's migration_id)
    target: str                   #: where it was going, as it was named
    workload: str                 #: what it moved: the process tree or container
    #: "moved", "rolled back", "unresolved" (ask again), "target lost" or "lost" (neither host has it)
    outcome: str
    detail: str                   #: how each copy stands, and what was done to them


@dataclass
class Recovered:
    """What `livemig recover` settled (nothing: an empty list)."""
    settled: list[Settled] = field(default_factory=list)   #: each move it settled, or tried to


@dataclass
class Pending:
    """One move `livemig recover` would settle, as `recover --list` finds it (source/pending.py)."""
    migration_id: str             #: the move's (its report's migration_id)
    target: str                   #: where it was going; "" for one killed in pre-copy (nothing of it went there)
    workload: str                 #: what it moves: the process tree or container
    #: "pre-copy", "post-copy or a fill", "stop-and-copy[, the source's copy given up]"
    stage: str
    here: str                     #: the source's copy, as it stands now
    livemig_alive: bool           #: the move's livemig still runs: recover leaves the move to it
    target_ran_seconds: float     #: how long, at most, the target's copy has run (0: never told to)
    recorded_at: str              #: UTC, ISO 8601: when the move last wrote where it stood


@dataclass
class Listed:
    """What `livemig recover --list` found (nothing: an empty list)."""
    pending: list[Pending] = field(default_factory=list)   #: each move it would settle
