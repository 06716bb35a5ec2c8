"""Hello/Welcome: the coordinator says the versions of the wire protocol it speaks, the agent
answers the highest both speak, or Failed naming both ranges; the coordinator keeps what was
agreed, and refuses an answer outside its own range."""

from __future__ import annotations

import asyncio
import json

import pytest

from livemig.errors import PreflightError
from livemig.options import Options
from livemig.source.session import TargetSession
from livemig.target import agent as agent_mod
from livemig.version import __version__
from livemig.wire import protocol as p
from livemig.wire.transports import Completed


@pytest.mark.parametrize(("theirs", "ours", "agreed"), [
    ((12, 15), (14, 17), 15),     # they are older, the ranges overlap: their newest
    ((14, 17), (12, 15), 15),     # they are newer: our newest
    ((13, 16), (14, 15), 15),     # ours within theirs
    ((16, 16), (16, 16), 16),     # equal
    ((15, 15), (16, 16), None),   # they are too old
    ((17, 18), (15, 16), None),   # they are too new
    ((10, 12), (13, 16), None),   # disjoint, below
    ((17, 17), (13, 16), None),   # disjoint, above
])
def test_the_agent_agrees_on_the_highest_version_both_speak(theirs, ours, agreed):
    assert p.agree(*theirs, ours=ours) == agreed


def test_this_livemig_agrees_with_itself_on_its_newest_and_says_its_range():
    assert p.PROTOCOL_OLDEST <= p.PROTOCOL_VERSION
    assert p.agree(p.PROTOCOL_OLDEST, p.PROTOCOL_VERSION) == p.PROTOCOL_VERSION
    assert p.agree(p.PROTOCOL_VERSION + 1, p.PROTOCOL_VERSION + 3) is None
    assert p.spoken(16, 16) == "wire protocol 16" and p.spoken(14, 16) == "wire protocols 14-16"


class _Pipe:
    """A writer whose bytes the reader on the other end reads."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()

    def write(self, data: bytes) -> None:
        self.reader.feed_data(data)

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.reader.feed_eof()


async def test_hello_and_welcome_round_trip_through_their_frames():
    pipe = _Pipe()
    sent = [p.Hello(17, "2.0", "20261122-x", True, protocol_oldest=15),
            p.Welcome(16, "1.0", "/var/lib/livemig/m", "/var/lib/livemig/m/streams.sock")]
    for msg in sent:
        await p.write_message(pipe, msg)
    got = [await p.read_message(pipe.reader) for _ in sent]
    assert got == sent and (got[0].oldest, got[0].protocol) == (15, 17)


def test_a_hello_from_a_coordinator_before_ranges_speaks_its_protocol_alone():
    old = json.dumps({"type": "Hello", "protocol": 15, "livemig_version": "0.1.0", "migration_id": "m"})
    hello = p.decode(old.encode())
    assert (hello.oldest, hello.protocol) == (15, 15)


def test_a_hello_is_read_whatever_fields_a_newer_livemig_added_to_it():
    newer = {"type": "Hello", "protocol": 20, "livemig_version": "9.0", "migration_id": "m",
             "protocol_oldest": 16, "something_new": [1]}
    assert p.decode(json.dumps(newer).encode()) == p.Hello(20, "9.0", "m", protocol_oldest=16)
    with pytest.raises(p.ProtocolError):      # any other message still refuses what it does not know
        p.decode(b'{"type": "Welcome", "protocol": 16, "livemig_version": "", "work_dir": "", '
                 b'"stream_socket": "", "something_new": 1}')


async def _answer(hello: p.Hello, root) -> tuple[int, object]:
    """What an agent answers hello with, and how its serve() ends once its input does."""
    into, out = _Pipe(), _Pipe()
    await p.write_message(into, hello)
    into.close()
    code = await agent_mod.Agent(into.reader, out, str(root)).serve()
    return code, await p.read_message(out.reader)


async def test_the_agent_answers_the_version_agreed_in_its_welcome(short_root):
    code, answer = await _answer(p.Hello(p.PROTOCOL_VERSION + 2, "9.0", "m1", protocol_oldest=p.PROTOCOL_OLDEST),
                                 short_root)
    assert isinstance(answer, p.Welcome), answer
    assert (answer.protocol, answer.livemig_version, code) == (p.PROTOCOL_VERSION, __version__, 1)


@pytest.mark.parametrize("theirs", [(p.PROTOCOL_OLDEST - 3, p.PROTOCOL_OLDEST - 1),
                                    (p.PROTOCOL_VERSION + 1, p.PROTOCOL_VERSION + 2)],
                         ids=["older", "newer"])
async def test_the_agent_refuses_a_range_it_shares_nothing_with_naming_both_and_what_to_do(short_root, theirs):
    code, answer = await _answer(p.Hello(theirs[1], "9.0", "m1", protocol_oldest=theirs[0]), short_root)
    assert isinstance(answer, p.Failed) and code == 2 and answer.phase == "preflight"
    assert answer.message.startswith("protocol mismatch: the coordinator (livemig 9.0) speaks "
                                     f"wire protocols {theirs[0]}-{theirs[1]}, this agent (livemig {__version__}) "
                                     f"speaks {p.spoken()}")
    assert "install the same livemig" in answer.message and "--no-bootstrap" in answer.message
    assert list(short_root.iterdir()) == []      # refused before any work directory


class _Agent:
    """The agent's end of a transport: it answers the Hello with answer."""

    def __init__(self, answer: object) -> None:
        self.answer, self.stdin, self.out = answer, _Pipe(), _Pipe()
        self.reader, self.writer = self.out.reader, self

    def write(self, data: bytes) -> None:
        self.hello = p.decode(data[4:])
        self.out.write(p.encode(self.answer))

    async def drain(self) -> None:
        pass


