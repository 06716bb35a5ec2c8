"""The agent's answers to faults, as logic: a verdict that still lands on a full disk, a
request cut short by the coordinator's rollback, and the one failure a TaskGroup's many
stand for. The lab's fault matrix (tests/test_fault_matrix.py) proves them end to end."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from livemig import workdirs
from livemig.errors import ConnectionFailed
from livemig.source.failures import primary
from livemig.target import agent as agent_mod
from livemig.target.receive import Images
from livemig.target.stage import Stage
from livemig.target.verdicts import VERDICT_ROOM, Verdicts
from livemig.target.workspace import Workspace
from livemig.version import __version__
from livemig.wire import protocol as p


def test_a_verdict_lands_in_the_room_its_file_kept_when_the_disk_is_full(tmp_path, monkeypatch):
    verdicts = Verdicts(tmp_path)
    verdicts.write("m1", "serving")
    assert os.path.getsize(verdicts.path("m1")) == VERDICT_ROOM
    real = workdirs.write_synced

    def full(path, data, flags=os.O_CREAT | os.O_TRUNC):
        if flags & os.O_CREAT:          # a new file needs room the disk no longer has
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, flags)
    monkeypatch.setattr(workdirs, "write_synced", full)
    verdicts.write("m1", "whole", "every page is in")
    assert verdicts.read("m1") == ("whole", "every page is in")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m1.verdict"]     # no temporary file left
    with pytest.raises(OSError):        # a first verdict has no room kept: said, never lost silently
        verdicts.write("m2", "serving")


async def test_an_abort_cuts_the_request_under_way_short_and_is_answered_next(tmp_path):
    a = agent_mod.Agent(asyncio.StreamReader(), None, str(tmp_path))
    started = asyncio.Event()

    async def restoring(msg):
        started.set()
        await asyncio.Event().wait()      # a lazy restore whose pages never come
    a.handle = restoring
    answering = asyncio.create_task(a._answer(p.Restore(dir="final")))
    await started.wait()
    a.line.inbox.put_nowait((a.line.reader, p.Abort()))
    with pytest.raises(asyncio.CancelledError):
        await answering
    assert a.stopping == "the coordinator rolls back" and a.line.read_ahead == [p.Abort()]


def _held_back(tmp_path):
    """An agent whose handler answers Done once the event returned is set."""
    a = agent_mod.Agent(asyncio.StreamReader(), None, str(tmp_path))
    go = asyncio.Event()

    async def handle(msg):
        await go.wait()
        return p.Done()
    a.handle = handle
    return a, go


async def test_what_comes_while_a_request_runs_waits_its_turn(tmp_path):
    a, go = _held_back(tmp_path)
    answering = asyncio.create_task(a._answer(p.Finish()))
    await asyncio.sleep(0)
    a.line.inbox.put_nowait((a.line.reader, p.AwaitLazy()))
    await asyncio.sleep(0)
    go.set()
    assert await answering == p.Done() and a.line.read_ahead == [p.AwaitLazy()] and a.stopping is None


def test_a_task_group_s_failure_is_the_agent_s_reason_not_the_stream_it_broke():
    said = p.RemoteFailure(p.Failed("transfer", "No space left on device"))
    broke = ConnectionFailed("no stream to the agent")
    assert primary(ExceptionGroup("x", [broke, said])) is said
    assert primary(ExceptionGroup("x", [ExceptionGroup("y", [broke])])) is broke
    stop = asyncio.CancelledError()
    assert primary(BaseExceptionGroup("x", [said, stop])) is stop
    assert primary(said) is said


async def test_a_coordinator_that_went_cuts_short_only_a_restore(tmp_path):
    # a fill whose pages are all here completes without its coordinator; a restore waiting
    # for a page stream that will never come does not
    a, go = _held_back(tmp_path)
    answering = asyncio.create_task(a._answer(p.AwaitLazy()))
    await asyncio.sleep(0)
    a.line.inbox.put_nowait((a.line.reader, None))
    await asyncio.sleep(0.01)
    assert not answering.done()
    go.set()
    assert await answering == p.Done() and a.line.read_ahead == [None]


class _Said:
    """A writer that keeps what the agent says."""

    def __init__(self):
        self.said = asyncio.StreamReader()

    def write(self, data: bytes) -> None:
        self.said.feed_data(data)

    async def drain(self) -> None:
        pass


async def test_a_second_agent_of_one_migration_on_one_host_answers_failed_and_removes_nothing(short_root):
    # `clone web1 host-b host-b.example.com`: one ID, two agents on one host
    first = Workspace.make(short_root, "m1")
    await first.listen()
    try:
        hello = asyncio.StreamReader()
        hello.feed_data(p.encode(p.Hello(p.PROTOCOL_VERSION, __version__, "m1")))
        hello.feed_eof()
        out = _Said()
        assert await agent_mod.Agent(hello, out, str(short_root)).serve() == 2
        answer = await p.read_message(out.said)
        assert isinstance(answer, p.Failed) and "named twice" in answer.message
        assert (short_root / "m1" / workdirs.LOCK).is_file() and (short_root / "m1" / "streams.sock").exists()
    finally:
        first.close()
        first.release()


async def test_a_bundle_whose_copy_resumed_stays_when_its_agent_is_killed_after(tmp_path, short_root):
    a = agent_mod.Agent(asyncio.StreamReader(), None, str(short_root / "root"))
    a._ws = Workspace.make(short_root / "root", "m1")
    a._images = Images(a._ws, a.copy)
    tree = a._images.tree(str(tmp_path / "ctr" / "bundle"))
    copy = await asyncio.create_subprocess_exec("sleep", "60", start_new_session=True)
    try:
        for stage in (Stage.PREPARING, Stage.RESTORING, Stage.RESTORED):
            a.stages.to(stage)
        a.copy.roots, a.copy.holds_workload = [copy.pid], True
        await a.on_resume(p.Resume())
        a._ws.release()                 # killed outright: no cleanup of its own
        assert workdirs.sweep(short_root / "root") == ["m1"]
        assert tree.is_dir()            # the running container's bundle
    finally:
        copy.kill()
        await copy.wait()


async def test_an_await_lazy_whose_coordinator_went_is_told_to_nobody_when_it_may_come_back(tmp_path):
    # the copy runs and its pages still come: a coordinator gone may rejoin, and asks again
    a, go = _held_back(tmp_path)
    a._may_rejoin = lambda: True
    answering = asyncio.create_task(a._answer(p.AwaitLazy()))
    await asyncio.sleep(0)
    a.line.inbox.put_nowait((a.line.reader, None))
    assert await asyncio.wait_for(answering, 5) is agent_mod._UNHEARD
    assert a.line.read_ahead == [None] and not go.is_set()


def _framed(msg) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(p.encode(msg))
    return r


async def test_a_coordinator_back_on_its_rejoin_stream_is_heard_there_and_its_old_connection_no_more(tmp_path):
    from contextlib import AsyncExitStack

    from livemig.target.coordinator import Coordinator, Rejoined
    old = asyncio.StreamReader()
    line = Coordinator(old, None)
    line.listen()
    line.read_ahead.append(p.AwaitLazy())           # read from the old one before it went
    new = _framed(p.RejoinPages("pages", None))
    line.inbox.put_nowait(Rejoined((new, _Said()), AsyncExitStack()))
    back = await line.take()
    assert isinstance(back, Rejoined)
    await line.switch(back)
    assert line.reader is new and line.read_ahead == []
    old.feed_data(p.encode(p.Finish()))             # the old connection, alive after all: nobody's now
    old.feed_eof()
    assert await asyncio.wait_for(line.take(), 5) == p.RejoinPages("pages", None)
    new.feed_eof()
    assert await asyncio.wait_for(line.take(), 5) is None       # the new one's end is heard, not the old one's
    await line.close()
