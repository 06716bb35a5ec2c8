"""What one move knows as it goes: the state its phases share (source side).

Migration (migration.py) runs the phases; the modules beside it (precopy, rounds,
switchover, postcopy, failures...) each do one of them on this state. Its stage is read
here alone (stages.py). The rest are facts the phases hand on: the workload, its final
dump, the record `livemig recover` reads, the page relay, and the instants the downtime
is measured between.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .. import replay, runtimes, workdirs
from ..options import Options
from ..pages import pagehash, push, shmem
from ..pages import postcopy as pages
from ..progress import Cautioned, Event, Ticker, quiet
from ..report import Report
from ..runtimes.held import HeldCopy
from ..wire import protocol as p
from . import recovery, throttle
from .session import Connector, TargetSession, migration_id
from .stages import StageError, Stages

T = TypeVar("T")


class Move:
    def __init__(self, what: int | str, target: str, options: Options, transport_factory: Connector,
                 progress: Callable[[Event], None] | None = None) -> None:
        """what: a PID (a process tree) or a container's name or ID."""
        self.what, self.target, self.options = what, target, options
        self.stages = Stages()
        self.ticker = Ticker(progress) if progress else None
        self.progress: Callable[[Event], None] = self.ticker.tell if self.ticker else quiet
        self.id = migration_id()
        self.report = Report(pid=what if isinstance(what, int) else 0, source=socket.gethostname(), target=target,
                             migration_id=self.id)
        self.to = TargetSession(target, transport_factory, options, self.id)
        self.work = Path(options.image_root) / f"{self.id}-source"
        self.held: workdirs.Held | None = None     # self.work, ours while we live
        self.workload: runtimes.Workload | None = None
        self.original: HeldCopy | None = None      # to tell, on failure, whether it exited by itself
        self.spec: p.Container | None = None       # the container as the target will know it
        # pre-copy by page hashes: what the target holds (post-copy's: of the shared memory alone)
        self.tracker: pagehash.Tracker | None = None
        self.shmem_keys = shmem.Keys()     # the tree's shared memory objects, as the tracker and store know them
        # the final dump's pages go into the target's memory, and into the copy as it runs:
        # pre-copy by hashes, and stop-and-copy where the target has room
        self.fills = False
        self.modes_here: list[str] = []     # the modes that can run between these hosts (preflight)
        self.frozen_seconds = 0.0   # what goes through image files costs the downtime (downtime.foresee)
        # what CRIU's writing a process whole into the images costs it (pages/relazy.py), as foreseen, and why
        self.slip: tuple[float, str] = (0.0, "")
        self.link_bytes_per_s: float | None = options.link_rate   # measured once, with incompressible bytes (downtime.link_rate)
        self.downtime_by_mode: dict[str, float] = {}    # the modes without rounds, estimated (downtime.foresee)
        self.throttle: throttle.Throttle | None = None  # auto-converge's hold on the workload's CPU
        self.round_dirs: list[str] = []
        # --move-address: ADDR/PREFIX -> (its interface here, the one it goes on there), from the
        # preflight; and those taken off this host once the tree froze, with their interface here,
        # for a rollback to put back (service_address.py)
        self.addresses: dict[str, tuple[str, str]] = {}
        self.addresses_taken: dict[str, str] = {}
        self.bundle_copied_at: float | None = None    # the bundle's pre-copy started then
        self.bundle_sent: set[str] = set()            # what its pre-copy archived
        self.record: recovery.Record | None = None    # kept on disk while post-copy may fail
        self.dump: runtimes.DumpRun | None = None     # the final dump: the source was touched
        self.relay: asyncio.Task[Any] | None = None   # the final dump's pages on their way
        self.taking: replay.Taking | None = None     # what the clients send while it is frozen, kept
        self.lazy_token = ""
        self.rejoin_token = ""    # the stream the target's agent takes us back on, should the link break
        self.pushed_before: list[pages.Pushed] = []    # the pushes of links that broke, for the counts
        self.pusher: push.Pusher | None = None
        self.unit: p.Unit | None = None        # the systemd service that runs the tree (owners.py)
        self.unit_held = False                 # its drop-in holds it from restarting the workload
        self.journal: list[p.JournalStream] = []   # the tree's streams to journald
        self.dumped_at = self.images_at = self.restored_at = 0.0   # the downtime's parts end at these

    def caution(self, said: str) -> None:
        """A warning for the report, told as it is found."""
        self.report.warnings.append(said)
        self.progress(Cautioned(said))

    @property
    def phase(self) -> str:
        return self.stages.phase

    # The phases that need these run after the one that sets them: None there is livemig's bug.
    @property
    def w(self) -> runtimes.Workload:
        return self._have(self.workload, "workload resolved")

    @property
    def final(self) -> runtimes.DumpRun:
        return self._have(self.dump, "final dump")

    @property
    def rec(self) -> recovery.Record:
        return self._have(self.record, "recovery record")

    def _have(self, value: T | None, what: str) -> T:
        if value is None:
            raise StageError(f"no {what} yet", phase=self.phase)
        return value

    @property
    def parent(self) -> str | None:
        """The last pre-copy round's images, which the next dump builds on."""
        return self.round_dirs[-1] if self.round_dirs else None

    @property
    def known(self) -> pagehash.Tracker | None:
        """What pre-copy by hashes left on the target of the tree's private memory: none where it
        sent the shared memory alone (post-copy's)."""
        return self.tracker if self.fills else None

    @property
    def lazy_phase(self) -> str:
        """Post-copy's failures as the user reads them."""
        return "filling the copy" if self.fills else "post-copy"

    def stop_watching(self) -> None:
        """The source's copy, if it runs, is watched no more (pages/wptrack.py), nor what its
        clients send (replay.py: what was not taken, kept for a copy that never ran, has
        nothing left to give it to)."""
        if self.taking is not None:
            self.taking.close()
            self.taking = None
        if self.tracker is not None:
            self.tracker.close()
            self.report.pages_vouched = self.tracker.settled_pages

    def save_record(self) -> None:
        self.rec.save(self.work)

    async def stop_relay(self) -> None:
        if self.relay is None:
            return
        if not self.relay.done():
            self.relay.cancel()
        # the failure that counts was told already: the relay's followed from it
        with contextlib.suppress(BaseException):
            await self.relay

    def take_packets(self) -> replay.Taken:
        """What the workload's clients sent since just before the freeze (replay.py), once:
        none after the first call. Its socket is closed by stop_watching(), once the copy runs."""
        taken = self.taking.take() if self.taking is not None else replay.Taken()
        if taken.left:
            self.report.warnings.append(f"{taken.left} packets its clients sent while it was frozen were more than "
                                        "the copy is given: they were left to their retransmissions")
        return taken

    async def give_back(self) -> None:
        """What the clients sent while it was frozen, given to the source's copy, which runs
        again (replay.py): as the target's would have been at its Resume."""
        taken = self.take_packets()
        if not taken.packets:
            return
        try:
            self.report.packets_replayed = await replay.give(self.w.root_pid, taken.packets)
        except OSError as e:      # it runs all the same: its clients' retransmissions reach it
            self.report.warnings.append(f"what its clients sent while it was frozen could not be given to it: {e}")

    def lift_throttle(self) -> None:
        """At switchover, and on every way out: the workload's CPU quota as it was."""
        if self.throttle is None:
            return
        try:
            self.throttle.release()
        except OSError as e:
            self.report.warnings.append(f"could not lift the CPU throttle of the workload's cgroup "
                                        f"{self.throttle.cg.quota_dir}: {e}")

