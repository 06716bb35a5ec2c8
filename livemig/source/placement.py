"""Where each workload of a drain goes, in what order, and how many move at once: decided
from the plans (every workload's preflight against every target), touching nothing.

Memory is the hard bound: a target takes a workload only where the memory its preflight
found available, less what the drain has placed there already, holds the workload's resident
memory SIZES.fill_room times over (what a move into the target's memory needs).
Among the targets that can take it, it goes where its CPUs would not be over-committed (its
load average, and the CPU the workloads placed there used here while they were planned,
within its CPUs), and among those to the one with the least of its memory then taken. Load
averages only rule a target out: compared with each other they say little (sampled a
moment apart on each host, 1.25 against 1.28 on two idle ones), and a workload's pages,
not its steady CPU, are what its move costs the target. The biggest are placed first, as
first-fit decreasing packs bins: a small workload fits in what a big one leaves, not the
other way round.

The order of the moves is another matter: DrainOrder says which, and why the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..options import SIZES
from ..report import Plan


class DrainOrder(str, Enum):
    """Which workloads move first. Measured side by side (bench/drain.py: 4 runc containers and
    2 trees, 64 to 1024 MiB, 3 repetitions on two links, bench/results/2026-12-06T17-15-29-drain.md),
    the smallest first took the host's workloads off it sooner on average (11.5 against 16.4 s
    unshaped, 12.9 against 17.2 s on 1 Gbit/s) and emptied it no later (18.5 against 19.8 s, 21.3
    against 21.7 s): the default. The longest-job-first schedule the biggest first follows would end
    on small moves together, but what it saves at the end is less than what its big moves cost
    every workload waiting behind them."""
    SMALLEST = "smallest"     #: the smallest first: most workloads are off the host soonest
    LARGEST = "largest"       #: the biggest first


@dataclass
class Candidate:
    """A workload a drain found here, with what each target's preflight said of it."""
    runtime: str                  # "process", "podman", "runc" or "crun"
    workload: str                 # its name (or ID), or its PID for a process tree
    memory_bytes: int = 0         # its resident memory, as its plans found it
    cpu: float = 0.0              # the CPUs it used while it was planned (1.0: one CPU all the time)
    plans: dict[str, Plan] = field(default_factory=dict)      # target -> its plan (the preflight passed)
    refused: dict[str, str] = field(default_factory=dict)     # target -> why not, in one line

    @property
    def key(self) -> str:
        return f"{self.runtime}:{self.workload}"


@dataclass(frozen=True)
class Placement:
    """Where one workload goes, and the plan its move follows."""
    candidate: Candidate
    target: str
    plan: Plan


@dataclass
class _Room:
    """A target as the placement fills it."""
    memory: int           # bytes still free for workloads
    memory_at_first: int
    cpus: int
    busy: float           # CPUs taken: its load, and what is placed there

    def after(self, need: int, cpu: float) -> tuple[bool, float]:
        """With one more workload: are its CPUs over-committed, and how much of its memory is taken."""
        over = bool(self.cpus) and self.busy + cpu > self.cpus
        return over, 1 - (self.memory - need) / self.memory_at_first if self.memory_at_first else 1.0


def place(candidates: list[Candidate]) -> tuple[list[Placement], list[tuple[Candidate, str]]]:
    """Each candidate's target (biggest first), and those that fit nowhere, each with why."""
    rooms: dict[str, _Room] = {}
    for c in candidates:
        for target, plan in c.plans.items():
            if target not in rooms:
                rooms[target] = _Room(plan.target_memory_available_bytes, plan.target_memory_available_bytes,
                                      plan.target_cpus, plan.target_load)
    placed, unplaced = [], []
    for c in sorted(candidates, key=lambda c: (-c.memory_bytes, c.key)):
        need = int(c.memory_bytes * SIZES.fill_room)
        fits = [t for t in c.plans if rooms[t].memory >= need]
        if not fits:
            unplaced.append((c, _why_nowhere(c, need, rooms)))
            continue
        target = min(fits, key=lambda t: (rooms[t].after(need, c.cpu), t))
        rooms[target].memory -= need
        rooms[target].busy += c.cpu
        placed.append(Placement(c, target, c.plans[target]))
    return placed, unplaced


def _why_nowhere(c: Candidate, need: int, rooms: dict[str, _Room]) -> str:
    refused = [f"{t}: {why}" for t, why in sorted(c.refused.items())]
    if c.plans:
        most = max(c.plans, key=lambda t: rooms[t].memory)
        refused.append(f"{', '.join(sorted(c.plans))} would take it, but it needs {need >> 20} MiB free "
                       f"({SIZES.fill_room:g} times its {c.memory_bytes >> 20} MiB) and the most left is "
                       f"{max(rooms[most].memory, 0) >> 20} MiB, on {most}")
    return "; ".join(refused) or "no target to try"


def ordered(placed: list[Placement], order: DrainOrder) -> list[Placement]:
    """The moves in the order they start."""
    biggest_first = sorted(placed, key=lambda p: (-p.candidate.memory_bytes, p.candidate.key))
    return biggest_first if order is DrainOrder.LARGEST else biggest_first[::-1]


def parallel(asked: int | None, cpus_here: int, moves: int) -> tuple[int, str]:
    """How many move at once, and why."""
    if asked is not None:
        return max(1, min(asked, moves or 1)), f"{asked}: --parallel"
    n = max(1, min(cpus_here, moves))
    return n, (f"{n}: one move per CPU here ({cpus_here}), as many as there are moves at most: each move's "
               "stream takes a CPU on each host (its cipher, its compression), and each waits on CRIU and "
               "on its target much of its time, which another move's stream fills")