class _Transport:
    host = "b"

    def __init__(self, agent: _Agent) -> None:
        self.agent = agent

    async def start(self, argv):
        return self.agent


async def _open(answer: object) -> tuple[TargetSession, _Agent]:
    agent = _Agent(answer)

    async def connect(target: str):
        return _Transport(agent)
    session = TargetSession("b", connect, Options(), "m1")
    await session.open()
    return session, agent


async def test_the_coordinator_says_its_range_and_keeps_the_version_agreed():
    session, agent = await _open(p.Welcome(p.PROTOCOL_OLDEST, "0.9", "/w", "/w/s"))
    assert (agent.hello.oldest, agent.hello.protocol) == (p.PROTOCOL_OLDEST, p.PROTOCOL_VERSION)
    assert session.protocol == p.PROTOCOL_OLDEST
    row = session.agent_check()
    assert (row.name, row.ok) == ("agent on target", True)
    assert row.detail == f"livemig 0.9 (livemig {__version__} here), wire protocol {p.PROTOCOL_OLDEST}"


@pytest.mark.parametrize("answer", [p.Welcome(p.PROTOCOL_VERSION + 1, "9.0", "/w", "/w/s"), p.Done()],
                         ids=["a version it does not speak", "no welcome"])
async def test_the_coordinator_refuses_an_answer_outside_its_range(answer):
    with pytest.raises(PreflightError, match="the agent there") as e:
        await _open(answer)
    assert e.value.host == "b" and "install the same livemig" in (e.value.hint or "")


async def test_the_coordinator_says_the_agent_s_refusal_as_it_came():
    with pytest.raises(PreflightError, match="protocol mismatch: ") as e:
        await _open(p.Failed("preflight", "protocol mismatch: ..."))
    assert e.value.host == "b"


class _Old(_Agent):
    """An installed agent older than ranges (--no-bootstrap): it fails on the Hello, and ends."""

    def write(self, data: bytes) -> None:
        self.out.close()

    async def wait(self) -> Completed:
        return Completed(("livemig", "agent"), 1, b"", b"Traceback (most recent call last):\n...\n"
                         b"livemig.errors.ProtocolError: malformed message: Hello.__init__() got an unexpected "
                         b"keyword argument 'protocol_oldest': b'...'\n")


async def test_an_installed_agent_that_cannot_read_the_hello_is_said_to_be_another_livemig():
    agent = _Old(None)

    async def connect(target: str):
        return _Transport(agent)
    with pytest.raises(PreflightError, match="cannot start the livemig agent: .*malformed message") as e:
        await TargetSession("b", connect, Options(bootstrap=False), "m1").open()
    assert "install the same livemig" in (e.value.hint or "")
