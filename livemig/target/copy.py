"""The copy this move restored here: its trees' roots, the containers it went into (a
clone: several replicas), the bundle the move brought; the restore under way; and the
ways it ends: resumed (it runs: the workload's, no more the move's) or undone (killed,
with what the move brought: a bundle, files carried).

Restored, every task of it is stopped (SIGSTOP), a container's paused too (restore.py):
resumed, a container is thawed, then every task continued (SIGCONT) but those the workload
had stopped itself (a shell's stopped job, a SIGSTOP it was sent), which its images say.

Whether it runs is the agent's stage (stage.py), which moves here but for the first move
(PREPARING, at the Hello): RESTORING while CRIU or a runtime restores it, RESTORED once
it is here stopped, RUNNING once resumed, UNDONE once it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

from .. import carried, proc, runtimes, service_address, units
from ..errors import LivemigError, Phase
from ..options import WAITS
from ..runtimes import podman, quiet
from ..wire import protocol as p
from .failures import AgentFailure
from .stage import Stage, Stages


class Copy:
    def __init__(self, stages: Stages):
        self.stages = stages
        self.roots: list[int] = []                      # the root PIDs of what was restored here
        self.containers: list[p.Container] = []         # restored through their runtime
        self.created_tree: Path | None = None           # a bundle this migration brought here
        self.carried: list[str] = []                    # the tree's files it brought (carried.py)
        self.unit_files: list[str] = []                 # its unit's definition, written here (units.py)
        self.addresses: dict[str, str] = {}             # service addresses put on here (service_address.py)
        self.guarding = ""                              # the guard against resets from them, until it runs
        self.quiet: list[int] = []                      # roots of copies whose own network is closed until
                                                        # they run (runtimes/quiet.py)
        self.hushed: list[str] = []                     # and kept off the link from the host, until then
        self.restoring: asyncio.subprocess.Process | None = None    # CRIU (or a runtime) restoring now
        self.holds_workload = False     # a move's, not a clone's replica: it may be the only copy left
        # The tasks the workload had stopped itself when it was dumped: CRIU stops every task
        # it restores for us (leave-stopped), and these stay stopped when the rest resume.
        self.own_stops: list[proc.Task] = []

    def pids(self) -> list[int]:
        """Every task of it, as it is now."""
        return [pid for root in self.roots for pid in proc.process_tree(root)]

    def what(self) -> str:
        if self.containers:
            return ", ".join(f"{c.runtime} container {c.id}" for c in self.containers)
        return "tree " + ", ".join(map(str, self.roots))

    def restore_started(self, process: asyncio.subprocess.Process) -> None:
        self.restoring = process
        self.stages.to(Stage.RESTORING)

    def restore_ended(self) -> None:
        self.restoring = None

    def note_own_stops(self, stopped: set[int], root: int) -> None:
        """The tree just restored at root: which of its tasks were stopped when dumped
        (stopped, as PIDs in the images: those of root's PID namespace, a container's own)."""
        if stopped:
            self.own_stops += proc.tasks(proc.dumped_as(root, proc.process_tree(root), stopped))

    def restored(self) -> None:
        """The restore succeeded: the copy is here, stopped."""
        self.stages.to(Stage.RESTORED)

    async def resume(self) -> list[int]:
        """Let it run; its PIDs. Its own network is opened as it thaws, not after: the
        commit is made, and a packet that comes a moment before its tasks run waits in its
        kernel for them, while each program either runs costs the downtime tens of ms."""
        pids = self.pids()
        named = proc.tasks(pids[::-1])

        async def thaw() -> None:
            for c in self.containers:     # thawed, its tasks still stopped (restore.py)
                await proc.run(runtimes.control(c, "resume"), phase=Phase.COMMIT)
            # Leaves first, and through pidfds that skip the gone: a parent resumed before its
            # zombie child would reap it, and the child's PID would name nothing (or another).
            proc.signal_tasks([t for t in named if t not in self.own_stops], signal.SIGCONT)
            self.stages.to(Stage.RUNNING)

        async def speak(root: int, unhushed: asyncio.Task[None]) -> None:
            await unhushed      # (meanwhile its quiet table keeps it closed)
            if said := await quiet.speak(root):
                print(f"livemig agent: {said}", file=sys.stderr)     # it runs all the same: said
            self.quiet.remove(root)     # (until then, a resume that fails leaves it to undo(): unlink)
        try:
            async with asyncio.TaskGroup() as tg:
                unhushed = tg.create_task(self.unhush())
                tg.create_task(thaw())
                for root in list(self.quiet):
                    tg.create_task(speak(root, unhushed))
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None     # the runtime's failure, as the agent reports one
        await self._announce()
        return pids

    async def unhush(self) -> None:
        """What kept the copy off the link from the host goes (quiet.hush)."""
        hushed, self.hushed = self.hushed, []
        await quiet.unhush(hushed)

    async def put_addresses(self, wanted: dict[str, str], tag: str, guard: bool) -> None:
        """The service addresses on their interfaces here, before the restore binds the tree's
        sockets to them; guard: no reset leaves them until the copy runs (its connections
        restored)."""
        for address, device in wanted.items():
            if guard:
                await service_address.guard(address, tag)
                self.guarding = tag
            await service_address.put_on(address, device)
            self.addresses[address] = device

    async def _announce(self) -> None:
        """The copy runs: its addresses told to the link, the guard lifted."""
        for said in await service_address.settle_in(self.addresses, self.guarding):
            print(f"livemig agent: {said}", file=sys.stderr)     # the copy runs all the same
        self.guarding = ""

    async def install(self, unit: p.Unit) -> p.Done:
        """Its unit's definition, where this host has none: before the freeze, and gone if undone."""
        self.unit_files += await units.install(unit)
        return p.Done()

    async def adopted_by(self, unit: p.Unit, work: Path) -> p.Adopted:
        """It runs, whole: its unit here takes it (units.py)."""
        if not self.roots or not self.stages.running:
            raise AgentFailure(Phase.COMMIT, "no copy runs here for a unit to take")
        try:
            pid = await podman.adoptable(unit.container) if unit.container else self.roots[-1]
        except LivemigError as e:
            return p.Adopted([f"the copy runs, but {unit.name} did not take it: {e.message}"])
        return p.Adopted(await units.adopt(unit, pid, work))

    def stop_restoring(self) -> None:
        """A restore under way goes, its tasks with it. A lazy restore whose page stream ended
        waits, in CRIU's restorer, for pages that never come (a fault's wait ends at a fatal
        signal). Its tasks are killed before CRIU: they would outlive it, stopped."""
        if self.restoring is not None and self.restoring.returncode is None:
            proc.kill_tree(self.restoring.pid)     # the tasks it restored, whichever group they took
            # CRIU's group may have gone with its tasks: then nothing of it is left to kill
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.restoring.pid, signal.SIGKILL)    # and what it forked since

    async def undo(self, marker: Path | None, even_running: bool = False) -> None:
        """What this migration brought here goes, unless it already runs (even_running: a
        post-copy copy that lacks pages goes all the same); marker, the orphan's, with it."""
        if self.stages.running and not even_running:
            self.stop_restoring()
            return
        self.stop_restoring()
        await self.unhush()
        while self.quiet:       # never run: its links' MAC free here at once (quiet.unlink)
            await quiet.unlink(self.quiet.pop())
        while self.containers:
            # delete --force thaws what it kills: a frozen task cannot die
            await proc.run(runtimes.control(self.containers.pop(), "delete"), check=False, timeout=WAITS.container_delete)
        if self.created_tree is not None:
            shutil.rmtree(self.created_tree, ignore_errors=True)
            self.created_tree = None
        carried.remove(self.carried)
        self.carried.clear()
        await units.uninstall(self.unit_files)
        self.unit_files.clear()
        await self._take_addresses_off()
        while self.roots:
            proc.kill_tree(self.roots.pop())
        if marker is not None:
            marker.unlink(missing_ok=True)
        if self.stages.stage not in (Stage.OPENING, Stage.UNDONE):
            self.stages.to(Stage.UNDONE)

    async def _take_addresses_off(self) -> None:
        """What put_addresses put on goes: the source puts them back on its own interfaces."""
        for said in await service_address.let_go(self.addresses, self.guarding):
            print(f"livemig agent: {said}", file=sys.stderr)     # the copy is undone all the same
        self.addresses, self.guarding = {}, ""
