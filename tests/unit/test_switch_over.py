"""Stop-and-copy's commit (switchover.switch_over): the source's copy given up, the target's
resumed, and only then what is left of the source's removed, its record kept until then.
A container's removal was downtime; a tree's CRIU, told, kills it at the release. The
drivers are stand-ins that write down what was asked of them, in order: what each does
for real is proven in the lab (tests/test_stopcopy_faults.py, tests/test_containers.py)."""

from __future__ import annotations

import types

import pytest

from livemig import errors
from livemig.options import Options
from livemig.runtimes import Workload
from livemig.runtimes.held import HeldCopy
from livemig.source import recovery, switchover
from livemig.source.migration import Migration
from livemig.source.stages import Stage


class Driver(Workload):
    def __init__(self, said: list[str], gone_at_release: bool):
        self.said, self.gone_at_release = said, gone_at_release

    async def release(self, run, lazy):
        self.said.append("release")
        return []

    async def remove(self, run):
        self.said.append("remove" + (" (record kept)" if recovery.records(self.root) else ""))
        return []


def committed_move(root, said: list[str], gone_at_release: bool) -> Migration:
    mig = Migration(4242, "b", Options(image_root=str(root)), None)
    m = mig.m
    m.work.mkdir(mode=0o700)
    m.workload = Driver(said, gone_at_release)
    m.workload.root = str(root)
    m.dump = types.SimpleNamespace(frozen_at=0.0)
    m.record = recovery.Record(m.id, "b", HeldCopy("runc", [], "web1"), (999_999_999, 1), lazy=False,
                               committed=True)
    m.save_record()
    m.stages.now = Stage.COMMIT
    return mig


@pytest.mark.parametrize("gone_at_release", [False, True], ids=["container", "tree"])
async def test_the_source_s_copy_is_removed_after_the_target_s_resumes_its_record_kept_until_then(
        short_root, monkeypatch, gone_at_release):
    said: list[str] = []
    mig = committed_move(short_root, said, gone_at_release)

    async def resume_target(m, lazy=False):
        said.append("resume")
        return 0.0
    monkeypatch.setattr(switchover, "resume_target", resume_target)
    await switchover.switch_over(mig.m)
    assert said == ["release", "resume", "remove (record kept)"]
    assert recovery.records(str(short_root)) == [] and mig.m.stages.moved


# A container's copy stays given up, for recover to end once the target's copy runs (or to
# run here again, the target lost); a tree's CRIU killed it at the release, and what CRIU
# leaves (its network lock) is let go.
@pytest.mark.parametrize("gone_at_release, told, done", [
    (False, "the source's copy was given up, and stands here paused", ["release", "resume"]),
    (True, "the source's copy is gone", ["release", "resume", "remove (record kept)"])], ids=["container", "tree"])
async def test_a_resume_that_fails_leaves_the_move_for_recover(short_root, monkeypatch, gone_at_release, told, done):
    said: list[str] = []
    mig = committed_move(short_root, said, gone_at_release)

    async def resume_target(m, lazy=False):
        said.append("resume")
        raise ConnectionResetError("the link is gone")
    monkeypatch.setattr(switchover, "resume_target", resume_target)
    with pytest.raises(errors.Unresolved, match=told):
        await switchover.switch_over(mig.m)
    assert said == done
    [(_, rec)] = recovery.records(str(short_root))
    assert rec.committed
