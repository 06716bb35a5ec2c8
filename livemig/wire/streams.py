"""Bytes between CRIU and the network: zstd on the way out, plain on the way in, never staged on disk.

A relay joins a local socket (CRIU's end of a socketpair) to a data stream (an
SSH channel) in both directions: what leaves is zstd-compressed and flushed
after every read, so that CRIU's request/reply exchanges never wait on a
half-filled compression block; what arrives is decompressed. Both ends of a
migration run the same relay, so the format needs no negotiation. Source-side
buffering stays within SIZES.stream_chunk plus the transport's own window.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import zstandard

from .. import proc
from ..options import SIZES
from . import bandwidth

CHUNK = SIZES.stream_chunk
_NAME = struct.Struct(">H")
_SIZE = struct.Struct(">Q")


class Reader(Protocol):
    """The reading end of a byte stream, as asyncio's and asyncssh's streams both have it
    (a data stream to the agent, CRIU's socket, a program's stdout)."""
    async def read(self, n: int = -1) -> bytes: ...
    async def readexactly(self, n: int) -> bytes: ...


class Writer(Protocol):
    """The writing end of a byte stream, as asyncio's and asyncssh's streams both have it."""
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...


Stream = tuple[Reader, Writer]


@dataclass
class Meter:
    """Bytes through one direction of a stream: raw (what CRIU wrote or read) and on the wire."""
    raw: int = 0
    wire: int = 0

    @property
    def ratio(self) -> float:
        return self.raw / self.wire if self.wire else 1.0


# Every byte a move sends, whichever stream carries it, also counts here when a watcher
# set it (progress.Ticker): a context variable, so that no stream's signature carries it.
tally: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("livemig_tally", default=None)


class CompressedWriter:
    """zstd onto a stream writer, counting raw and wire bytes; close() ends the frame and
    sends EOF. The one compressing path of every stream livemig sends, and so the one
    place the move's bandwidth cap (bandwidth.current) is kept. urgent: a fault's pages,
    which go before the pieces of other streams that wait for the cap."""

    def __init__(self, writer: Writer, meter: Meter, level: int, urgent: bool = False):
        self.writer, self.meter, self.tally = writer, meter, tally.get()
        self.cap, self.urgent = bandwidth.current.get(), urgent
        self.comp = zstandard.ZstdCompressor(level=level).compressobj()

    async def write(self, data: bytes, flush: bool = False) -> None:
        self.meter.raw += len(data)
        if self.tally:
            self.tally.raw += len(data)
        out = self.comp.compress(data)
        if flush:
            out += self.comp.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        await self._send(out)

    async def close(self) -> None:
        await self._send(self.comp.flush())
        self.writer.write_eof()

    async def _send(self, out: bytes) -> None:
        if out:
            self.meter.wire += len(out)
            if self.tally:
                self.tally.wire += len(out)
            if self.cap is None or self.cap.rate is None:
                if self.cap is not None:
                    self.cap.count(len(out))
                self.writer.write(out)
                await self.writer.drain()
                return
            for i in range(0, len(out), SIZES.capped_piece):
                piece = out[i:i + SIZES.capped_piece]
                await self.cap.take(len(piece), self.urgent)
                self.writer.write(piece)
                await self.writer.drain()


async def send_compressed(reader: Reader, writer: Writer, meter: Meter, level: int = 1) -> None:
    out = CompressedWriter(writer, meter, level)
    while data := await reader.read(CHUNK):
        await out.write(data, flush=True)
    await out.close()


def inflated(dec, data: bytes, piece: int = SIZES.inflate_piece) -> Iterator[bytes]:
    """data's plain bytes, piece bytes of it inflated at a time: a peer's stream inflates
    32768-fold at most, so each is SIZES.inflated_most at most (what is read may come from a
    target that is not to be trusted with the coordinator's memory)."""
    view = memoryview(data)
    for i in range(0, len(view), piece):
        if plain := dec.decompress(view[i:i + piece]):
            yield plain


async def receive_compressed(reader: Reader, writer: Writer, meter: Meter) -> None:
    dec = zstandard.ZstdDecompressor().decompressobj()
    while data := await reader.read(CHUNK):
        meter.wire += len(data)
        held: list[bytes] = []      # written together, a chunk's worth at most: one send, not one a piece
        size = 0
        for plain in inflated(dec, data):
            held.append(plain)
            size += len(plain)
            if size >= CHUNK:
                await _write(writer, held, meter)
                held, size = [], 0
        await _write(writer, held, meter)
    if writer.can_write_eof():
        writer.write_eof()


async def _write(writer: Writer, pieces: list[bytes], meter: Meter) -> None:
    if pieces:
        out = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        meter.raw += len(out)
        writer.write(out)
        await writer.drain()


@dataclass
class Relay:
    sent: Meter
    received: Meter


async def relay(local: Stream, remote: Stream, level: int = 1) -> Relay:
    """Pump local<->remote until both directions reach EOF. However it ends (cancelled
    included), both streams are closed: CRIU learns at once that its peer is gone."""
    (l_reader, l_writer), (r_reader, r_writer) = local, remote
    result = Relay(Meter(), Meter())
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(send_compressed(l_reader, r_writer, result.sent, level))
            tg.create_task(receive_compressed(r_reader, l_writer, result.received))
    finally:
        l_writer.close()
        r_writer.close()
    return result


async def socket_streams(sock) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a socket whose other end CRIU holds: one end of a socketpair,
    or a loopback TCP connection (the runtimes name page servers by address). The streams
    own the socket from here on: sock is detached, and closing it is a no-op. (Seen with
    uvloop: its transport closed the descriptor under sock, whose own close then failed
    with EBADF, or could have closed a descriptor reused meanwhile.)"""
    sock = socket.socket(sock.family, sock.type, fileno=sock.detach())
    if sock.family == socket.AF_UNIX:
        return await asyncio.open_unix_connection(sock=sock, limit=CHUNK)
    return await asyncio.open_connection(sock=sock, limit=CHUNK)


# --- files: the small images that do not go through the page server ---------------------------
def _checked_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"refusing image file name {name!r}")
    return name


async def send_files(directory: Path, names: list[str], writer: Writer, level: int = 1,
                     empty: frozenset[str] = frozenset()) -> Meter:
    """Write the named regular files of directory as [u16 name][u64 size][bytes]..., then an
    empty name, zstd-compressed as one stream. Names in empty go as empty files."""
    meter = Meter()
    out = CompressedWriter(writer, meter, level)
    for name in names:
        encoded = _checked_name(name).encode()
        if name in empty:
            await out.write(_NAME.pack(len(encoded)) + encoded + _SIZE.pack(0))
            continue
        # blocking reads, kept: image files CRIU has just written, read from the page cache
        with open(directory / name, "rb") as f:  # noqa: ASYNC230
            size = os.fstat(f.fileno()).st_size
            await out.write(_NAME.pack(len(encoded)) + encoded + _SIZE.pack(size))
            while chunk := f.read(CHUNK):
                await out.write(chunk)
    await out.write(_NAME.pack(0))
    await out.close()
    return meter


class Decompressed:
    """The reading end of a CompressedWriter stream: exact reads of the plain bytes.

    Post-copy's pages pass here at wire speed: each is copied once out of the buffer,
    into a bytearray that the kernel then reads in place (uffd.py). Slicing the buffer
    to bytes and deleting the slice copied each page three times more (measured: 1.9 s
    of the target's CPU per 2 GiB)."""

    def __init__(self, reader: Reader, meter: Meter | None = None):
        self.reader, self.meter = reader, meter or Meter()
        self.dec = zstandard.ZstdDecompressor().decompressobj()
        self.buf = bytearray()
        self.pos = 0           # what is before it was handed out already
        self.eof = False
        self._pieces: Iterator[bytes] = iter(())     # the last read's, still to inflate (inflated())

    async def need(self, n: int, what: str = "the stream") -> bytearray:
        """n bytes, writable and the caller's own; EOFError if the stream ends before them.
        What is held beyond them stays under SIZES.inflate_ahead and one piece."""
        while len(self.buf) - self.pos < n:
            if self.pos:
                del self.buf[:self.pos]     # what was handed out, before more comes
                self.pos = 0
            for plain in self._pieces:
                self.meter.raw += len(plain)
                self.buf += plain
                if len(self.buf) >= max(n, SIZES.inflate_ahead):
                    break
            else:
                if len(self.buf) >= n:      # this read's pieces were enough
                    continue
                if self.eof:
                    raise EOFError(f"{what} ended early")
                data = await self.reader.read(CHUNK)
                if not data:
                    self.eof = True
                    continue
                self.meter.wire += len(data)
                self._pieces = inflated(self.dec, data)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


async def receive_files(reader: Reader, directory: Path,
                        accept: Callable[[str, int], None] | None = None) -> tuple[int, int]:
    """The other side of send_files: files land in directory (0600); returns (files, bytes).
    accept(name, size), before each file is written: raises to refuse it (what a peer not
    to be trusted with the disk may send, say)."""
    stream = Decompressed(reader)

    async def need(n: int) -> bytearray:
        return await stream.need(n, "the image file stream")

    files = total = 0
    while True:
        (n,) = _NAME.unpack(await need(_NAME.size))
        if n == 0:
            return files, total
        name = _checked_name((await need(n)).decode())
        (size,) = _SIZE.unpack(await need(_SIZE.size))
        if accept is not None:
            accept(name, size)
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            left = size
            while left:
                chunk = await need(min(left, CHUNK))
                f.write(chunk)
                left -= len(chunk)
        files += 1
        total += size


# --- a program's output to the target, and into a program there ---------------------------------
async def send_output(argv: list[str], writer: Writer, level: int = 1, ok: tuple[int, ...] = (0,)) -> Meter:
    """What argv writes on stdout goes onto writer, compressed; argv must exit with a code in ok."""
    child = await proc.start(argv)
    stdout = child.stdout
    assert stdout is not None      # a pipe: proc.start's default
    meter = Meter()
    out = CompressedWriter(writer, meter, level)
    try:
        while data := await stdout.read(CHUNK):
            await out.write(data)
        await out.close()
        await _exited_ok(child, argv, ok)
    finally:
        await proc.kill(child)
    return meter


async def receive_into(reader: Reader, argv: list[str]) -> int:
    """The other side of send_output: argv reads the stream on stdin and must exit 0;
    the raw bytes it was given."""
    child = await proc.start(argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    stdin = child.stdin
    assert stdin is not None       # a pipe, asked for above
    meter = Meter()
    try:
        await receive_compressed(reader, stdin, meter)
        stdin.close()
        await _exited_ok(child, argv)
    finally:
        await proc.kill(child)
    return meter.raw


async def _exited_ok(child: asyncio.subprocess.Process, argv: list[str], ok: tuple[int, ...] = (0,)) -> None:
    assert child.stderr is not None     # a pipe: proc.start keeps stderr
    err = await child.stderr.read()
    rc = await child.wait()
    if rc not in ok:
        raise proc.failure(argv, rc, err)
