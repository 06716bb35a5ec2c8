"""The agent's stage, one at a time, and the moves between stages it allows (as QEMU's
MigrationStatus and migrate_set_state): the one place the agent's state is read from.

    OPENING    -> PREPARING                      the coordinator's Hello, answered
    PREPARING  -> RESTORING | UNDONE             a restore starts; a rollback
    RESTORING  -> RESTORED | UNDONE              it succeeded; it failed, or was cut short
    RESTORED   -> RESTORING | RUNNING | UNDONE   a clone's next replica; Resume; a rollback
    RUNNING    -> UNDONE                         post-copy's copy that lacks pages dies all the same
    UNDONE     -> RESTORING                      (a restore after a rollback)

A forbidden move raises StageError: a request out of its order, or a bug, is answered as
a failure instead of acting on a copy in a stage it does not expect. Post-copy's pages
have their own states beside these (postcopy.Pages): they come while the copy is
RESTORING, RESTORED or RUNNING alike.
"""

from __future__ import annotations

from enum import Enum

from ..errors import Phase
from .failures import AgentFailure


class Stage(Enum):
    OPENING = "opening"        # until the coordinator's Hello is answered
    PREPARING = "preparing"    # the work directory is ours: probes, page servers, images, bundles
    RESTORING = "restoring"    # CRIU, or a container's runtime, restores now
    RESTORED = "restored"      # a copy is here, stopped, until Resume (a clone's replicas: several)
    RUNNING = "running"        # resumed: the copy runs (post-copy's may still lack pages)
    UNDONE = "undone"          # what this move restored or brought here is gone: a rollback,
    #                            a failed restore, a post-copy that failed


TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.OPENING: frozenset({Stage.PREPARING}),
    Stage.PREPARING: frozenset({Stage.RESTORING, Stage.UNDONE}),
    Stage.RESTORING: frozenset({Stage.RESTORED, Stage.UNDONE}),
    Stage.RESTORED: frozenset({Stage.RESTORING, Stage.RUNNING, Stage.UNDONE}),
    Stage.RUNNING: frozenset({Stage.UNDONE}),
    Stage.UNDONE: frozenset({Stage.RESTORING}),
}

# the phase a forbidden move into each stage fails in
_PHASE = {Stage.OPENING: Phase.PREFLIGHT, Stage.PREPARING: Phase.PREFLIGHT, Stage.RESTORING: Phase.RESTORE,
          Stage.RESTORED: Phase.RESTORE, Stage.RUNNING: Phase.COMMIT, Stage.UNDONE: Phase.ROLLBACK}


class StageError(AgentFailure):
    """A move between stages that TRANSITIONS does not allow."""


class Stages:
    """The agent's stage; to() is the only way it changes."""

    def __init__(self) -> None:
        self.stage = Stage.OPENING

    def check(self, new: Stage) -> None:
        """Raise StageError unless the agent may go to new from where it is."""
        if new not in TRANSITIONS[self.stage]:
            raise StageError(_PHASE[new], f"the agent cannot go from {self.stage.value} to {new.value}")

    def to(self, new: Stage) -> None:
        self.check(new)
        self.stage = new

    @property
    def running(self) -> bool:
        return self.stage is Stage.RUNNING
