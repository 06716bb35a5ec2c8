"""The target side: `livemig agent`, started by the coordinator over SSH.

It speaks the framed protocol (protocol.py) on its stdin/stdout, keeps every
image in a private directory (0700) of its own, runs CRIU's page servers and
restore there, places post-copy's pages itself (pages/placer.py), and takes data
streams on a UNIX socket in that directory. It restores the tree stopped and
lets it run only when told the source is gone (Resume). When the coordinator
vanishes before that, it cannot tell whether the source was committed away: the
restored tree is left stopped, never killed, the images are deleted, and a
marker (ORPHANED.json) says what was left, for the source's `livemig recover` to
resume or kill through a fresh agent (SettleOrphan), by the commit mark the
source wrote.
Post-copy is the exception: a copy that lacks pages dies with its page source,
whoever vanished (see _settle_lazy and guard.py), since the source's copy, stopped
and whole, outlives it; a verdict file tells the source's `livemig recover` so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from ..version import __version__
from ..runtimes import bundle
from .. import criu, host, logs, proc, workdirs
from ..pages import frames, pagemap, placer, postcopy, shadow
from ..wire import protocol as p, streams
from .. import runtimes
from ..runtimes import oci, podman
from ..runtimes.held import HeldCopy
from ..errors import LivemigError, Phase

DEFAULT_ROOT = "/var/lib/livemig"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STREAM_TIMEOUT = 60
LINGER_SECONDS = 60    # after a failed post-copy, for the coordinator to settle it


class AgentFailure(Exception):
    def __init__(self, phase: str, message: str, detail: str = ""):
        super().__init__(message)
        self.phase, self.message, self.detail = phase, message, detail


def checked_name(name: str, what: str) -> str:
    if not _NAME.match(name or ""):
        raise AgentFailure(Phase.PREFLIGHT, f"refusing {what} {name!r}: not a plain name")
    return name


class Agent:
    def __init__(self, reader, writer, root: str = DEFAULT_ROOT):
        self.reader, self.writer, self.root = reader, writer, Path(root)
        self.verdicts = Verdicts(self.root)
        self.work: Path | None = None
        self.server: asyncio.AbstractServer | None = None
        self.streams: dict[str, asyncio.Future] = {}
        self.page_servers: dict[str, asyncio.Task] = {}
        self.lazy: asyncio.Task | None = None
        self.placer: placer.Placer | None = None
        self.store: shadow.Store | None = None      # pre-copy by hashes: the pages sent so far
        self.guard = None                           # guard.py, during post-copy
        # a fill that ended before the copy ran: its guard and uffds are kept until Resume
        self.whole_stopped = False
        self.filling = False      # the lazy copy is a fill's: every page on this host before it runs
        self.guard_socket: socket.socket | None = None
        self.restored: list[int] = []               # the root PIDs of what was restored here
        self.restoring: asyncio.subprocess.Process | None = None    # CRIU (or a runtime) restoring now
        self.inbox: asyncio.Queue = asyncio.Queue()     # the coordinator's messages (None: it is gone)
        self.held: workdirs.Held | None = None     # self.work, ours while we live
        self.inbox_reader: asyncio.Task | None = None
        self.read_ahead: list = []        # read while a handler ran, to handle after it
        self.stopping: str | None = None  # why a handler was cut short
        self.containers: list[p.Container] = []     # restored through their runtime (a clone: several)
        self.created_tree: Path | None = None       # a bundle this migration brought here
        self.resumed = False
        self.finished = False
        self.holds_workload = False   # something restored here may be the only copy left

    # --- the loop --------------------------------------------------------------------------
    async def serve(self) -> int:
        try:
            hello = await p.read_message(self.reader)
            if not isinstance(hello, p.Hello) or hello.protocol != p.PROTOCOL_VERSION:
                await p.write_message(self.writer, p.Failed(
                    Phase.PREFLIGHT, f"protocol mismatch: the coordinator speaks "
                    f"{getattr(hello, 'protocol', '?')}, this agent (livemig {__version__}) "
                    f"speaks {p.PROTOCOL_VERSION}"))
                return 2
            await self._start(hello)
            self.inbox_reader = asyncio.create_task(self._read_inbox())
            while not self.finished:
                msg = self.read_ahead.pop(0) if self.read_ahead else await self._next_message()
                if msg is None:
                    return 1     # the coordinator is gone: cleanup below decides what stays
                try:
                    reply = await self._answer(msg)
                except AgentFailure as e:
                    reply = p.Failed(e.phase, e.message, e.detail)
                except asyncio.CancelledError:
                    if self.stopping is None:
                        raise
                    reply = p.Failed(Phase.ROLLBACK, f"{type(msg).__name__} cut short: {self.stopping}")
                    self.stopping = None
                except Exception as e:
                    # a bug here must still reach the coordinator as an answer, which then
                    # rolls back or reports; dying would leave it guessing
                    reply = p.Failed("", f"the agent failed on {type(msg).__name__}: "
                                         f"{type(e).__name__}: {e}", traceback.format_exc())
                if self.read_ahead and self.read_ahead[0] is None:
                    return 1
                await p.write_message(self.writer, reply)
            return 0
        except (EOFError, ConnectionError, TimeoutError):
            return 1     # the coordinator is gone: cleanup below decides what stays
        finally:
            if self.inbox_reader is not None:
                self.inbox_reader.cancel()
            await self._cleanup()

    async def _read_inbox(self) -> None:
        """Every message, as it comes, into the inbox; None once the coordinator is gone."""
        try:
            while True:
                self.inbox.put_nowait(await p.read_message(self.reader))
        except (EOFError, ConnectionError, p.ProtocolError):
            self.inbox.put_nowait(None)

    async def _answer(self, msg):
        """msg's handler; cut short if the coordinator rolls back (Abort), or goes while a
        restore runs: a restore whose page stream never comes would wait for it for a
        minute, and the rollback's Abort, behind it, with it. Other handlers outlive a
        coordinator that went (a fill whose pages are all here completes without it). What
        comes meanwhile waits its turn."""
        handling = asyncio.ensure_future(self.handle(msg))
        try:
            while True:
                incoming = asyncio.ensure_future(self.inbox.get())
                await asyncio.wait({handling, incoming}, return_when=asyncio.FIRST_COMPLETED)
                if not incoming.done():
                    incoming.cancel()
                    return handling.result()
                nxt = incoming.result()
                self.read_ahead.append(nxt)
                if isinstance(nxt, p.Abort) or (nxt is None and self.restoring is not None):
                    self.stopping = "the coordinator is gone" if nxt is None else "the coordinator rolls back"
                    self._stop_restoring()
                    handling.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await handling
                    return handling.result()
        finally:
            if not handling.done():
                handling.cancel()

    async def _next_message(self):
        if self.lazy is not None and self.lazy.done() and self.verdicts.read(self.work.name)[0] == "killed":
            # Post-copy failed here and its copy is gone: a coordinator that can still reach
            # us asks within seconds. Across a cut link its hang-up may never arrive, and
            # this agent would hold its images for as long as TCP keeps the session.
            async with asyncio.timeout(LINGER_SECONDS):
                return await self.inbox.get()
        return await self.inbox.get()

    async def _start(self, hello: p.Hello) -> None:
        workdirs.sweep(self.root)      # what agents killed outright left here
        self.work = self.root / checked_name(hello.migration_id, "migration id")
        self.held = workdirs.make(self.root, self.work)
        sock_path = str(self.work / "streams.sock")
        self.server = await asyncio.start_unix_server(self._on_stream, path=sock_path, limit=streams.CHUNK)
        os.chmod(sock_path, 0o600)
        await p.write_message(self.writer, p.Welcome(p.PROTOCOL_VERSION, __version__, str(self.work), sock_path))

    async def handle(self, msg):
        handler = getattr(self, f"on_{type(msg).__name__}", None)
        if handler is None:
            raise AgentFailure(Phase.PREFLIGHT, f"unexpected {type(msg).__name__}")
        return await handler(msg)

    # --- data streams ----------------------------------------------------------------------
    async def _on_stream(self, reader, writer) -> None:
        done = asyncio.get_running_loop().create_future()
        try:
            token = (await reader.readline()).decode(errors="replace").strip()
            fut = self.streams.setdefault(token, asyncio.get_running_loop().create_future())
            if not fut.done():
                fut.set_result((reader, writer, done))
                await done       # the stream lives as long as its consumer needs it
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def stream(self, token: str):
        """The data stream token, as (reader, writer), held open until the block ends."""
        fut = self.streams.setdefault(token, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(STREAM_TIMEOUT):
                reader, writer, done = await fut
        except TimeoutError:
            raise AgentFailure(Phase.TRANSFER, f"data stream {token} never arrived") from None
        try:
            yield reader, writer
        finally:
            done.set_result(None)

    def _dir(self, name: str, create: bool = False) -> Path:
        d = self.work / checked_name(name, "image directory")
        if create:
            d.mkdir(mode=0o700)
        elif not d.is_dir():
            raise AgentFailure(Phase.TRANSFER, f"no image directory {name}")
        return d

    # --- preflight -------------------------------------------------------------------------
    async def on_Probe(self, msg: p.Probe) -> p.HostFacts:
        facts = await host.probe(msg.pids, str(self.work))
        c = msg.container
        if c is None:
            return facts
        names = [checked_name(n, "container name") for n in [c.id, *msg.names]]   # for the runtime's argv
        taken = [n for n in names if await runtimes.known(dataclasses.replace(c, id=n))]
        if c.runtime == "podman":
            info = await podman.facts()
            image = await proc.run(["podman", "image", "exists", c.image], check=False) if info else None
            return dataclasses.replace(facts, runtime_version=info.get("podman", ""),
                                       container_exists=c.id in taken, names_taken=taken,
                                       image_present=bool(image and image.returncode == 0),
                                       runtime_facts=info)
        if c.runtime not in oci.RUNTIMES:
            raise AgentFailure(Phase.PREFLIGHT, f"unknown runtime {c.runtime!r}")
        where = Path(c.bundle)
        if not where.exists():
            state = "absent"
        elif msg.bundle_marker and (where / checked_name(msg.bundle_marker, "marker")).exists():
            state = "shared"
        else:
            state = "exists"
        return dataclasses.replace(facts, runtime_version=await oci.version(c.runtime),
                                   container_exists=c.id in taken, names_taken=taken,
                                   bundle=state)

    async def on_CpuinfoCheck(self, msg: p.CpuinfoCheck) -> p.CpuinfoResult:
        d = self._dir("cpuinfo", create=True)
        async with self.stream(msg.stream) as (reader, _):
            await streams.receive_files(reader, d)
        res = await proc.run(criu.cpuinfo_check(str(d)), check=False)
        if res.returncode == 0:
            return p.CpuinfoResult(True)
        log = (d / "cpuinfo-check.log").read_text(errors="replace") if (d / "cpuinfo-check.log").exists() else ""
        why = "; ".join(criu.log_errors(log)) or res.stderr.decode(errors="replace").strip()
        return p.CpuinfoResult(False, why or "criu cpuinfo check failed")

    # --- images ----------------------------------------------------------------------------
    async def on_OpenPageServer(self, msg: p.OpenPageServer) -> p.Done:
        d = self._dir(msg.dir, create=True)
        parent = f"../{self._dir(msg.parent).name}" if msg.parent else None
        ours, theirs = socket.socketpair()
        try:
            server = await proc.start(criu.page_server(str(d), theirs.fileno(), parent),
                                      stdout=asyncio.subprocess.DEVNULL, pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()          # no page server came of it (or it was killed at once): nothing reads it
            raise
        finally:
            theirs.close()
        self.page_servers[msg.dir] = asyncio.create_task(self._page_server(msg, d, ours, server))
        return p.Done()

    async def _page_server(self, msg: p.OpenPageServer, d: Path, ours: socket.socket, server) -> p.PageServerDone:
        meters = await self._relay_criu(msg.stream, ours, server, Phase.TRANSFER, "criu page-server",
                                        d / "page-server.log")
        return p.PageServerDone(msg.dir, meters.received.wire, meters.received.raw)

    async def _relay_criu(self, token: str, ours: socket.socket, criu_proc, phase: str, what: str,
                          log: Path):
        """Relay CRIU's end of a socketpair and data stream token until both sides close;
        then CRIU must exit 0, or its log explains why not."""
        try:
            async with self.stream(token) as remote:
                try:
                    meters = await streams.relay(await streams.socket_streams(ours), remote)
                except Exception as e:
                    # the pipe to CRIU broke (an OSError, maybe in a group): CRIU's log says why
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(2):
                            await criu_proc.wait()
                    errors = criu.log_errors(_read(log))
                    why = errors[0] if errors else (str(e) or type(e).__name__)
                    raise AgentFailure(phase, f"{what} failed: {why}", "\n".join(errors)) from None
            rc = await criu_proc.wait()
            if rc != 0:
                raise AgentFailure(phase, f"{what} exited {rc}", "\n".join(criu.log_errors(_read(log))))
            return meters
        finally:
            await proc.kill(criu_proc)
            ours.close()

    async def on_AwaitPageServer(self, msg: p.AwaitPageServer) -> p.PageServerDone:
        task = self.page_servers.get(msg.dir)
        if task is None:
            raise AgentFailure(Phase.TRANSFER, f"no page server for {msg.dir}")
        return await task

    async def on_ReceiveFiles(self, msg: p.ReceiveFiles) -> p.FilesReceived:
        if (self.work / checked_name(msg.dir, "image directory")).is_dir():
            d = self._dir(msg.dir)
        else:
            d = self._dir(msg.dir, create=True)
            if msg.parent:
                os.symlink(f"../{self._dir(msg.parent).name}", d / "parent")
        async with self.stream(msg.stream) as (reader, _):
            try:
                files, size = await streams.receive_files(reader, d)
            except (ValueError, EOFError, FileExistsError) as e:
                raise AgentFailure(Phase.TRANSFER, f"bad image stream: {e}") from None
        return p.FilesReceived(msg.dir, files, size)

    async def on_SendPagemaps(self, msg: p.SendPagemaps) -> p.FilesReceived:
        d = self._dir(msg.dir)
        await self.page_servers[msg.dir]
        pagemaps = sorted(f.name for f in d.glob("pagemap-*.img"))
        pages = sorted(f.name for f in d.glob("pages-*.img"))
        async with self.stream(msg.stream) as (_, writer):
            meter = await streams.send_files(d, pagemaps + pages, writer, empty=frozenset(pages))
        return p.FilesReceived(msg.dir, len(pagemaps) + len(pages), meter.raw)

    async def on_StorePages(self, msg: p.StorePages) -> p.PagesStored:
        if self.store is None:
            self.store = shadow.Store()
        pages = 0
        async with self.stream(msg.stream) as (reader, _):
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
                    self.store.write(pid, vaddr, data)
                except (OSError, MemoryError) as e:
                    raise AgentFailure(Phase.PRECOPY, f"no memory here for pre-copy's pages: {e}") from None
                pages += n
        return p.PagesStored(pages, self.store.pages)

    async def on_ReceiveTree(self, msg: p.ReceiveTree) -> p.TreeReceived:
        root = Path(msg.path)
        if not root.is_absolute() or os.path.normpath(msg.path) != msg.path or msg.path == "/":
            raise AgentFailure(Phase.TRANSFER, f"refusing bundle path {msg.path!r}: not a plain absolute path")
        if self.created_tree is None:
            if root.exists():
                raise AgentFailure(Phase.TRANSFER, f"{msg.path} already exists here")
            root.mkdir(mode=0o700, parents=True)
            self.created_tree = root
        elif root != self.created_tree:
            raise AgentFailure(Phase.TRANSFER, f"refusing {msg.path}: this migration's bundle is "
                                               f"{self.created_tree}")
        async with self.stream(msg.stream) as (reader, _):
            try:
                size = await bundle.receive(reader, root)
                bundle.remove_deleted(root, msg.deleted)
            except Exception as e:
                raise AgentFailure(Phase.TRANSFER, f"cannot unpack the bundle into {root}: {e}") from None
        return p.TreeReceived(msg.path, size)

    async def on_LoadImage(self, msg: p.LoadImage) -> p.TreeReceived:
        async with self.stream(msg.stream) as (reader, _):
            try:
                size = await streams.receive_into(reader, ["podman", "load"])
            except Exception as e:
                raise AgentFailure(Phase.TRANSFER, f"podman load failed: {e}") from None
        return p.TreeReceived("", size)

    # --- restore, commit, rollback ---------------------------------------------------------
    async def on_Restore(self, msg: p.Restore) -> p.Restored:
        d = self._dir(msg.dir)
        for task in self.page_servers.values():
            await task   # every page is stored before CRIU reads them
        if msg.lazy_stream:
            await self._start_placer(d, msg.lazy_stream, msg.fault_stream, msg.fill)
        pidfile = self.work / f"restored-{len(self.restored)}.pid"
        self.holds_workload |= not msg.replica
        c, lazy = msg.container, bool(msg.lazy_stream)
        if c is not None:
            if c.runtime not in runtimes.CONTAINER_RUNTIMES:
                raise AgentFailure(Phase.RESTORE, f"unknown runtime {c.runtime!r}")
            checked_name(c.id, "container name")
            if await runtimes.known(c):   # never touch a container of someone else's
                raise AgentFailure(Phase.RESTORE, f"{c.runtime} already has a container {c.id} here")
            argv = runtimes.restore_command(c, d, pidfile, lazy)
            self.containers.append(c)
            self._tell_guard("container", c.runtime, c.id)
        else:
            argv = criu.restore(str(d), str(pidfile), lazy=lazy, opts=criu.Options())
            self._tell_guard("pidfile", str(pidfile))
        t0 = time.monotonic()
        try:
            res = await proc.run(argv, check=False, leaves_daemon=c is not None,   # podman leaves conmon
                                 started=lambda pr: setattr(self, "restoring", pr))
        finally:
            self.restoring = None
        if c is not None and res.returncode == 0:
            # A runtime restores running: pause at once, so that the container runs only
            # after the source is gone, like a tree restored stopped.
            pause = runtimes.control(c, "pause")
            paused = await _pause(pause, lazy)
            if paused.returncode != 0:
                res, argv = paused, pause
            if c.runtime == "podman" and (found := await podman.inspect(c.id)):
                self.restored.append(int(found["State"]["Pid"]))
        seconds = time.monotonic() - t0
        if pidfile.exists():
            self.restored.append(int(pidfile.read_text().strip()))
        if self.lazy is not None and self.lazy.done() and \
                (self.lazy.cancelled() or self.lazy.exception() is not None):
            # the page stream failed while CRIU restored: this copy can never be whole
            await self._kill_restored()
            raise AgentFailure(Phase.RESTORE, "post-copy's page stream ended during the restore: "
                                              f"{self.verdicts.read(self.work.name)[1]}")
        if res.returncode != 0:
            await self._kill_restored()
            errors = criu.log_errors(_read(d / "restore.log"))
            what = " ".join(argv[:2])
            raise AgentFailure(Phase.RESTORE, errors[0] if errors else
                               f"{what} exited {res.returncode}: {proc.why(res.stderr)}",
                               "\n".join(errors))
        if self.holds_workload and self.lazy is None:
            self._mark_orphan()
        return p.Restored(self.restored[-1] if self.restored else 0, seconds)

    async def _start_placer(self, d: Path, token: str, faults: str | None, fill: bool = False) -> None:
        """Post-copy's target side (pages/placer.py): listening before CRIU's restore looks for it.
        fill: the same machinery fills the copy from the store: pre-copy by hashes', where
        the source says a page is unchanged, and every page pushed before the copy runs
        (stop-and-copy into memory too); the copy may run (Resume) once every page is
        here, the source's copy waiting, stopped, until it has them all, as in post-copy."""
        try:
            ranges = pagemap.lazy_ranges(d)
        except (OSError, pagemap.PagemapError) as e:
            raise AgentFailure(Phase.RESTORE, f"cannot read the dump's pagemaps: {e}") from None
        # Before anything is restored: from here on `livemig recover` finds a verdict.
        self.verdicts.write(self.work.name, "serving")
        self.filling = fill
        if fill and self.store is None:
            self.store = shadow.Store()     # stop-and-copy into memory: every page is pushed into it
        await self._start_guard()
        self.placer = placer.Placer(d, ranges, on_uffd=lambda fd: self._tell_guard("uffd", fds=(fd,)),
                                    store=self.store)
        self.placer.listen()
        self.lazy = asyncio.create_task(self._place_pages(token, faults, fill))

    async def _start_guard(self) -> None:
        """guard.py: should this agent die during post-copy, its copy dies before its uffds."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Its output goes nowhere: it must outlive us and the SSH session's pipes (and, a
            # session of its own, what kills our process group). What it did, it writes in the verdict.
            self.guard = await proc.start(
                [sys.executable, "-m", "livemig.target.guard", str(theirs.fileno()), str(self.verdicts.root),
                 self.work.name],
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.guard_socket = ours

    def _tell_guard(self, *words: str, fds: tuple[int, ...] = ()) -> None:
        if self.guard_socket is not None:
            socket.send_fds(self.guard_socket, [" ".join(words).encode()], list(fds))
            if words == ("done",):
                self.guard_socket.close()
                self.guard_socket = None

    async def _place_pages(self, token: str, faults: str | None, fill: bool = False) -> p.LazyDone:
        try:
            async with self.stream(token) as remote, \
                    self.stream(faults) if faults else contextlib.nullcontext() as fault_stream:
                served = await self.placer.run(remote, fault_stream)
        except BaseException as e:
            await self._settle_lazy(str(e) or type(e).__name__)
            phase = Phase.FILL if fill else Phase.POSTCOPY
            if isinstance(e, postcopy.PageStreamError):
                raise AgentFailure(phase, str(e)) from None
            if isinstance(e, OSError):
                raise AgentFailure(phase, f"{'filling the copy' if fill else 'post-copy'} failed: {e}") from None
            raise
        done = p.LazyDone(served.pages_served, served.requests, served.requests_waited, served.pages_known)
        if fill and not self.resumed:
            # whole before it ran (a small one): "whole" is said at Resume, and until then
            # the copy dies with this agent, as a copy still filling does
            self.whole_stopped = True
            return done
        await self._whole(fill)
        return done

    async def _whole(self, fill: bool) -> None:
        """The copy has every page: it is the workload once it runs (post-copy's may be
        whole before its Resume: that keeps the placer, so that Resume does not say
        "running", a stop-and-copy's word, over "whole")."""
        self.whole_stopped = False
        self.verdicts.write(self.work.name, "whole")
        await self._release_guard()
        self.placer.close()      # after the guard: a fault on a never-written page still finds us
        if fill:
            self.placer = None
            self._close_store()

    def _close_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    async def _settle_lazy(self, why: str) -> None:
        """Post-copy ends before its time. The copy runs on only if it is whole and already
        running; anything else goes, and the source's copy, stopped since the final dump,
        is the workload. Its uffds are let go only once it is dead or whole."""
        if self.placer.whole and self.resumed:
            self.verdicts.write(self.work.name, "whole")
        else:
            await self._kill_restored(even_running=True)
            said = "the fill ended before every page was in the copy" if self.filling else \
                "post-copy ended before every page was here"
            self.verdicts.write(self.work.name, "killed", f"{said}: {why}")
        await self._release_guard()
        self.placer.close()

    async def _release_guard(self) -> None:
        with contextlib.suppress(OSError):     # a guard already gone has nothing to let go
            self._tell_guard("done")
        if self.guard is not None:
            await self.guard.wait()
            self.guard = None

    async def on_AwaitLazy(self, msg: p.AwaitLazy) -> p.LazyDone:
        if self.lazy is None:
            raise AgentFailure(Phase.POSTCOPY, "no post-copy in progress")
        return await self.lazy

    async def on_SettlePostcopy(self, msg: p.SettlePostcopy) -> p.PostcopySettled:
        if self.lazy is None:
            raise AgentFailure(Phase.POSTCOPY, "no post-copy in progress")
        await self._end_lazy()
        state, detail = self.verdicts.read(self.work.name)
        return p.PostcopySettled(whole=state == "whole", detail=detail)

    async def on_AskVerdict(self, msg: p.AskVerdict) -> p.Verdict:
        state, detail = self.verdicts.read(checked_name(msg.migration_id, "migration id"))
        return p.Verdict(msg.migration_id, state, detail)

    async def on_ForgetVerdict(self, msg: p.ForgetVerdict) -> p.Done:
        self.verdicts.forget(checked_name(msg.migration_id, "migration id"))
        return p.Done()

    async def on_Resume(self, msg: p.Resume) -> p.Resumed:
        if not self.restored:
            raise AgentFailure(Phase.COMMIT, "nothing was restored" if self.lazy is None else
                               f"the restored copy is gone: {self.verdicts.read(self.work.name)[1]}")
        if self.placer is not None and self.placer.store is not None:
            await self._all_here()
        pids = [pid for root in self.restored for pid in proc.process_tree(root)]
        if self.containers:
            for c in self.containers:
                await proc.run(runtimes.control(c, "resume"), phase=Phase.COMMIT)
        else:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        self.resumed = True
        (self.work / ORPHAN).unlink(missing_ok=True)     # it runs: a move's, no more an orphan
        if self.whole_stopped:
            await self._whole(fill=True)
        elif self.placer is not None:
            self.placer.resumed()
        elif self.holds_workload:
            # should the coordinator vanish now, `livemig recover` learns the copy here runs
            self.verdicts.write(self.work.name, "running")
        return p.Resumed(pids)

    async def _all_here(self) -> None:
        """A fill's copy may run once every frame of the source's push is read: every page
        missing then is in this host's memory. Waits for that, or for the fill's failure."""
        here = asyncio.ensure_future(self.placer.all_here.wait())
        try:
            await asyncio.wait({here, self.lazy}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            here.cancel()
        if not self.placer.all_here.is_set():
            raise AgentFailure(Phase.FILL, "the copy cannot be filled: "
                                           f"{self.verdicts.read(self.work.name)[1] or 'its page stream ended'}")

    async def on_Abort(self, msg: p.Abort) -> p.Aborted:
        await self._end_lazy()
        await self._kill_restored()
        kept = logs.keep(self.work, str(self.root), f"{self.work.name}-target") if self.work else None
        return p.Aborted(str(kept or ""))

    async def _end_lazy(self) -> None:
        """Stop post-copy, if under way; it settles its copy on the way out (_settle_lazy)."""
        if self.lazy is not None and not self.lazy.done():
            self.lazy.cancel()
        if self.lazy is not None:
            try:
                await self.lazy
            except BaseException:
                pass
        if self.whole_stopped and not self.resumed:
            self.whole_stopped = False
            await self._settle_lazy("the copy was never told to run")

    async def on_Finish(self, msg: p.Finish) -> p.Done:
        self.finished = True
        self.verdicts.forget(self.work.name)     # the coordinator knows how it ended
        return p.Done()

    def _stop_restoring(self) -> None:
        """A restore under way goes, its tasks with it. A lazy restore whose page stream ended
        waits, in CRIU's restorer, for pages that never come (a fault's wait ends at a fatal
        signal). Its tasks are killed before CRIU: they would outlive it, stopped."""
        if self.restoring is not None and self.restoring.returncode is None:
            proc.kill_tree(self.restoring.pid)     # the tasks it restored, whichever group they took
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.restoring.pid, signal.SIGKILL)    # and what it forked since

    async def _kill_restored(self, even_running: bool = False) -> None:
        """Undo the restore: what this migration brought here goes, unless it already runs
        (even_running: a post-copy copy that lacks pages goes all the same)."""
        undo = even_running or not self.resumed
        self._stop_restoring()
        while self.containers and undo:
            # delete --force thaws what it kills: a frozen task cannot die
            await proc.run(runtimes.control(self.containers.pop(), "delete"), check=False, timeout=60)
        if self.created_tree is not None and undo:
            shutil.rmtree(self.created_tree, ignore_errors=True)
            self.created_tree = None
        while self.restored and undo:
            proc.kill_tree(self.restored.pop())
        if undo and self.work is not None:
            (self.work / ORPHAN).unlink(missing_ok=True)

    async def _cleanup(self) -> None:
        # The coordinator may be gone mid-post-copy: the copy is settled first (a copy
        # lacking pages never outlives its page source), and is no orphan then.
        await self._end_lazy()
        orphan = bool(self.restored) and self.holds_workload and not self.resumed and not self.finished
        if orphan:
            # The coordinator vanished between our restore and its Resume: it may have
            # committed (the source is dead) or not (the source runs again). We cannot
            # tell, so the tree stays stopped, never killed: it is the workload if the
            # source is gone. A marker says so; `livemig recover` settles it.
            self._leave_orphan()
        for task in [*self.page_servers.values(), *([self.lazy] if self.lazy else [])]:
            task.cancel()
        for task in [*self.page_servers.values(), *([self.lazy] if self.lazy else [])]:
            try:
                await task
            except BaseException:
                pass
        self._close_store()
        if self.server:
            self.server.close()
        if not orphan:
            await self._kill_restored()    # a bundle copied before the coordinator vanished
        if self.work and not orphan:
            shutil.rmtree(self.work, ignore_errors=True)
        await self._release_guard()     # what it guarded is settled, killed or left as an orphan
        if self.held is not None:
            self.held.release()

    def _what_restored(self) -> str:
        if self.containers:
            return ", ".join(f"{c.runtime} container {c.id}" for c in self.containers)
        return "tree " + ", ".join(map(str, self.restored))

    def _mark_orphan(self) -> None:
        """What was restored here, stopped, in the marker recover reads: written at once after
        a restore, so that an agent killed outright (no guard keeps a stop-and-copy's copy:
        after the commit it is the only one) leaves it too."""
        pids = [pid for root in self.restored for pid in proc.process_tree(root)]
        c = self.containers[0] if self.containers else None      # a move restores one (replicas never hold it)
        Orphan(self._what_restored(), HeldCopy(
            c.runtime if c else "process", proc.tasks(pids), c.id if c else "",
            str(self.created_tree) if self.created_tree else "", proc.boot_id())).save(self.work)

    def _leave_orphan(self) -> None:
        for d in self.work.iterdir():   # the memory images go, whatever happens
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
        self._mark_orphan()
        print(f"livemig agent: the coordinator vanished; restored {self._what_restored()} left "
              f"stopped (see {self.work / ORPHAN}; `livemig recover` on the source settles it)", file=sys.stderr)

    async def on_SettleOrphan(self, msg: p.SettleOrphan) -> p.OrphanSettled:
        mid = checked_name(msg.migration_id, "migration id")
        work = self.root / mid
        try:
            held = workdirs.hold(work)
        except BlockingIOError:
            # its agent still tidies up (it lost its coordinator a moment ago)
            raise AgentFailure(Phase.COMMIT, f"the agent of move {mid} is still there: try again") from None
        except FileNotFoundError:
            held = None
        try:
            return await self._settle_orphan(mid, work, msg.resume)
        finally:
            if held is not None:
                held.release()

    async def _settle_orphan(self, mid: str, work: Path, resume: bool) -> p.OrphanSettled:
        try:
            orphan = Orphan.load(work)
        except FileNotFoundError:
            # resumed before its coordinator vanished (that verdict is written at Resume)?
            running = self.verdicts.read(mid)[0] == "running"
            return p.OrphanSettled("running" if running else "none")
        warnings = []
        if resume:
            try:
                await orphan.copy.resume()
            except LivemigError as e:
                raise AgentFailure(Phase.COMMIT, f"cannot resume {orphan.what}: {e}") from None
            self.verdicts.write(mid, "running")
        else:
            warnings = await orphan.copy.end()     # its bundle with it
        shutil.rmtree(work, ignore_errors=True)
        return p.OrphanSettled("resumed" if resume else "killed", "; ".join([orphan.what, *warnings]))


ORPHAN = "ORPHANED.json"


@dataclasses.dataclass
class Orphan:
    """A restored copy left stopped because the coordinator vanished between the restore
    and the resume: what `livemig recover`, through SettleOrphan, resumes or ends."""
    what: str
    copy: HeldCopy          # its bundle, if this move brought it here, goes with it

    def save(self, work: Path) -> None:
        workdirs.write_private(work / ORPHAN, dataclasses.asdict(self))

    @classmethod
    def load(cls, work: Path) -> "Orphan":
        d = json.loads((work / ORPHAN).read_text())
        return cls(d["what"], HeldCopy.from_dict(d["copy"]))


class Verdicts:
    """How each post-copy ended on this host (or, for stop-and-copy, that the copy was
    resumed), kept after the agent is gone: the source's `livemig recover` asks, when its
    coordinator never learnt it. One small file per migration in the image root
    (ID.verdict), no memory in it; written before anything it describes can be seen, and
    forgotten once the coordinator knows."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, migration_id: str) -> Path:
        return self.root / f"{migration_id}.verdict"

    def write(self, migration_id: str, state: str, detail: str = "") -> None:
        """Durable before it returns. Each file keeps VERDICT_ROOM bytes, so that a verdict
        still lands when the disk has filled up since the first (a copy declared whole, but
        not written so, would run beside the source's copy resumed for want of a verdict)."""
        path = self.path(migration_id)
        record = f"{state}\n{detail}\n".encode()[:VERDICT_ROOM - 1]
        record = record.ljust(VERDICT_ROOM - 1) + b"\n"     # read back stripped
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            workdirs.write_synced(tmp, record)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
                raise
            workdirs.write_synced(path, record, 0)      # in place: the room it kept

    def read(self, migration_id: str) -> tuple[str, str]:
        try:
            state, _, detail = self.path(migration_id).read_text().partition("\n")
        except FileNotFoundError:
            return "none", ""
        return state, detail.strip()

    def forget(self, migration_id: str) -> None:
        self.path(migration_id).unlink(missing_ok=True)


VERDICT_ROOM = 1024


_LAZY_PAUSE_SECONDS = 10.0


async def _pause(argv: list[str], lazy: bool) -> proc.Result:
    """Pause a container just restored (argv: its runtime's pause). With lazy pages a task waiting inside the kernel
    for a missing page cannot freeze until the page lands, and a cgroup v1 freezer gives
    up after a few hundred ms ("unable to freeze", thawing again): the page is on its way,
    so try again for a while before calling the restore failed."""
    deadline = time.monotonic() + (_LAZY_PAUSE_SECONDS if lazy else 0)
    while True:
        res = await proc.run(argv, check=False)
        if res.returncode == 0 or time.monotonic() >= deadline:
            return res
        await asyncio.sleep(0.05)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


async def main(root: str = DEFAULT_ROOT) -> int:
    """Serve one migration on stdin/stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=p.MAX_FRAME + 8)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return await Agent(reader, writer, root).serve()
