"""bench/delay.py, the relay that gives the bench's far link profile its round trip: bytes come
through whole and in order, each direction held back for half of it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

DELAY = Path(__file__).resolve().parents[2] / "bench" / "delay.py"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_every_byte_comes_back_in_order_no_sooner_than_the_round_trip():
    async def run() -> None:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        relay = await asyncio.create_subprocess_exec(sys.executable, str(DELAY), "127.0.0.1", str(port), "30",
                                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert relay.stdin is not None and relay.stdout is not None
        waits = []
        for _ in range(3):
            t = time.monotonic()
            relay.stdin.write(b"x")
            await relay.stdin.drain()
            assert await relay.stdout.readexactly(1) == b"x"
            waits.append(time.monotonic() - t)
        assert min(waits) >= 0.030          # 15 ms each way, however fast this machine is
        blob = os.urandom(8 << 20)          # more than it holds back at once: its reading pauses, and goes on
        relay.stdin.write(blob)
        sending = asyncio.ensure_future(relay.stdin.drain())
        assert await relay.stdout.readexactly(len(blob)) == blob
        await sending
        relay.stdin.close()                 # the end goes through too: the relay exits
        assert await asyncio.wait_for(relay.wait(), 10) == 0
        server.close()
    asyncio.run(run())
