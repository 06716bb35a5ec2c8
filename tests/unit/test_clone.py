"""How replicas are named, and what a clone's report says."""

import asyncio
import json
import signal

import pytest

from livemig.errors import LivemigError, Phase, UsageError
from livemig.options import Options
from livemig.report import CloneReport, Replica
from livemig.source.clone import Clone, replica_names
from livemig.target import agent as agent_mod
from livemig.target.stage import Stage
from livemig.wire import protocol as p


def test_replicas_are_named_after_the_original_unless_told():
    assert replica_names("web1", None, 1, False) == ["web1-clone"]
    assert replica_names("web1", None, 3, False) == ["web1-clone-1", "web1-clone-2", "web1-clone-3"]
    assert replica_names("web1", "cache", 1, False) == ["cache"]
    assert replica_names("web1", "cache", 2, False) == ["cache-1", "cache-2"]
    assert replica_names("web1", None, 1, True) == ["web1"]


@pytest.mark.parametrize("name,count,keep", [(None, 0, False), (None, 2, True), ("x", 1, True),
                                             (None, 10**6, False)])
def test_impossible_names_are_usage_errors(name, count, keep):
    with pytest.raises(UsageError):
        replica_names("web1", name, count, keep)


def test_the_report_names_every_replica_and_the_originals_pause():
    r = CloneReport(source="a", workload="web1", outcome="cloned", frozen_seconds=0.073, pages_written=36,
                    checkpoint_bytes=3 << 20, replicas=[Replica("b", "web1-clone-1", 101, 0.18),
                                                        Replica("b", "web1-clone-2", 102, 0.2)])
    text = r.summary()
    assert "2 replica(s) on b" in text and "stood still 73 ms" in text
    assert "web1-clone-2 on b: PID 102" in text
    assert json.loads(r.to_json())["replicas"][0] == {"host": "b", "name": "web1-clone-1", "pid": 101,
                                                      "restore_seconds": 0.18, "bytes_wire": 0}


async def test_a_clone_that_made_no_work_directory_removes_none(tmp_path):
    # the clone's ID already names a directory there (not the clone's: it made none)
    c = Clone("web1", ["b"], ["web1-clone"], Options(image_root=str(tmp_path)), lambda target: None)
    c.work.mkdir()
    (c.work / "theirs").write_text("keep")
    await c.close()
    assert (c.work / "theirs").read_text() == "keep"


class _Agent:
    """A target's session whose Resume succeeds, or fails after a while."""

    def __init__(self, target: str, fails: bool, said: list[str]):
        self.target, self.fails, self.said = target, fails, said

    async def request(self, msg, reply_type):
        self.said.append(f"{type(msg).__name__} {self.target}")
        if self.fails:
            await asyncio.sleep(0.05)       # the other host's replicas resumed meanwhile
            raise p.RemoteFailure(p.Failed("commit", "podman resume failed"))
        return reply_type(pids=[]) if reply_type is p.Resumed else reply_type()

    async def abort(self):
        self.said.append(f"Abort {self.target}")


async def test_a_resume_failing_on_one_host_leaves_every_other_agent_there_to_undo_its_replicas(tmp_path):
    said: list[str] = []
    c = Clone("web1", ["b", "c"], ["web1-clone"], Options(image_root=str(tmp_path)), lambda target: None)
    c.to = [_Agent("b", False, said), _Agent("c", True, said)]
    c.phase = Phase.COMMIT
    with pytest.raises(LivemigError, match="on c"):
        await c.commit()
    await c.rollback()
    # no Finish before every replica runs: a finished agent is gone, its replicas out of reach
    assert "Finish b" not in said and {"Abort b", "Abort c"} <= set(said)


async def test_an_abort_kills_a_replica_that_runs_already(tmp_path):
    a = agent_mod.Agent(asyncio.StreamReader(), None, str(tmp_path))
    replica = await asyncio.create_subprocess_exec("sleep", "60", start_new_session=True)
    try:
        for stage in (Stage.PREPARING, Stage.RESTORING, Stage.RESTORED, Stage.RUNNING):
            a.stages.to(stage)
        a.copy.roots = [replica.pid]         # a replica (not the workload), resumed
        await a.on_abort(p.Abort())
        async with asyncio.timeout(5):
            assert await replica.wait() == -signal.SIGKILL
        assert a.stages.stage is Stage.UNDONE
    finally:
        if replica.returncode is None:
            replica.kill()
            await replica.wait()
