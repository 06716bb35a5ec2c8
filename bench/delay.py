"""A relay between stdin/stdout and a TCP connection that holds each direction's bytes back
for half a round trip: the latency of a far link, for ssh as its ProxyCommand (bench/link.py).

    python3 delay.py HOST PORT RTT_MS

The link's rate is the lab's veth's, shaped by tc (netem, which would delay packets in the
kernel, is not in our kernel). Bytes keep their order and their pace: a chunk read at t goes
out at t + RTT/2, and reading stops while a direction holds more than BUFFERED bytes, so that
the sender feels the link's rate as it would. Standard library only: it runs on a lab host.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import sys

CHUNK = 1 << 16
BUFFERED = 8 << 20       # per direction, at most: well over a 100 Mbit/s link's bytes in flight


async def _relay(read, write, close, delay: float) -> None:
    """read() -> bytes (b"" at the end), write(bytes) awaited, close() at the end."""
    loop = asyncio.get_running_loop()
    held: collections.deque = collections.deque()
    size, room, more = 0, asyncio.Event(), asyncio.Event()
    room.set()

    async def reading() -> None:
        nonlocal size
        while True:
            await room.wait()
            data = await read()
            held.append((loop.time() + delay, data))
            size += len(data)
            if size >= BUFFERED:
                room.clear()
            more.set()
            if not data:
                return

    async def writing() -> None:
        nonlocal size
        while True:
            while not held:
                more.clear()
                await more.wait()
            due, data = held.popleft()
            size -= len(data)
            if size < BUFFERED:
                room.set()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                close()
                return
            await write(data)

    await asyncio.gather(reading(), writing())


async def main(host: str, port: int, rtt_ms: float) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(host, port, family=socket.AF_INET)
    stdin = asyncio.StreamReader(limit=CHUNK)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin.buffer)
    out_transport, out_protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    stdout = asyncio.StreamWriter(out_transport, out_protocol, None, loop)

    async def to_tcp(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def to_stdout(data: bytes) -> None:
        stdout.write(data)
        await stdout.drain()

    half = rtt_ms / 2000
    await asyncio.gather(_relay(lambda: stdin.read(CHUNK), to_tcp, writer.write_eof, half),
                         _relay(lambda: reader.read(CHUNK), to_stdout, stdout.close, half))


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
    except (ConnectionError, BrokenPipeError):
        sys.exit(0)         # one side hung up: ssh tells the story
