"""--max-bandwidth: rates as users write them, and a cap that every stream of a move keeps
to together. The lab's test_bandwidth measures a capped move on the wire."""

import asyncio
import os
import time

import pytest

from livemig import config
from livemig.errors import UsageError
from livemig.options import SIZES
from livemig.wire import bandwidth, streams


@pytest.mark.parametrize("text, rate", [("50M", 50 << 20), ("1G", 1 << 30), ("1.5g", 3 << 29), ("800K", 800 << 10),
                                        ("65536", 65536), ("10MiB", 10 << 20), ("10MB/s", 10 << 20), (1 << 20, 1 << 20)])
def test_a_rate_is_bytes_a_second_with_binary_units(text, rate):
    assert bandwidth.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "-5M", "5Q", "1K", True, None, "5 M M"])
def test_a_rate_that_is_none_or_too_small_is_refused(text):
    with pytest.raises(ValueError):
        bandwidth.parse_rate(text)


def test_the_cap_comes_from_the_config_file_and_the_environment(tmp_path):
    f = tmp_path / "config.toml"
    f.write_text('max_bandwidth = "20M"\n')
    assert config.load({"LIVEMIG_CONFIG": str(f)}).options.max_bandwidth == 20 << 20
    assert config.load({"LIVEMIG_CONFIG": str(f), "LIVEMIG_MAX_BANDWIDTH": "1G"}).options.max_bandwidth == 1 << 30
    assert config.load({"HOME": str(tmp_path)}).options.max_bandwidth is None     # no cap unless one is set
    with pytest.raises(UsageError, match="max_bandwidth"):
        f.write_text('max_bandwidth = "lots"\n')
        config.load({"LIVEMIG_CONFIG": str(f)})


class Sink:
    """A stream writer that keeps what it is given, piece by piece, with the time."""

    def __init__(self):
        self.pieces: list[tuple[float, int]] = []

    def write(self, data):
        self.pieces.append((time.monotonic(), len(data)))

    async def drain(self):
        pass

    def write_eof(self):
        pass


async def test_streams_of_one_move_keep_to_the_cap_together():
    rate = 4 << 20
    cap = bandwidth.Cap(rate)
    token = bandwidth.current.set(cap)
    try:
        sinks = [Sink(), Sink()]
        payload = os.urandom(1 << 20)     # incompressible: what is written is what goes

        async def send(sink):
            out = streams.CompressedWriter(sink, streams.Meter(), 1)
            await out.write(payload, flush=True)
            await out.close()

        t0 = time.monotonic()
        await asyncio.gather(*(send(s) for s in sinks))
        took = time.monotonic() - t0
    finally:
        bandwidth.current.reset(token)
    sent = sum(n for s in sinks for _, n in s.pieces)
    assert sent == cap.sent > 2 << 20
    assert max(n for s in sinks for _, n in s.pieces) <= SIZES.capped_piece
    # by construction: the last piece waits until every byte before it has had its share
    assert took >= (sent - SIZES.capped_piece) / rate
    assert cap.peak() <= rate * (1 + SIZES.capped_ahead / SIZES.capped_window) + SIZES.capped_piece / SIZES.capped_window


async def test_a_faults_pages_go_before_the_pieces_that_wait_for_the_cap():
    cap = bandwidth.Cap(1 << 20)
    order = []

    async def take(name, n, urgent=False):
        await cap.take(n, urgent)
        order.append(name)

    bulk = [asyncio.create_task(take(f"bulk {i}", SIZES.capped_piece)) for i in range(8)]   # half a second of them
    await asyncio.sleep(0)
    await take("fault", 4096, urgent=True)
    # at most the piece whose share was under way when it came went before it
    assert order[-1] == "fault" and len(order) <= 2
    await asyncio.gather(*bulk)
    assert cap.sent == 8 * SIZES.capped_piece + 4096


async def test_a_writer_cancelled_while_it_waits_gives_its_share_to_the_next():
    cap = bandwidth.Cap(1 << 20)
    first = asyncio.create_task(cap.take(SIZES.capped_piece))
    stuck = asyncio.create_task(cap.take(SIZES.capped_piece))
    await first
    stuck.cancel()
    await cap.take(1024)       # granted, not left waiting behind a share nobody takes
    assert cap.sent == SIZES.capped_piece + 1024 and not any(cap._waiting)


async def test_without_a_cap_nothing_waits_and_all_is_counted():
    cap = bandwidth.Cap()
    t0 = time.monotonic()
    for _ in range(100):
        await cap.take(SIZES.capped_piece)
    assert time.monotonic() - t0 < 1 and cap.sent == 100 * SIZES.capped_piece and cap.peak() > 0


async def test_a_drains_move_keeps_to_its_share_as_the_drain_rewrites_it(tmp_path):
    share = tmp_path / "share"
    share.write_text(str(8 << 20))
    cap = bandwidth.Cap(None, str(share))
    assert cap.rate == 8 << 20                  # read at once
    share.write_text(str(2 << 20))              # another move started
    await cap.take(SIZES.capped_piece)
    assert cap.rate == 8 << 20                  # read again only once a bucket's time has passed
    await asyncio.sleep(SIZES.capped_bucket)
    await cap.take(SIZES.capped_piece)
    assert cap.rate == 2 << 20
    own = bandwidth.Cap(1 << 20, str(share))    # its own cap, lower, holds
    assert own.rate == 1 << 20
