"""A broken link made again (source/rejoin.py), as logic: the coordinator tries, backing
off, until its reconnect time is up, and stops at once when the target answers that
nobody waits there. The lab proves it end to end (test_postcopy_faults.py, the fault
matrix's post-copy rows, test_vm_lab.py's hybrid)."""

import asyncio
import dataclasses
import itertools
import types

import pytest

from livemig.errors import ConnectionFailed
from livemig.options import WAITS, Options
from livemig.pages import postcopy as pages
from livemig.pages.pagemap import Range
from livemig.progress import Reconnected, Reconnecting
from livemig.report import Report
from livemig.source import rejoin
from livemig.source.session import AgentGone


def _move(said: list):
    async def stop_relay():
        pass
    return types.SimpleNamespace(
        stop_relay=stop_relay, pusher=types.SimpleNamespace(stats=pages.Pushed(pages_pushed=5)), pushed_before=[],
        options=Options(reconnect_timeout=0.5), progress=said.append, target="b", phase="post-copy",
        to=None, rejoin_token="t", w=None, ticker=None, relay=None, report=Report(pid=1, source="a", target="b"))


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(rejoin, "WAITS", dataclasses.replace(WAITS, reconnect_first_retry=0.02,
                                                             reconnect_longest_retry=0.08, successor_appears=0.1))
    monkeypatch.setattr(rejoin, "by_pid", lambda w: {})


async def test_the_link_is_tried_again_backing_off_until_it_comes_back(monkeypatch, quick):
    tries: list[float] = []

    async def pushed_again(to, token, level, tree, fault_link, within):
        tries.append(asyncio.get_running_loop().time())
        if len(tries) < 4:
            raise ConnectionFailed("Connection refused", host="b")
        return types.SimpleNamespace(progress=None), [Range(1, 0x1000, 3)], "relay"
    monkeypatch.setattr(rejoin, "pushed_again", pushed_again)
    said: list = []
    m = _move(said)
    await rejoin.reconnect(m, ConnectionResetError("reset by peer"))
    waits = [b - a for a, b in itertools.pairwise(tries)]
    assert len(tries) == 4 and waits[1] > waits[0] * 1.5 and m.relay == "relay"     # each wait longer
    assert m.report.reconnects == 1 and m.pushed_before[0].pages_pushed == 5      # the old push still counts
    assert isinstance(said[0], Reconnecting) and said[0].within == 0.5 and "reset by peer" in said[0].why
    assert isinstance(said[1], Reconnected) and said[1].pages == 3


async def test_a_link_that_never_comes_back_fails_once_the_time_is_up_saying_the_last_try(monkeypatch, quick):
    async def pushed_again(*args, **kw):
        raise ConnectionFailed("No route to host", host="b")
    monkeypatch.setattr(rejoin, "pushed_again", pushed_again)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionFailed, match=r"could not be made again within 0.5 s \(on b: No route to host\)"):
        await rejoin.reconnect(_move([]), ConnectionResetError("reset"))
    assert 0.3 < loop.time() - started < 1.5


async def test_a_target_whose_agent_is_gone_is_asked_again_only_while_a_guard_may_be_late(monkeypatch, quick):
    # a dead agent's guard waits for a successor a moment after the agent's socket went quiet
    tries = []

    async def pushed_again(*args, **kw):
        tries.append(asyncio.get_running_loop().time())
        raise AgentGone("the agent on b is gone", host="b")
    monkeypatch.setattr(rejoin, "pushed_again", pushed_again)
    with pytest.raises(AgentGone):
        await rejoin.reconnect(_move([]), ConnectionResetError("reset"))     # reconnect_timeout: 0.5 s
    assert 2 <= len(tries) and tries[-1] - tries[0] < 0.3


async def test_a_successor_s_guard_late_by_a_moment_is_waited_for(monkeypatch, quick):
    tries = []

    async def pushed_again(*args, **kw):
        tries.append(1)
        if len(tries) < 3:
            raise AgentGone("nothing on b waits for a successor", host="b")
        return types.SimpleNamespace(progress=None), [], "relay"
    monkeypatch.setattr(rejoin, "pushed_again", pushed_again)
    m = _move([])
    await rejoin.reconnect(m, ConnectionResetError("reset"))
    assert len(tries) == 3 and m.report.reconnects == 1
