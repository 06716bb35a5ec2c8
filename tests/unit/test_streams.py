"""The zstd relay and the image file stream, over real sockets."""

import asyncio
import os
import socket

import pytest

from livemig.wire import streams


async def _pair():
    a, b = socket.socketpair()
    return (await streams.socket_streams(a)), (await streams.socket_streams(b))


async def test_relay_carries_both_directions_compressed_and_ends_on_eof():
    # criu <-> [relay A] <-> network <-> [relay B] <-> page server, all sockets
    (criu_end, relay_a_local) = await _pair()
    (relay_a_net, relay_b_net) = await _pair()
    (relay_b_local, server_end) = await _pair()
    data = os.urandom(1 << 20) + b"page" * (1 << 18)           # some incompressible, some not

    async def criu():
        criu_end[1].write(data)
        await criu_end[1].drain()
        reply = await criu_end[0].readexactly(4)                # criu waits for the ack
        criu_end[1].write_eof()
        assert await criu_end[0].read() == b""
        return reply

    async def server():
        got = await server_end[0].readexactly(len(data))
        server_end[1].write(b"ack!")
        await server_end[1].drain()
        assert await server_end[0].read() == b""
        server_end[1].write_eof()
        return got

    async with asyncio.TaskGroup() as tg:
        a = tg.create_task(streams.relay(relay_a_local, relay_a_net))
        b = tg.create_task(streams.relay(relay_b_local, relay_b_net))
        reply = tg.create_task(criu())
        got = tg.create_task(server())
    assert got.result() == data and reply.result() == b"ack!"
    sent = a.result().sent
    assert sent.raw == len(data) and sent.wire < len(data) * 0.7     # the text half compressed away
    assert b.result().received.raw == len(data)


async def test_files_arrive_whole_and_private(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    files = {"core-1.img": os.urandom(5000), "empty.img": b"", "pagemap-1.img": b"x" * (3 << 20)}
    for name, body in files.items():
        (src / name).write_bytes(body)
    (sender, receiver) = await _pair()
    async with asyncio.TaskGroup() as tg:
        sending = tg.create_task(streams.send_files(src, sorted(files), sender[1]))
        receiving = tg.create_task(streams.receive_files(receiver[0], dst))
    assert receiving.result() == (3, sum(map(len, files.values())))
    assert sending.result().raw > 3 << 20
    for name, body in files.items():
        assert (dst / name).read_bytes() == body
        assert (dst / name).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "."])
async def test_a_file_name_that_leaves_the_directory_is_refused(tmp_path, name):
    body = name.encode()
    frame = streams._NAME.pack(len(body)) + body + streams._SIZE.pack(0) + streams._NAME.pack(0)
    import zstandard
    reader = asyncio.StreamReader()
    reader.feed_data(zstandard.ZstdCompressor().compress(frame))
    reader.feed_eof()
    with pytest.raises(ValueError, match="refusing"):
        await streams.receive_files(reader, tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_a_stream_cut_short_is_an_error_not_a_short_file(tmp_path):
    import zstandard
    frame = streams._NAME.pack(5) + b"x.img" + streams._SIZE.pack(100) + b"y" * 10
    reader = asyncio.StreamReader()
    reader.feed_data(zstandard.ZstdCompressor().compress(frame))
    reader.feed_eof()
    with pytest.raises(EOFError):
        await streams.receive_files(reader, tmp_path)


async def test_names_sent_as_empty_arrive_empty(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "pagemap-1.img").write_bytes(b"map")
    (src / "pages-65537.img").write_bytes(b"p" * 100_000)
    (sender, receiver) = await _pair()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(streams.send_files(src, ["pagemap-1.img", "pages-65537.img"], sender[1],
                                          empty=frozenset({"pages-65537.img"})))
        receiving = tg.create_task(streams.receive_files(receiver[0], dst))
    assert receiving.result() == (2, 3)
    assert (dst / "pagemap-1.img").read_bytes() == b"map" and (dst / "pages-65537.img").read_bytes() == b""
