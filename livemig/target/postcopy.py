"""The target's side of post-copy and of fills: the copy restored with lazy pages, and the
pages placed in it (pages/placer.py) as they come from the source.

Post-copy: the copy runs (Resume) while its pages still come; it faults on those it
lacks, and waits for them. A fill: the same machinery fills the copy from this host's
memory (pre-copy by hashes' store, where the source says a page is unchanged, and every
page pushed before the copy runs: stop-and-copy into memory too); the copy may run only
once every page is here, the source's copy waiting, stopped, until it has them all, as
in post-copy.

Once the copy runs, a link that breaks is waited for: the coordinator may come back within
the Restore's rejoin_within (rejoin(), and coordinator.py for its requests), and the
placer takes its pages on the fresh link. A copy that lacks pages dies with its page
source once that is over, since the source's copy, stopped and whole, outlives it:
settle() kills it before its uffds are let go. If this agent is killed outright, its guard
(guard.py) holds the uffds for a successor (succeed(): a fresh agent, which knows the copy
by its uffds alone, and takes every page it may lack again), and kills the copy if none
comes. The verdict (verdicts.py) says, at each step, how it stands, for the source's
`livemig recover`.
"""

from __future__ import annotations

import asyncio
import contextlib
from enum import Enum
from pathlib import Path

from .. import proc
from ..errors import LivemigError, Phase
from ..pages import cow, pagemap, placer, shmem
from ..pages.postcopy import LinkLost, PageStreamError
from ..wire import protocol as p
from .copy import Copy
from .failures import AgentFailure, reap, reason
from .guard import Guard, Handover
from .orphans import ORPHAN
from .receive import Images
from .stage import Stage, Stages
from .verdicts import Verdicts
from .workspace import Workspace


class Pages(Enum):
    """Where the copy's pages stand (the verdict on disk follows: "serving", "whole", "killed")."""
    COMING = "coming"      # the page stream runs: the copy lacks pages
    HERE = "here"          # a fill's copy has every page before it ran: guard and uffds kept until Resume
    WHOLE = "whole"        # every page is in the copy: guard and uffds let go
    LOST = "lost"          # it ended before every page was in: the copy is killed


_PAGES_NEXT = {Pages.COMING: {Pages.HERE, Pages.WHOLE, Pages.LOST}, Pages.HERE: {Pages.WHOLE, Pages.LOST},
               Pages.WHOLE: set(), Pages.LOST: set()}


