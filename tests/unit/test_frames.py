"""The page stream's one format (pages/frames.py): what is written is read back, through
the zstd stream it travels in."""

import asyncio

import pytest

from livemig.pages import frames
from livemig.wire import streams


async def test_a_page_frame_is_read_as_it_was_written():
    reader = asyncio.StreamReader()
    out = streams.CompressedWriter(_Sink(reader), streams.Meter(), 1)
    await out.write(frames.frame(frames.PAGES, 42, 0x7f0000001000, 3) + b"x" * 3 * 4096, flush=True)
    await out.write(frames.frame(frames.PUSHED_ALL, pages=3), flush=True)
    inbound = streams.Decompressed(reader)
    assert await frames.read(inbound, "the test's stream") == (frames.PAGES, 42, 0x7f0000001000, 3)
    assert bytes(await inbound.need(3 * 4096)) == b"x" * 3 * 4096
    header = frames.frame(frames.PUSHED_ALL, pages=3)
    assert await frames.read(inbound, "the test's stream") == (frames.PUSHED_ALL, 0, 0, 3)
    assert frames.kind_of(header) == frames.PUSHED_ALL
    reader.feed_eof()
    with pytest.raises(EOFError, match="the test's stream"):
        await frames.read(inbound, "the test's stream")


class _Sink:
    """A stream writer that feeds what it is given to a StreamReader."""

    def __init__(self, reader):
        self.reader = reader

    def write(self, data):
        self.reader.feed_data(data)

    async def drain(self):
        pass

    def write_eof(self):
        self.reader.feed_eof()
