"""What comes to the target before the restore: CRIU's page servers (one per dump round,
each relayed from a data stream), the images' other files, pre-copy by hashes' pages (kept
in memory, in the store, until a fill places them), a container's bundle, podman's image.
Sent back the other way: a round's pagemaps (SendPagemaps)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from pathlib import Path

from .. import criu, host, proc, workdirs
from ..errors import Phase
from ..options import SIZES, WAITS
from ..pages import frames, pagemap, shadow
from ..runtimes import bundle
from ..wire import protocol as p
from ..wire import streams
from .copy import Copy
from .failures import AgentFailure, checked_name, failing_as, logged_errors
from .workspace import Workspace


class Images:
    def __init__(self, ws: Workspace, copy: Copy):
        self.ws, self.copy = ws, copy
        self.page_servers: dict[str, asyncio.Task[p.PageServerDone]] = {}
        self.store: shadow.Store | None = None      # pre-copy by hashes: the pages sent so far

    # --- CRIU's page servers -----------------------------------------------------------------
    async def open_page_server(self, msg: p.OpenPageServer) -> p.Done:
        d = self.ws.dir(msg.dir, create=True)
        parent = f"../{self.ws.dir(msg.parent).name}" if msg.parent else None
        ours, theirs = socket.socketpair()
        try:
            with failing_as(Phase.TRANSFER, "cannot start criu page-server"):
                server = await proc.start(criu.page_server(str(d), theirs.fileno(), parent),
                                          stdout=asyncio.subprocess.DEVNULL, pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()          # no page server came of it (or it was killed at once): nothing reads it
            raise
        finally:
            theirs.close()
        self.page_servers[msg.dir] = asyncio.create_task(self._page_server(msg, d, ours, server))
        return p.Done()

    async def _page_server(self, msg: p.OpenPageServer, d: Path, ours: socket.socket,
                           server: asyncio.subprocess.Process) -> p.PageServerDone:
        meters = await self._relay_criu(msg.stream, ours, server, Phase.TRANSFER, "criu page-server",
                                        d / "page-server.log")
        return p.PageServerDone(msg.dir, meters.received.wire, meters.received.raw)

    async def _relay_criu(self, token: str, ours: socket.socket, criu_proc: asyncio.subprocess.Process,
                          phase: str, what: str, log: Path) -> streams.Relay:
        """Relay CRIU's end of a socketpair and data stream token until both sides close;
        then CRIU must exit 0, or its log explains why not."""
        try:
            async with self.ws.stream(token) as remote:
                try:
                    meters = await streams.relay(await streams.socket_streams(ours), remote)
                except Exception as e:
                    # the pipe to CRIU broke (an OSError, maybe in a group): CRIU's log says why,
                    # once it has exited; one that does not within 2 s is killed below all the same
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(WAITS.criu_exit_after_broken_pipe):
                            await criu_proc.wait()
                    errors = logged_errors(log)
                    why = errors[0] if errors else _unlogged(e, log.parent)
                    raise AgentFailure(phase, f"{what} failed: {why}", "\n".join(errors)) from e
            rc = await criu_proc.wait()
            if rc != 0:
                raise AgentFailure(phase, f"{what} exited {rc}", "\n".join(logged_errors(log)))
            return meters
        finally:
            await proc.kill(criu_proc)
            ours.close()

    async def await_page_server(self, msg: p.AwaitPageServer) -> p.PageServerDone:
        task = self.page_servers.get(msg.dir)
        if task is None:
            raise AgentFailure(Phase.TRANSFER, f"no page server for {msg.dir}")
        return await task

    async def all_stored(self) -> None:
        """Every page server's pages stored (before CRIU reads them)."""
        for task in self.page_servers.values():
            await task

    # --- image files -------------------------------------------------------------------------
    async def receive_files(self, msg: p.ReceiveFiles) -> p.FilesReceived:
        if (self.ws.work / checked_name(msg.dir, "image directory")).is_dir():
            d = self.ws.dir(msg.dir)
        else:
            d = self.ws.dir(msg.dir, create=True)
            if 0 < msg.in_memory <= host.mem_available() // 2:
                workdirs.in_memory(d, msg.in_memory)     # (refused: on the disk, as always)
            if msg.parent:
                os.symlink(f"../{self.ws.dir(msg.parent).name}", d / "parent")
        async with self.ws.stream(msg.stream) as (reader, _):
            try:
                files, size = await streams.receive_files(reader, d)
            except (ValueError, EOFError, FileExistsError) as e:
                raise AgentFailure(Phase.TRANSFER, f"bad image stream: {e}") from None
        return p.FilesReceived(msg.dir, files, size)

    async def drop_files(self, msg: p.DropFiles) -> p.FilesDropped:
        workdirs.unmount_under(self.ws.dir(msg.dir))
        shutil.rmtree(self.ws.dir(msg.dir))
        return p.FilesDropped(msg.dir)

    async def send_pagemaps(self, msg: p.SendPagemaps) -> p.FilesReceived:
        d = self.ws.dir(msg.dir)
        await self.page_servers[msg.dir]
        pagemaps = sorted(f.name for f in d.glob("pagemap-*.img"))
        pages = sorted(f.name for f in d.glob("pages-*.img"))
        async with self.ws.stream(msg.stream) as (_, writer):
            meter = await streams.send_files(d, pagemaps + pages, writer, empty=frozenset(pages))
        return p.FilesReceived(msg.dir, len(pagemaps) + len(pages), meter.raw)

    # --- pre-copy by hashes' pages -----------------------------------------------------------
    def open_store(self) -> shadow.Store:
        if self.store is None:
            self.store = shadow.Store()
        return self.store

    def close_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    async def store_pages(self, msg: p.StorePages) -> p.PagesStored:
        store = self.open_store()
        pages = 0
        async with self.ws.stream(msg.stream) as (reader, _):
            inbound = streams.Decompressed(reader)
            while True:
                try:
                    kind, pid, vaddr, n = await frames.read(inbound, "pre-copy's page stream")
                except EOFError:
                    raise AgentFailure(Phase.PRECOPY, "pre-copy's page stream ended before its end mark") from None
                if kind == frames.PUSHED_ALL:
                    if n != pages:
                        raise AgentFailure(Phase.PRECOPY, f"pre-copy's page stream brought {pages} pages "
                                                          f"of the {n} sent")
                    break
                if kind != frames.PAGES:
                    raise AgentFailure(Phase.PRECOPY, f"unexpected frame {kind} in pre-copy's page stream")
                data = await inbound.need(n * pagemap.PAGE, "pre-copy's page stream")
                try:
                    store.write(pid, vaddr, data)
                except (OSError, MemoryError) as e:
                    raise AgentFailure(Phase.PRECOPY, f"no memory here for pre-copy's pages: {e}") from None
                pages += n
        return p.PagesStored(pages, store.pages)

    # --- a container's bundle, podman's image ------------------------------------------------
    def tree(self, path: str) -> Path:
        """The bundle's root at path: made, if this migration has none yet, or the one it made."""
        root = Path(path)
        if not root.is_absolute() or os.path.normpath(path) != path or path == "/":
            raise AgentFailure(Phase.TRANSFER, f"refusing bundle path {path!r}: not a plain absolute path")
        if self.copy.created_tree is None:
            if root.exists():
                raise AgentFailure(Phase.TRANSFER, f"{path} already exists here")
            root.mkdir(mode=0o700, parents=True)
            self.copy.created_tree = root       # the copy's: undone with it
            workdirs.own_tree(self.ws.work, root)     # and, should this agent be killed, swept with its images
        elif root != self.copy.created_tree:
            raise AgentFailure(Phase.TRANSFER, f"refusing {path}: this migration's bundle is "
                                               f"{self.copy.created_tree}")
        return root

    async def receive_tree(self, msg: p.ReceiveTree) -> p.TreeReceived:
        root = self.tree(msg.path)
        async with self.ws.stream(msg.stream) as (reader, _):
            try:
                size = await bundle.receive(reader, root, msg.deleted)
            except Exception as e:
                raise AgentFailure(Phase.TRANSFER, f"cannot unpack the bundle into {root}: {e}") from e
        workdirs.own_tree(self.ws.work, root)      # as it is now
        return p.TreeReceived(msg.path, size)

    async def load_image(self, msg: p.LoadImage) -> p.TreeReceived:
        async with self.ws.stream(msg.stream) as (reader, _):
            try:
                size = await streams.receive_into(reader, ["podman", "load"])
            except Exception as e:
                raise AgentFailure(Phase.TRANSFER, f"podman load failed: {e}") from e
        return p.TreeReceived("", size)


def _unlogged(e: BaseException, d: Path) -> str:
    """Why CRIU failed where its log says nothing: a disk so full that it could not write
    even its log, or else the first of what broke the pipe to it."""
    free = shutil.disk_usage(d).free
    if free < SIZES.disk_full_below:
        return f"No space left on device (the image directory's disk has {free >> 10} KiB free)"
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return str(e) or type(e).__name__
