"""A move's stages: only the table's steps, and the phase its failures name."""

import pytest

from livemig.errors import LivemigError, Phase
from livemig.source.stages import TRANSITIONS, Stage, StageError, Stages


def test_a_move_goes_through_its_phases_in_order():
    s = Stages()
    for stage in (Stage.PRECOPY, Stage.FINAL_DUMP, Stage.TRANSFER, Stage.RESTORE, Stage.COMMIT, Stage.POSTCOPY):
        s.to(stage)
        assert s.phase == stage.value
    assert s.committed and not s.moved
    s.to(Stage.MOVED)
    assert s.moved and s.committed
    assert s.phase == Phase.POSTCOPY      # what a failure in its tidying names


def test_a_rollback_names_the_phase_that_failed():
    s = Stages()
    s.to(Stage.PRECOPY)
    s.to(Stage.FINAL_DUMP)
    s.to(Stage.ROLLING_BACK)
    assert s.phase == Phase.FINAL_DUMP
    assert not s.committed


def test_nothing_rolls_back_once_committed():
    s = Stages()
    for stage in (Stage.PRECOPY, Stage.FINAL_DUMP, Stage.TRANSFER, Stage.RESTORE, Stage.COMMIT):
        s.to(stage)
    with pytest.raises(StageError, match="from commit to rolling back") as e:
        s.to(Stage.ROLLING_BACK)
    assert isinstance(e.value, LivemigError) and e.value.phase == Phase.COMMIT
    assert s.now is Stage.COMMIT


def test_no_stage_is_skipped_and_the_ends_are_ends():
    s = Stages()
    with pytest.raises(StageError):
        s.to(Stage.COMMIT)
    assert TRANSITIONS[Stage.MOVED] == frozenset() and TRANSITIONS[Stage.ROLLING_BACK] == frozenset()
    assert set(TRANSITIONS) == set(Stage)
