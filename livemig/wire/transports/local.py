"""This host as a transport: for the agent's own tests and for a target that is localhost."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ... import proc
from . import Completed


class LocalProcess:
    def __init__(self, p: asyncio.subprocess.Process, argv: Sequence[str]):
        # pipes, all three, as LocalTransport.start asks
        assert p.stdout is not None and p.stdin is not None and p.stderr is not None
        self._p, self._argv, self._stderr = p, tuple(argv), p.stderr
        self.reader: asyncio.StreamReader = p.stdout
        self.writer: asyncio.StreamWriter = p.stdin

    async def wait(self) -> Completed:
        stderr = await self._stderr.read()
        rc = await self._p.wait()
        return Completed(self._argv, rc, b"", stderr)

    def kill(self) -> None:
        if self._p.returncode is None:
            self._p.kill()

    def running(self) -> bool:
        return self._p.returncode is None


class LocalTransport:
    host = "localhost"

    async def run(self, argv: Sequence[str], *, input: bytes | None = None,
                  timeout: float | None = None) -> Completed:
        r = await proc.run(argv, input=input, check=False, timeout=timeout)
        return Completed(r.argv, r.returncode, r.stdout, r.stderr)

    async def start(self, argv: Sequence[str]) -> LocalProcess:
        p = await proc.start(argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return LocalProcess(p, argv)

    async def open_unix(self, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(path, limit=1 << 20)

    async def close(self) -> None:
        pass