class PostCopy:
    """One lazy restore's pages: the placer, the guard, and the task that runs them."""

    def __init__(self, ws: Workspace, verdicts: Verdicts, copy: Copy, stages: Stages, images: Images,
                 guard: Guard, d: Path, ranges: list[pagemap.Range], msg: p.Restore | p.TakeOver,
                 token: str | None, handed: Handover | None = None, shared: list[shmem.Placing] | None = None):
        self.ws, self.verdicts, self.copy, self.stages, self.images = ws, verdicts, copy, stages, images
        self.guard = guard
        self.shared = shared or []      # shared memory the store holds, to place once restored
        self.fill = isinstance(msg, p.Restore) and msg.fill      # a fill's: every page on this host before the copy runs
        self.phase = Phase.FILL if self.fill else Phase.POSTCOPY
        self.pages = Pages.COMING
        if self.fill:
            images.open_store()     # stop-and-copy into memory: every page is pushed into it
        self.placer: placer.Placer | None = placer.Placer(
            d, ranges, on_uffd=lambda pid, fd: guard.tell("uffd", str(pid), fds=(fd,)),
            # (post-copy's store holds its shared memory alone, placed before it runs: place_shared)
            store=images.store if self.fill else None)
        self.placer.on_remap = lambda *move: guard.tell("remap", *(str(x) for x in move))
        self.successor = handed is not None     # of an agent that died: the copy is known by its uffds alone
        if handed is None:
            self.placer.listen()
        else:
            self.placer.adopt(handed.uffds, handed.remaps)
        # once the copy runs, a broken link waits this long for the coordinator to come back, and
        # the guard as long for a successor, should this agent die
        self.rejoin_within = msg.rejoin_within if msg.rejoin else None
        if self.rejoin_within:
            guard.tell("successor", f"{self.rejoin_within:g}")
        self._rejoins: asyncio.Queue[p.RejoinPages] = asyncio.Queue()
        self._link = contextlib.AsyncExitStack()     # the streams of the link in use
        self.task = asyncio.create_task(self._place_pages(self.placer, token, getattr(msg, "fault_stream", None)))

    @classmethod
    async def start(cls, ws: Workspace, verdicts: Verdicts, copy: Copy, stages: Stages, images: Images,
                    d: Path, msg: p.Restore, token: str) -> PostCopy:
        """Listening before CRIU's restore of d looks for it; token: the source's page stream."""
        try:
            # what the tree shares copy-on-write goes into every sharer's image first (cow.py):
            # the lazy ranges are what is left
            await asyncio.to_thread(cow.complete, d, images.store)
            # and the shared memory pre-copy left here: placed once restored, or into its images (shmem.py)
            shared = await asyncio.to_thread(shmem.complete, d, images.store)
            ranges = pagemap.lazy_ranges(d)
        except (OSError, LivemigError) as e:
            raise AgentFailure(Phase.RESTORE, f"cannot read the dump's pagemaps: {e}") from None
        # Before anything is restored: from here on `livemig recover` finds a verdict.
        verdicts.write(ws.name, "serving", phase=Phase.RESTORE)
        # guard.py: should this agent die during post-copy, its copy dies before its uffds
        guard = await Guard.start(verdicts, ws.name, ws.held.fd)
        try:
            return cls(ws, verdicts, copy, stages, images, guard, d, ranges, msg, token, shared=shared)
        except BaseException:
            await guard.release()   # nothing restored yet for it to guard (left, it would say "killed")
            raise

    async def place_shared(self, root: int) -> None:
        """The restore done, the copy stopped: the shared memory pre-copy left here, into the
        objects the restore made (pages/shmem.py), before anything runs."""
        if not self.shared or self.images.store is None:     # (complete() named none without a store)
            return
        pids = {vpid: pid for pid, vpid in proc.in_dump(root, proc.process_tree(root)).items()}
        try:
            await asyncio.to_thread(shmem.place, self.shared, pids, self.images.store)
        except (OSError, LivemigError) as e:
            raise AgentFailure(Phase.RESTORE, f"cannot place the shared memory pre-copy left here: {e}") from None
        if not self.fill:       # post-copy's store held nothing else
            self.images.close_store()

    @classmethod
    def succeed(cls, ws: Workspace, verdicts: Verdicts, copy: Copy, stages: Stages, images: Images,
                guard: Guard, handed: Handover, msg: p.TakeOver) -> PostCopy:
        """A successor's: the dead agent's copy, which runs, taken over from its guard (which
        keeps guarding it: should we die too, it waits for the next); its pages come on the
        first link its coordinator opens (RejoinPages)."""
        d = ws.dir(msg.dir)
        try:
            ranges = pagemap.lazy_ranges(d)
        except (OSError, pagemap.PagemapError) as e:
            raise AgentFailure(Phase.POSTCOPY, f"cannot read the dump's pagemaps: {e}") from None
        for stage in (Stage.RESTORING, Stage.RESTORED, Stage.RUNNING):     # restored and resumed by the dead agent
            stages.to(stage)
        return cls(ws, verdicts, copy, stages, images, guard, d, ranges, msg, None, handed)

    def _to(self, pages: Pages) -> None:
        if pages not in _PAGES_NEXT[self.pages]:
            raise AgentFailure(self.phase, f"the copy's pages cannot go from {self.pages.value} to {pages.value}")
        self.pages = pages

    def _placer(self) -> placer.Placer:
        if self.placer is None:
            raise AgentFailure(self.phase, "the copy's pages are no longer placed here")
        return self.placer

    @property
    def failed(self) -> bool:
        """The page stream ended without every page (a restore under way can never be whole)."""
        return self.task.done() and (self.task.cancelled() or self.task.exception() is not None)

    @property
    def lost(self) -> bool:
        """Over, and the copy is gone."""
        return self.task.done() and self.pages is Pages.LOST

    async def done(self) -> p.LazyDone:
        """AwaitLazy: how it went, once every page is in (or why not). Shielded: an AwaitLazy
        cut short (its coordinator gone) leaves the pages going in."""
        return await asyncio.shield(self.task)

    async def _place_pages(self, placing: placer.Placer, token: str | None, faults: str | None) -> p.LazyDone:
        try:
            try:
                # a successor's first link is its coordinator's first RejoinPages
                remote, fault_stream = await self._streams(token, faults) if token else (None, None)
                served = await placing.run(remote, fault_stream,
                                           relink=self._relink if self.rejoin_within is not None else None)
            finally:
                await self._link.aclose()    # the streams of the last link (each link's own, replaced)
        except BaseException as e:
            await self.settle(reason(e))
            if isinstance(e, PageStreamError):
                raise AgentFailure(self.phase, str(e)) from None
            if isinstance(e, Exception) and not isinstance(e, AgentFailure):   # an OSError, say
                raise AgentFailure(self.phase, f"{'filling the copy' if self.fill else 'post-copy'} "
                                               f"failed: {e}") from None
            raise       # an AgentFailure (a stream that never came), or a cancellation
        done = p.LazyDone(served.pages_served, served.requests, served.requests_waited, served.pages_known)
        if self.fill and not self.stages.running:
            # whole before it ran (a small one): "whole" is said at Resume, and until then
            # the copy dies with this agent, as a copy still filling does
            self._to(Pages.HERE)
            return done
        await self._whole()
        return done

    async def _streams(self, token: str, faults: str | None) -> placer.Link:
        remote = await self._link.enter_async_context(self.ws.stream(token))
        return remote, await self._link.enter_async_context(self.ws.stream(faults)) if faults else None

    async def _relink(self) -> placer.Link:
        """The link broke while the copy runs: its faults wait until the coordinator comes
        back (RejoinPages) with fresh streams, within rejoin_within; then the copy is lost."""
        await self._link.aclose()
        try:
            async with asyncio.timeout(self.rejoin_within):
                while True:
                    msg = await self._rejoins.get()
                    self._link = contextlib.AsyncExitStack()
                    try:
                        return await self._streams(msg.lazy_stream, msg.fault_stream)
                    except AgentFailure:      # its streams never came: it may come back again
                        await self._link.aclose()
        except TimeoutError:
            raise LinkLost(f"the source did not come back within {self.rejoin_within:.0f} s of the link "
                           "breaking") from None

    async def settled(self) -> p.PostcopySettled:
        """SettlePostcopy: ended, if under way; how the copy stands."""
        await self.end()
        state, detail = self.verdicts.read(self.ws.name)
        return p.PostcopySettled(whole=state == "whole", detail=detail, ran=state in ("whole", "lost"))

    async def rejoin(self, msg: p.RejoinPages) -> p.PagesRejoined:
        """The coordinator is back: the copy's pages come on msg's streams from now on, and
        what it still lacks is what the source pushes there (nothing, if it is whole)."""
        if self.rejoin_within is None or not self.stages.running:
            raise AgentFailure(self.phase, "no running copy's page stream here to rejoin")
        if self.pages is Pages.WHOLE:
            return p.PagesRejoined([])      # whole before the link broke: nothing to take up
        placing = self._placer()
        if self.task.done():
            raise AgentFailure(self.phase, f"the copy's pages stopped coming: {self.verdicts.read(self.ws.name)[1]}")
        placing.drop_link()
        if placing.whole or (self.fill and placing.all_here.is_set()):
            return p.PagesRejoined([])      # nothing more from the source: the old link ends all the same
        while not self._rejoins.empty():      # an earlier try's, which never got its streams opened
            self._rejoins.get_nowait()
        self._rejoins.put_nowait(msg)
        return p.PagesRejoined([[r.pid, r.vaddr, r.pages] for r in placing.missing()])

    async def _whole(self) -> None:
        """The copy has every page: it is the workload once it runs (post-copy's may be
        whole before its Resume: that keeps the placer, so that Resume does not say
        "running", a stop-and-copy's word, over "whole")."""
        self.verdicts.write(self.ws.name, "whole", phase=self.phase)
        self._to(Pages.WHOLE)
        await self.guard.release()
        self._placer().close()      # after the guard: a fault on a never-written page still finds us
        if self.fill:
            self.placer = None
            self.images.close_store()

    async def settle(self, why: str) -> None:
        """Post-copy ends before its time. The copy runs on only if it is whole and already
        running; anything else goes, and the source's copy, stopped since the final dump,
        is the workload. Its uffds are let go only once it is dead or whole."""
        placing = self._placer()
        if placing.whole and self.stages.running:
            self.verdicts.write(self.ws.name, "whole", phase=self.phase)
            self._to(Pages.WHOLE)
        elif self.successor:
            # it knows the copy by its uffds alone: the guard, told what to kill, kills it
            self.guard.abandon()
            self._to(Pages.LOST)
            placing.close()
            return
        else:
            await self.copy.undo(self.ws.work / ORPHAN, even_running=True)
            said = "the fill ended before every page was in the copy" if self.fill else \
                "post-copy ended before every page was here"
            self.verdicts.write(self.ws.name, self.verdicts.gone_state(self.ws.name), f"{said}: {why}",
                                phase=self.phase)
            self._to(Pages.LOST)
        await self.guard.release()
        placing.close()

    async def all_here(self) -> None:
        """A fill's copy may run once every frame of the source's push is read: every page
        missing then is in this host's memory. Waits for that, or for the fill's failure
        (post-copy's copy, which has no store, runs at once)."""
        placing = self.placer
        if placing is None or placing.store is None:
            return
        here = asyncio.ensure_future(placing.all_here.wait())
        try:
            await asyncio.wait({here, self.task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            here.cancel()
        if not placing.all_here.is_set():
            raise AgentFailure(Phase.FILL, "the copy cannot be filled: "
                                           f"{self.verdicts.read(self.ws.name)[1] or 'its page stream ended'}")

    async def resumed(self) -> bool:
        """The copy runs now; False if its pages have nothing more to do with it."""
        if self.pages is Pages.HERE:
            await self._whole()
        elif self.pages is Pages.WHOLE:
            # whole before it ran (its restore left nothing lazy): the Resume's verdict, "serving"
            # (it may have answered clients), is "whole" again
            self.verdicts.write(self.ws.name, "whole", phase=self.phase)
        elif self.placer is not None:
            self.placer.resumed()
        else:
            return False
        return True

    async def end(self) -> None:
        """Stop it, if under way; it settles its copy on the way out (settle)."""
        if not self.task.done():
            self.task.cancel()
        await reap([self.task])
        if self.pages is Pages.HERE and not self.stages.running:
            await self.settle("the copy was never told to run")
