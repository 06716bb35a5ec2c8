"""Framing and typing of the coordinator <-> agent messages."""

import asyncio
import struct

import pytest

from livemig.errors import ProtocolError
from livemig.wire import protocol as p


def test_every_message_round_trips_through_a_frame():
    msgs = [p.Hello(1, "0.1.0", "20261122-x"), p.Probe(pids=[1, 2]),
            p.OpenPageServer(dir="pre-1", stream="ab", parent=None), p.Restore(dir="final", lazy_stream="cd"),
            p.Failed("restore", "no", "detail"), p.Done(),
            # a message inside a message decodes as itself, not as a dict
            p.Probe(pids=[], container=p.Container("runc", "web1", "/var/lib/ctr/web1"), bundle_marker="m"),
            p.Restore(dir="final", container=p.Container("crun", "db1", "/b")),
            p.ReceiveTree(path="/b", stream="ef", deleted=["rootfs/tmp/x"])]
    for msg in msgs:
        frame = p.encode(msg)
        (size,) = struct.unpack(">I", frame[:4])
        assert size == len(frame) - 4
        assert p.decode(frame[4:]) == msg


@pytest.mark.parametrize("body", [
    b'{"type": "os.system", "command": "true"}',        # only registered types decode
    b'{"type": "Hello", "protocol": 1}',                 # missing fields
    b'{"type": "Done", "extra": 1}',                     # unknown fields
    b'not json', b'[]',
    b'{"type": "Container", "runtime": "runc", "id": "x", "bundle": "/b"}',   # a part is no message
])
def test_anything_else_is_refused(body):
    with pytest.raises(ProtocolError):
        p.decode(body)


def test_a_frame_over_the_limit_is_refused_before_it_is_read():
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack(">I", p.MAX_FRAME + 1) + b"x")
        reader.feed_eof()
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            await p.read_message(reader)
    asyncio.run(go())


def test_a_closed_peer_is_an_eof_not_a_garbled_message():
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(p.encode(p.Done())[:3])
        reader.feed_eof()
        with pytest.raises(EOFError):
            await p.read_message(reader)
    asyncio.run(go())


async def test_a_request_gets_its_reply_or_raises_the_remote_failure():
    class Loop:
        """A peer that answers each request from a script."""
        def __init__(self, replies):
            self.reader = asyncio.StreamReader()
            self.replies = replies
            self.sent = []

        def write(self, data):
            self.sent.append(p.decode(data[4:]))
            self.reader.feed_data(p.encode(self.replies.pop(0)))

        async def drain(self):
            pass

    peer = Loop([p.Done(), p.Failed("restore", "it broke"), p.Done()])
    ch = p.Channel(peer.reader, peer)
    assert await ch.request(p.Abort(), p.Done) == p.Done()
    with pytest.raises(p.RemoteFailure, match="it broke"):
        await ch.request(p.Resume(), p.Resumed)
    with pytest.raises(ProtocolError, match="expected Resumed"):
        await ch.request(p.Resume(), p.Resumed)


class Slow:
    """A peer whose replies come only when the test says so."""
    def __init__(self):
        self.reader = asyncio.StreamReader()
        self.sent = []

    def write(self, data):
        self.sent.append(p.decode(data[4:]))

    async def drain(self):
        pass


async def test_a_reply_owed_to_a_cancelled_request_is_not_taken_for_the_next_ones():
    peer = Slow()
    ch = p.Channel(peer.reader, peer)
    restoring = asyncio.create_task(ch.request(p.Restore(dir="final"), p.Restored))
    await asyncio.sleep(0)
    restoring.cancel()              # Ctrl-C while the target restores
    with pytest.raises(asyncio.CancelledError):
        await restoring
    peer.reader.feed_data(p.encode(p.Restored(42, 0.1)))   # the restore's late reply...
    peer.reader.feed_data(p.encode(p.Done()))              # ...then the abort's own
    assert await ch.request(p.Abort(), p.Done) == p.Done()
    assert [type(m).__name__ for m in peer.sent] == ["Restore", "Abort"]


async def test_a_rollback_s_request_reaches_the_peer_while_the_cancelled_one_is_still_owed():
    # The agent cuts a restore short when an Abort comes: the Abort must be sent before the
    # restore's reply is in, or the agent finishes (or hangs in) the restore first.
    peer = Slow()
    ch = p.Channel(peer.reader, peer)
    restoring = asyncio.create_task(ch.request(p.Restore(dir="final"), p.Restored))
    await asyncio.sleep(0)
    restoring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await restoring
    aborting = asyncio.create_task(ch.request(p.Abort(), p.Aborted))
    for _ in range(3):
        await asyncio.sleep(0)
    assert [type(m).__name__ for m in peer.sent] == ["Restore", "Abort"] and not aborting.done()
    peer.reader.feed_data(p.encode(p.Failed("rollback", "Restore cut short: the coordinator rolls back")))
    peer.reader.feed_data(p.encode(p.Aborted("")))
    assert await aborting == p.Aborted("")

