"""Every tunable of a migration, in one place, with the names users see."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from . import criu


class Mode(str, Enum):
    AUTO = "auto"
    PRECOPY = "precopy"       # pre-dump rounds while running, then a final dump of what is dirty
    POSTCOPY = "postcopy"     # a lazy final dump: restore at once, pages follow on demand
    HYBRID = "hybrid"         # pre-copy rounds, then a lazy final dump
    STOPCOPY = "stopcopy"     # one final dump, streamed, restored


@dataclass(frozen=True)
class Options:
    mode: Mode = Mode.AUTO
    max_downtime: float = 0.300      # seconds; QEMU's downtime-limit
    max_rounds: int = 8              # pre-copy rounds at most (auto-converge may add its steps)
    throttle: bool = True            # auto-converge: slow the workload's CPU when pre-copy does not converge
    fill: bool = True                # stop-and-copy pushes pages into the target's memory, placed as the copy runs
    compression_level: int = 1       # zstd level for everything on the wire
    max_bandwidth: int | None = None  # bytes a second one move sends at most, all its streams together
                                      # (QEMU's max-bandwidth; bandwidth.py); None: no cap
    criu: criu.Options = field(default_factory=criu.Options)
    image_root: str = "/var/lib/livemig"   # private image directories live here, on both hosts
    agent_command: tuple[str, ...] = ("livemig",)   # how to run livemig on the target
    connect_timeout: float = 15.0
    runtime: str | None = None       # a container's runtime (runc, crun); None: whichever knows it
    name: str | None = None          # the container's name on the target; None keeps its name
    force: bool = False              # go on past mismatches that can only fail the restore
