"""The agent's private directory for one move: ROOT/ID, 0700, held by a lock while the agent
lives (workdirs.py); the image directories in it, one per round (checked plain names); and
the data streams, which connect to the UNIX socket streams.sock in it, each introduced by
its token on a first line, and are handed to whichever request waits for that token."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from .. import workdirs
from ..errors import Phase
from ..options import SIZES, WAITS
from .failures import AgentFailure, checked_name

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_Arrived = tuple[asyncio.StreamReader, asyncio.StreamWriter, "asyncio.Future[None]"]


class Workspace:
    def __init__(self, root: Path, work: Path, held: workdirs.Held):
        self.root, self.work, self.held = root, work, held
        self.name = work.name                  # the migration's ID
        self.socket = str(work / "streams.sock")
        self.server: asyncio.AbstractServer | None = None
        self._streams: dict[str, asyncio.Future[_Arrived]] = {}
        # a podman container's networks -> their interfaces here, as the preflight read them: the
        # restore's, within the downtime, with no podman run for them (quiet.hush)
        self.podman_parents: dict[str, str] | None = None

    @classmethod
    def make(cls, root: Path, migration_id: str) -> Workspace:
        """A fresh work directory for migration_id, ours until release()."""
        workdirs.check_root(str(root))      # livemig's alone, before it is made private or swept
        workdirs.sweep(root)      # what agents killed outright left here
        work = root / checked_name(migration_id, "migration id")
        try:
            return cls(root, work, workdirs.make(root, work))
        except FileExistsError:
            # not ours: another agent's, whose directory this one must never remove
            raise AgentFailure(Phase.PREFLIGHT, f"migration {migration_id} already has a work directory "
                                                f"here ({work}): is this host named twice?") from None

    @classmethod
    def adopt(cls, root: Path, migration_id: str, lock: int | None) -> Workspace:
        """A dead agent's work directory, taken over with its lock (its guard held it)."""
        work = root / checked_name(migration_id, "migration id")
        if lock is None or not work.is_dir():
            raise AgentFailure(Phase.PREFLIGHT, f"migration {migration_id} left no work directory here to take over")
        return cls(root, work, workdirs.Held(lock))

    async def listen(self) -> None:
        """Data streams may connect from now on."""
        self.server = await asyncio.start_unix_server(self._on_stream, path=self.socket, limit=SIZES.stream_chunk)
        os.chmod(self.socket, 0o600)

    def close(self) -> None:
        """No more streams (the directory stays: what is left in it is the caller's to say)."""
        if self.server:
            self.server.close()

    def release(self) -> None:
        self.held.release()

    def dir(self, name: str, create: bool = False) -> Path:
        """The image directory name, made (create) or there already."""
        d = self.work / checked_name(name, "image directory")
        if create:
            d.mkdir(mode=0o700)
        elif not d.is_dir():
            raise AgentFailure(Phase.TRANSFER, f"no image directory {name}")
        return d

    def _waiting(self, token: str) -> asyncio.Future[_Arrived]:
        return self._streams.setdefault(token, asyncio.get_running_loop().create_future())

    async def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            token = (await reader.readline()).decode(errors="replace").strip()
            if not token:
                return      # closed unnamed (a probe, or a coordinator gone as it opened it): nobody waits for it
            fut = self._waiting(token)
            if not fut.done():
                fut.set_result((reader, writer, done))
                await done       # the stream lives as long as its consumer needs it
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def stream(self, token: str, within: float | None = WAITS.stream_open) -> AsyncIterator[Stream]:
        """The data stream token, as (reader, writer), held open until the block ends; within:
        how long it may take to come (None: for as long as the caller waits). Once it came,
        the name may come again: a coordinator that rejoins uses the same one each time."""
        fut = self._waiting(token)
        try:
            async with asyncio.timeout(within):
                reader, writer, done = await fut
        except TimeoutError:
            raise AgentFailure(Phase.TRANSFER, f"data stream {token} never arrived") from None
        finally:
            if self._streams.get(token) is fut:
                del self._streams[token]
        try:
            yield reader, writer
        finally:
            done.set_result(None)
