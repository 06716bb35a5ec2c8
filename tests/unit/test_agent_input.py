"""What the agent does with hostile input from the wire: a runtime's name is checked before
anything runs (it becomes argv[0] of a root command), and a frame nested too deeply for
the decoder is a malformed message, not a reader that dies and leaves the agent hung."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest

from livemig import proc
from livemig.errors import ProtocolError
from livemig.target import agent as agent_mod
from livemig.target.failures import AgentFailure
from livemig.wire import protocol as p


@pytest.fixture
def nothing_runs(monkeypatch):
    """Every program the agent would start, recorded instead of run."""
    started: list[list[str]] = []

    async def start(argv, **kw):
        started.append([str(a) for a in argv])
        raise AssertionError(f"ran {argv!r}")
    monkeypatch.setattr(proc, "start", start)
    return started


class _Ws:
    work = "/nonexistent"


@pytest.mark.parametrize("msg", [
    p.Probe(container=p.Container("/tmp/evil", "web1", "/b")),
    p.Probe(container=p.Container("runc", "web1", "/b"), names=["--root=/tmp"]),
])
async def test_a_probe_naming_a_runtime_the_agent_does_not_know_runs_nothing(tmp_path, nothing_runs, msg):
    a = agent_mod.Agent(asyncio.StreamReader(), None, str(tmp_path))
    a._ws = _Ws()        # after the Hello
    with pytest.raises(AgentFailure, match="refusing|unknown runtime"):
        await a.handle(msg)
    assert nothing_runs == []


@pytest.mark.parametrize("container", [p.Container("./runc", "web1", "/b"), p.Container("podman", "-x", "")])
async def test_no_handler_sees_a_container_whose_runtime_or_name_is_not_plain(tmp_path, container):
    a = agent_mod.Agent(asyncio.StreamReader(), None, str(tmp_path))
    reached = []

    async def restore(msg):
        reached.append(msg)
    a.handlers[p.Restore] = restore
    with pytest.raises(AgentFailure, match="refusing|unknown runtime"):
        await a.handle(p.Restore(dir="final", container=container))
    assert reached == []


def _nested(depth: int) -> bytes:
    body = b'{"type": "Probe", "pids": ' + b"[" * depth + b"]" * depth + b"}"
    return struct.pack(">I", len(body)) + body


def test_a_frame_nested_past_the_decoder_s_depth_is_malformed():
    with pytest.raises(ProtocolError, match="malformed"):
        p.decode(_nested(200_000)[4:])
    json.loads(_nested(10)[4:])     # the frame itself is well-formed JSON


async def test_the_agent_s_reader_ends_on_a_frame_it_cannot_decode_rather_than_die_silently(tmp_path):
    reader = asyncio.StreamReader()
    reader.feed_data(_nested(200_000))
    a = agent_mod.Agent(reader, None, str(tmp_path))
    await asyncio.wait_for(a.line.read(a.line.reader), 5)
    assert a.line.inbox.get_nowait() == (a.line.reader, None)     # the loop learns the coordinator is gone, and cleans up
