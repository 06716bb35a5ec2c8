"""The coordinator as the agent hears it: its requests in order (read ahead while a handler
runs, since an Abort must cut that handler short), its going (None: its connection ended),
and, once a lazy restore's copy may run, its coming back on a stream of its own (Rejoined).

The link under a post-copy may break while the copy runs, its faults waiting on pages only
the source has. Then the coordinator reaches this host again and connects to the work
directory's stream socket under the name the Restore gave (its rejoin token): from then on
its requests come, and the replies go, on that stream. What the old connection still
brings, or brought and is unanswered, is nobody's: each message is kept with the reader it
came on, and only the current one's are taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

from ..options import WAITS
from ..wire import protocol as p
from .workspace import Workspace


@dataclasses.dataclass(frozen=True)
class Rejoined:
    """The coordinator is back, on the rejoin stream: its requests come on it from now on."""
    stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    held: contextlib.AsyncExitStack       # the stream, open until it is replaced or the agent ends


class Coordinator:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        # its messages, each with the reader it came on (None: it is gone); a Rejoined,
        # once it came back on a stream of its own
        self.inbox: asyncio.Queue[tuple[object, object] | Rejoined] = asyncio.Queue()
        self.read_ahead: list[object] = []     # read while a handler ran, to handle after it
        self._reading: asyncio.Task[None] | None = None
        self._rejoins: asyncio.Task[None] | None = None     # takes it back, once a copy may run
        self._rejoined: contextlib.AsyncExitStack | None = None    # the stream it came back on

    def listen(self) -> None:
        """Its messages go into the inbox as they come, from now on."""
        self._reading = asyncio.create_task(self.read(self.reader))

    async def read(self, reader: asyncio.StreamReader) -> None:
        """Every message on reader, as it comes, into the inbox; None once it ends."""
        try:
            while True:
                self.inbox.put_nowait((reader, await p.read_message(reader)))
        except (EOFError, ConnectionError, p.ProtocolError):
            self.inbox.put_nowait((reader, None))
        except BaseException:
            # whatever else ends this reader (a bug, its cancellation): the loop must not wait
            # on an inbox nobody fills, holding the work directory and its lock for ever
            self.inbox.put_nowait((reader, None))
            raise

    async def take(self) -> object:
        """The next message from the coordinator now heard (one it replaced may still have
        left some: they are nobody's now), or a Rejoined."""
        while True:
            item = await self.inbox.get()
            if isinstance(item, Rejoined):
                return item
            reader, msg = item
            if reader is self.reader:
                return msg

    async def next(self, lost: bool = False) -> object:
        """What to handle next: what was read ahead first. lost: the post-copy failed here
        and its copy is gone (it is waited for WAITS.linger_after_failed_postcopy at most)."""
        if self.read_ahead:
            return self.read_ahead.pop(0)
        if lost:
            # a coordinator that can still reach us asks within seconds. Across a cut link its
            # hang-up may never arrive, and the agent would hold its images for as long as TCP
            # keeps the session.
            async with asyncio.timeout(WAITS.linger_after_failed_postcopy):
                return await self.take()
        return await self.take()

    async def say(self, reply: Any) -> None:
        await p.write_message(self.writer, reply)

    # --- coming back -----------------------------------------------------------------------------
    def accept_rejoins(self, ws: Workspace, token: str) -> None:
        """From now on it may come back on the stream token: after the link broke (and the
        page streams with it), or once its old connection looks dead to it while it does not
        to us (a cut link is silent)."""
        if self._rejoins is None:
            self._rejoins = asyncio.create_task(self._accepting(ws, token))

    @property
    def may_come_back(self) -> bool:
        return self._rejoins is not None

    async def _accepting(self, ws: Workspace, token: str) -> None:
        while True:
            held = contextlib.AsyncExitStack()
            stream = await held.enter_async_context(ws.stream(token, within=None))
            self.inbox.put_nowait(Rejoined(stream, held))

    async def wait_back(self, until: asyncio.Future, within: float) -> bool:
        """It is gone: wait for it to come back (True), until `until` is done (what it would
        come back for is over), or within seconds at most."""
        try:
            async with asyncio.timeout(within):
                while not until.done():
                    coming = asyncio.ensure_future(self.take())
                    try:
                        await asyncio.wait({coming, until}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if not coming.done():
                            coming.cancel()
                    if coming.done() and not coming.cancelled() and isinstance(back := coming.result(), Rejoined):
                        await self.switch(back)
                        return True
        except TimeoutError:
            pass        # the caller settles what it waited for
        return False

    async def switch(self, back: Rejoined) -> None:
        """Its requests come on the rejoin stream from now on; the old connection, and
        whatever was read ahead from it, is nobody's."""
        old, self._rejoined = self._rejoined, back.held
        self.reader, self.writer = back.stream
        self.read_ahead = [m for m in self.read_ahead if isinstance(m, Rejoined)]
        if self._reading is not None:
            self._reading.cancel()
        self.listen()
        if old is not None:
            await old.aclose()

    def stop(self) -> None:
        """Nothing more is read."""
        for task in (self._reading, self._rejoins):
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        self.stop()
        if self._rejoined is not None:
            await self._rejoined.aclose()
