"""Where a move stands: one stage at a time, and only the steps the table allows.

    preflight -> [trial restore] -> pre-copy -> final dump -> transfer -> restore -> commit -> [fill | post-copy] -> moved
    any stage before the commit -> rolling back

Before the commit any failure rolls back: the source's copy resumes and the target
forgets. From the commit on the target's copy is the workload: a failure there is
settled (post-copy's verdicts, stop-and-copy's stranded copy), never rolled back. Once
moved, nothing undoes the move: an interrupt only cuts its tidying short.

The stages that are phases of the move carry the phase's name (errors.Phase): what an
error and the report's `failed_phase` say. The other two (moved, rolling back) keep the
name of the phase they came from, which is the one a failure then names.
"""

from __future__ import annotations

from enum import Enum

from ..errors import LivemigError, Phase


class Stage(Enum):
    PREFLIGHT = Phase.PREFLIGHT      # nothing on either host is touched
    TRIAL = Phase.TRIAL              # a trial restore, thrown away: the source runs on (--trial)
    PRECOPY = Phase.PRECOPY          # pages and files cross while the workload runs
    FINAL_DUMP = Phase.FINAL_DUMP    # the workload freezes
    TRANSFER = Phase.TRANSFER        # the images that are not pages cross
    RESTORE = Phase.RESTORE          # the target restores its copy, stopped
    COMMIT = Phase.COMMIT            # the target's copy is the workload from here on
    FILL = Phase.FILL                # its copy runs; the rest of the pages go in from its memory
    POSTCOPY = Phase.POSTCOPY        # its copy runs; the rest of the pages cross as it asks
    MOVED = "moved"                  # it runs there, whole, and only there: nothing to undo
    ROLLING_BACK = "rolling back"    # a failure before the commit: the source's copy resumes

    @property
    def is_phase(self) -> bool:
        return self not in (Stage.MOVED, Stage.ROLLING_BACK)


# Where each stage may go next (QEMU's migrate_set_state, in spirit).
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.PREFLIGHT: frozenset({Stage.TRIAL, Stage.PRECOPY, Stage.ROLLING_BACK}),
    Stage.TRIAL: frozenset({Stage.PRECOPY, Stage.ROLLING_BACK}),
    Stage.PRECOPY: frozenset({Stage.FINAL_DUMP, Stage.ROLLING_BACK}),
    Stage.FINAL_DUMP: frozenset({Stage.TRANSFER, Stage.ROLLING_BACK}),
    Stage.TRANSFER: frozenset({Stage.RESTORE, Stage.ROLLING_BACK}),
    Stage.RESTORE: frozenset({Stage.COMMIT, Stage.ROLLING_BACK}),
    Stage.COMMIT: frozenset({Stage.FILL, Stage.POSTCOPY, Stage.MOVED}),
    Stage.FILL: frozenset({Stage.MOVED}),
    Stage.POSTCOPY: frozenset({Stage.MOVED}),
    Stage.MOVED: frozenset(),
    Stage.ROLLING_BACK: frozenset(),
}

COMMITTED = frozenset({Stage.COMMIT, Stage.FILL, Stage.POSTCOPY, Stage.MOVED})


class StageError(LivemigError):
    """A step the table does not allow: livemig's own bug, never the workload's."""


class Stages:
    """A move's stage, and the phase its failures name."""

    def __init__(self) -> None:
        self.now = Stage.PREFLIGHT
        self.phase_stage = Stage.PREFLIGHT   # the last stage that is a phase

    @property
    def phase(self) -> str:
        """The phase under way (or the last one, once moved or rolling back): what an error names."""
        return self.phase_stage.value

    @property
    def committed(self) -> bool:
        """The target's copy is the workload: a failure is settled, never rolled back."""
        return self.now in COMMITTED

    @property
    def moved(self) -> bool:
        return self.now is Stage.MOVED

    def to(self, stage: Stage) -> None:
        if stage not in TRANSITIONS[self.now]:
            raise StageError(f"a move cannot go from {self.now.value} to {stage.value}", phase=self.phase)
        self.now = stage
        if stage.is_phase:
            self.phase_stage = stage
