"""The target side: `livemig agent`, started by the coordinator over SSH.

It speaks the framed protocol (wire/protocol.py) on its stdin/stdout: one request at a
time, each answered by its handler in HANDLERS (message type -> handler), which the
modules beside this one carry out. It keeps every image in a private directory (0700)
of its own (workspace.py), runs CRIU's page servers there and takes data streams on a
UNIX socket in it (receive.py), restores (restore.py) and places post-copy's pages
itself (postcopy.py). The restored copy (copy.py) stays stopped until told the source
is gone (Resume). When the coordinator vanishes before that, it cannot tell whether the
source was committed away: the restored copy is left stopped, never killed, the images
are deleted, and a marker says what was left (orphans.py), for the source's `livemig
recover` to resume or kill through a fresh agent (SettleOrphan), by the commit mark the
source wrote. Post-copy is the exception: once its copy runs, a coordinator that vanished may
come back, on a stream of its own (coordinator.py), and the copy waits for it; a copy
that lacks pages dies with its page source once nobody came back (postcopy.py), since the
source's copy, stopped and whole, outlives it; this agent killed, its guard holds the copy
for a successor (an agent started with Hello's successor, then TakeOver), or kills it
(guard.py); a verdict file tells the source's `livemig recover` how it stands (verdicts.py).

Where the agent stands is its stage (stage.py), read and changed in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from .. import logs, replay, workdirs
from ..errors import Phase
from ..options import WAITS
from ..version import __version__
from ..wire import protocol as p
from . import orphans, preflight, restore
from .coordinator import Coordinator, Rejoined
from .copy import Copy
from .failures import AgentFailure, reap
from .guard import Guard, Handover
from .postcopy import PostCopy
from .receive import Images
from .stage import Stage, StageError, Stages
from .verdicts import Verdicts
from .workspace import Workspace

DEFAULT_ROOT = "/var/lib/livemig"

Handler = Callable[[Any], Awaitable[Any]]
_T = TypeVar("_T")
_UNHEARD = object()     # a reply nobody will read: its asker is gone, or was replaced by one who rejoined


class Agent:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, root: str = DEFAULT_ROOT):
        self.line = Coordinator(reader, writer)
        self.root = Path(root)
        self.stages = Stages()
        self.verdicts = Verdicts(self.root)
        self.copy = Copy(self.stages)
        self._ws: Workspace | None = None
        self._images: Images | None = None
        self.lazy: PostCopy | None = None           # post-copy, or a fill, under way or over
        self.stopping: str | None = None  # why a handler was cut short
        self.succession: tuple[Guard, Handover] | None = None    # a successor's, until TakeOver
        self.handlers: dict[type, Handler] = {
            p.Probe: lambda m: preflight.probe(m, self.ws),
            p.CpuinfoCheck: lambda m: preflight.cpuinfo_check(m, self.ws),
            p.OpenPageServer: lambda m: self.images.open_page_server(m),
            p.AwaitPageServer: lambda m: self.images.await_page_server(m),
            p.ReceiveFiles: lambda m: self.images.receive_files(m), p.DropFiles: lambda m: self.images.drop_files(m),
            p.SendPagemaps: lambda m: self.images.send_pagemaps(m),
            p.StorePages: lambda m: self.images.store_pages(m),
            p.ReceiveTree: lambda m: self.images.receive_tree(m),
            p.LoadImage: lambda m: self.images.load_image(m),
            p.Restore: self.on_restore, p.TrialRestore: lambda m: restore.trial(m, self.ws.work),
            p.AwaitLazy: lambda m: self._lazy.done(), p.RejoinPages: lambda m: self._lazy.rejoin(m),
            p.TakeOver: self.on_take_over,
            p.SettlePostcopy: lambda m: self._lazy.settled(),
            p.Resume: self.on_resume, p.InstallUnit: lambda m: self.copy.install(m.unit),
            p.AdoptUnit: lambda m: self.copy.adopted_by(m.unit, self.ws.work),
            p.Abort: self.on_abort,
            p.Finish: self.on_finish,
            p.AskVerdict: lambda m: orphans.ask(self.root, self.verdicts, m),
            p.ForgetVerdict: lambda m: orphans.forget(self.verdicts, m),
            p.SettleOrphan: lambda m: orphans.settle(self.root, self.verdicts, m),
        }

    @property
    def ws(self) -> Workspace:
        return self._after_hello(self._ws)

    @property
    def images(self) -> Images:
        return self._after_hello(self._images)

    @staticmethod
    def _after_hello(made: _T | None) -> _T:
        """What the Hello's answer makes (the work directory, and what is kept in it)."""
        if made is None:
            raise StageError(Phase.PREFLIGHT, "no work directory yet: the Hello comes first")
        return made

    # --- the loop --------------------------------------------------------------------------
    async def serve(self) -> int:
        finished = False
        try:
            hello = await p.read_message(self.line.reader)
            agreed = p.agree(hello.oldest, hello.protocol) if isinstance(hello, p.Hello) else None
            if agreed is None:
                await self.line.say(p.Failed(Phase.PREFLIGHT, p.mismatch(hello, __version__)))
                return 2
            try:
                await self._start(hello, agreed)
            except AgentFailure as e:     # no work directory of ours: the Hello's answer says why
                await self.line.say(p.Failed(e.phase or "", e.message, e.detail or ""))
                return 2
            self.line.listen()
            while not finished:
                msg = await self.line.next(lost=self.lazy is not None and self.lazy.lost)
                if isinstance(msg, Rejoined):
                    await self.line.switch(msg)
                    continue
                if msg is None:
                    if await self._await_rejoin():
                        continue
                    return 1     # the coordinator is gone: cleanup below decides what stays
                finished = isinstance(msg, p.Finish)     # the last request, however it is answered
                try:
                    reply = await self._answer(msg)
                except AgentFailure as e:
                    reply = p.Failed(e.phase or "", e.message, e.detail or "")
                except asyncio.CancelledError:
                    if self.stopping is None:
                        raise
                    reply = p.Failed(Phase.ROLLBACK, f"{type(msg).__name__} cut short: {self.stopping}")
                    self.stopping = None
                except Exception as e:  # noqa: BLE001 (answered: see below)
                    # a bug here must still reach the coordinator as an answer, which then
                    # rolls back or reports; dying would leave it guessing
                    reply = p.Failed("", f"the agent failed on {type(msg).__name__}: "
                                         f"{type(e).__name__}: {e}", traceback.format_exc())
                if reply is _UNHEARD:
                    continue
                if self.line.read_ahead and self.line.read_ahead[0] is None:
                    if finished or not self._may_rejoin():
                        return 1
                    continue      # told to no one: the loop waits for the coordinator to come back
                try:
                    await self.line.say(reply)
                except ConnectionError:       # it went as we answered: it may come back, and ask again
                    if await self._await_rejoin():
                        continue
                    raise
            return 0
        except (EOFError, ConnectionError, TimeoutError):
            return 1     # the coordinator is gone: cleanup below decides what stays
        finally:
            self.line.stop()
            await self._cleanup(finished)
            await self.line.close()

    def _may_rejoin(self) -> bool:
        """A coordinator gone may come back: the copy runs, and its pages are still going in."""
        return self.line.may_come_back and self.lazy is not None and self.stages.running \
            and not self.lazy.task.done()

    async def _await_rejoin(self) -> bool:
        """The coordinator is gone: if it may come back, wait for it (True) until the copy's
        pages have nothing more to wait for (its placer gives the copy up once the
        coordinator's reconnect time is over), or a grace longer at most."""
        if not self._may_rejoin() or self.lazy is None:
            return False
        return await self.line.wait_back(self.lazy.task, (self.lazy.rejoin_within or 0) + WAITS.rejoin_grace)

    async def _answer(self, msg: object) -> Any:
        """msg's handler; cut short if the coordinator rolls back (Abort), or goes while a
        restore runs: a restore whose page stream never comes would wait for it for a
        minute, and the rollback's Abort, behind it, with it. Other handlers outlive a
        coordinator that went (a fill whose pages are all here completes without it); an
        AwaitLazy whose asker is gone or came back is told to nobody (_UNHEARD): the copy's
        pages go in all the same, and a coordinator back asks again. What comes meanwhile
        waits its turn."""
        handling = asyncio.ensure_future(self.handle(msg))
        try:
            while True:
                incoming = asyncio.ensure_future(self.line.take())
                await asyncio.wait({handling, incoming}, return_when=asyncio.FIRST_COMPLETED)
                if not incoming.done():
                    incoming.cancel()
                    return handling.result()
                nxt = incoming.result()
                self.line.read_ahead.append(nxt)
                if isinstance(msg, p.AwaitLazy) and (isinstance(nxt, Rejoined) or nxt is None) \
                        and self._may_rejoin():
                    handling.cancel()
                    return _UNHEARD
                if isinstance(nxt, p.Abort) or (nxt is None and self.copy.restoring is not None):
                    self.stopping = "the coordinator is gone" if nxt is None else "the coordinator rolls back"
                    self.copy.stop_restoring()
                    handling.cancel()
                    # the handler's end is its result, read below (a CancelledError there is
                    # the cut-short request's, answered by the loop)
                    with contextlib.suppress(asyncio.CancelledError):
                        await handling
                    return handling.result()
        finally:
            if not handling.done():
                handling.cancel()

    async def _start(self, hello: p.Hello, protocol: int) -> None:
        if hello.successor:
            # the guard of a dead agent's copy hands it over: its work directory, lock and uffds
            self.succession = Guard.succeed(self.root, hello.migration_id)
            self._ws = Workspace.adopt(self.root, hello.migration_id, self.succession[1].lock)
        else:
            self._ws = Workspace.make(self.root, hello.migration_id)
        await self._ws.listen()
        self._images = Images(self._ws, self.copy)
        self.stages.to(Stage.PREPARING)
        welcome = p.Welcome(protocol, __version__, str(self._ws.work), self._ws.socket)
        await self.line.say(welcome)

    async def handle(self, msg: object) -> Any:
        handler = self.handlers.get(type(msg))
        if handler is None:
            raise AgentFailure(Phase.PREFLIGHT, f"unexpected {type(msg).__name__}")
        container = getattr(msg, "container", None)
        if container is not None:     # its runtime and name become argv: checked before any handler
            preflight.checked_container(container)
        return await handler(msg)

    # --- restore, commit, rollback ---------------------------------------------------------
    async def on_restore(self, msg: p.Restore) -> p.Restored:
        self.stages.check(Stage.RESTORING)
        d = self.ws.dir(msg.dir)
        await self.images.all_stored()     # every page is stored before CRIU reads them
        if msg.lazy_stream:
            self.lazy = await PostCopy.start(self.ws, self.verdicts, self.copy, self.stages, self.images,
                                             d, msg, msg.lazy_stream)
        res, argv, seconds = await restore.restore(msg, d, self.ws.work, self.copy, self.lazy.guard if self.lazy else None,
                                                   bool(msg.lazy_stream), self.ws.podman_parents)
        if self.lazy is not None and msg.rejoin:
            self.line.accept_rejoins(self.ws, msg.rejoin)
        try:
            if self.lazy is not None and self.lazy.failed:
                # the page stream failed while CRIU restored: this copy can never be whole
                raise AgentFailure(Phase.RESTORE, "post-copy's page stream ended during the restore: "
                                                  f"{self.verdicts.read(self.ws.name)[1]}")
            if res.returncode != 0:
                raise restore.failure(res, argv, d, self.ws.work)
            if self.copy.roots:    # which tasks the workload had stopped itself: they stay so
                self.copy.note_own_stops(restore.stopped_in(msg, d), self.copy.roots[-1])
                if self.lazy is not None:
                    await self.lazy.place_shared(self.copy.roots[-1])
        except AgentFailure:
            await self._undo()
            raise
        self.copy.restored()
        if self.copy.holds_workload and self.lazy is None:
            orphans.mark(self.copy, self.ws.work)
        elif self.lazy is not None:
            # what the verdict "serving" is about, should this agent and its guard die unheard
            self.verdicts.note_copy(self.ws.name, dataclasses.asdict(orphans.held(self.copy)))
        return p.Restored(self.copy.roots[-1] if self.copy.roots else 0, seconds)

    async def on_resume(self, msg: p.Resume) -> p.Resumed:
        if not self.copy.roots:
            raise AgentFailure(Phase.COMMIT, "nothing was restored" if self.lazy is None else
                               f"the restored copy is gone: {self.verdicts.read(self.ws.name)[1]}")
        if self.lazy is not None:
            await self.lazy.all_here()
            # before it runs: should it end before it has every page, it is "lost", not
            # "killed" (it may have answered clients: the source's copy must not, again)
            self.verdicts.write(self.ws.name, "serving", phase=Phase.COMMIT, ran=True)
        workdirs.disown_tree(self.ws.work)     # about to run from its bundle: never swept now
        pids = await self.copy.resume()
        (self.ws.work / orphans.ORPHAN).unlink(missing_ok=True)     # it runs: a move's, no more an orphan
        said = self.lazy is not None and await self.lazy.resumed()     # post-copy's verdicts say it
        if not said and self.copy.holds_workload:
            # should the coordinator vanish now, `livemig recover` learns the copy here runs;
            # and, asking, whether it still does (orphans.py): the note comes second, as it
            # may take the room the verdict needs on a full disk (the marker's, just freed)
            self.verdicts.write(self.ws.name, "running", phase=Phase.COMMIT)
            self.verdicts.note_copy(self.ws.name, dataclasses.asdict(orphans.held(self.copy)))
        return p.Resumed(pids, await _given(self.copy.roots[-1], msg.packets))

    @property
    def _lazy(self) -> PostCopy:
        if self.lazy is None:
            raise AgentFailure(Phase.POSTCOPY, "no post-copy in progress")
        return self.lazy

    async def on_take_over(self, msg: p.TakeOver) -> p.Done:
        """A successor's: the dead agent's copy, which runs, is ours; its pages come once its
        coordinator says on which streams (RejoinPages)."""
        if self.succession is None or self.lazy is not None:
            raise AgentFailure(Phase.POSTCOPY, "no copy here to take over")
        self.lazy = PostCopy.succeed(self.ws, self.verdicts, self.copy, self.stages, self.images,
                                     *self.succession, msg)
        self.succession = None
        self.line.accept_rejoins(self.ws, msg.rejoin)
        return p.Done()

    async def on_abort(self, msg: p.Abort) -> p.Aborted:
        if self.lazy is not None:
            await self.lazy.end()
        # a clone's replicas go even once resumed (another host's failed: all or none); a
        # move's copy that runs is the workload's, and stays
        await self._undo(even_running=not self.copy.holds_workload)
        kept = logs.keep(self.ws.work, str(self.root), f"{self.ws.name}-target") if self._ws else None
        return p.Aborted(str(kept or ""))

    async def on_finish(self, msg: p.Finish) -> p.Done:
        self.verdicts.forget(self.ws.name)     # the coordinator knows how it ended
        return p.Done()

    async def _undo(self, even_running: bool = False) -> None:
        """Undo the restore: what this migration brought here goes, unless it already runs
        (even_running: all the same)."""
        await self.copy.undo(self._ws.work / orphans.ORPHAN if self._ws else None, even_running)

    async def _cleanup(self, finished: bool) -> None:
        # The coordinator may be gone mid-post-copy: the copy is settled first (a copy
        # lacking pages never outlives its page source), and is no orphan then.
        if self.lazy is not None:
            await self.lazy.end()
        ws = self._ws
        orphan = bool(self.copy.roots) and self.copy.holds_workload and not self.stages.running \
            and not finished and ws is not None
        if orphan and ws is not None:
            # The coordinator vanished between our restore and its Resume: it may have
            # committed (the source is dead) or not (the source runs again). We cannot
            # tell, so the tree stays stopped, never killed: it is the workload if the
            # source is gone. A marker says so; `livemig recover` settles it.
            orphans.leave(self.copy, ws.work)
        tasks = [*(self._images.page_servers.values() if self._images else ()),
                 *([self.lazy.task] if self.lazy else [])]
        for task in tasks:
            task.cancel()
        await reap(tasks)
        if self._images is not None:
            self._images.close_store()
        if ws is not None:
            ws.close()
        if not orphan:
            await self._undo()    # a bundle copied before the coordinator vanished
        if ws is not None and not orphan:
            workdirs.remove(ws.work)
        if self.lazy is not None:
            await self.lazy.guard.release()     # what it guarded is settled, killed or left as an orphan
        if ws is not None:
            ws.release()


async def main(root: str = DEFAULT_ROOT) -> int:
    """Serve one migration on stdin/stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=p.MAX_FRAME + 8)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return await Agent(reader, writer, root).serve()


async def _given(root: int, packets: list[str]) -> int:
    """What its clients sent while it was frozen, given to the copy that runs (replay.py)."""
    if not packets:
        return 0
    try:
        return await replay.give(root, replay.unpacked(packets))
    except (OSError, ValueError) as e:     # it runs all the same: its clients' retransmissions reach it
        print(f"livemig agent: what its clients sent while it was frozen could not be given to it: {e}",
              file=sys.stderr)
        return 0
