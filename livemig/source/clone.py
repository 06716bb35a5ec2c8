"""Stateful replicas: `livemig clone CTR HOST...` restores copies of a running container,
all from one checkpoint, on one or more hosts, while the original runs on.

    preflight (every target) -> image -> checkpoint -> transfer -> restore -> commit | rollback

All or nothing: every replica is restored paused, and they run only once all of them
are restored; a failure anywhere deletes every one, even those resumed already. The
original is never at risk: the checkpoint leaves it running, and it stands still only
while CRIU dumps it.

Only podman containers clone. A replica of a runc or crun container would need its own
copy of the bundle's root file system under another path, which nothing here builds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .. import host, interrupts, runtimes, workdirs
from ..errors import (
    ConnectionFailed,
    LivemigError,
    Phase,
    PreflightError,
    UsageError,
    record_failure,
)
from ..options import Options
from ..progress import Connecting, Copied, Event, Running, Stepping, quiet
from ..report import CloneReport, Replica, now
from ..runtimes import podman
from ..wire import protocol as p
from . import preflight
from .local import local_cpuinfo, local_facts, make_work_dir
from .session import Connector, TargetSession, migration_id, remote_error, ssh_connector

T = TypeVar("T")
# replicas per host: each is a container restored from one checkpoint, in turn, while
# the others wait paused; a typo's million would build its names before any check
MAX_COUNT = 100


def replica_names(original: str, name: str | None, count: int, keep_name: bool) -> list[str]:
    """The replicas' names on each target: NAME, or NAME-1..NAME-N for several; NAME is
    the original's own with --keep-name, else --name's, else ORIGINAL-clone."""
    if not 1 <= count <= MAX_COUNT:
        raise UsageError(f"--count must be from 1 to {MAX_COUNT}, not {count}")
    if keep_name:
        if name or count > 1:
            raise UsageError("--keep-name gives each host one replica under the original's name: "
                             "no --name, no --count")
        return [original]
    base = name or f"{original}-clone"
    return [base] if count == 1 else [f"{base}-{i}" for i in range(1, count + 1)]


class Clone:
    def __init__(self, what: str, targets: list[str], names: list[str], options: Options,
                 transport_factory: Connector, progress: Callable[[Event], None] | None = None) -> None:
        if len(set(targets)) != len(targets):
            raise UsageError("a host is named twice: --count gives one host several replicas")
        self.what, self.targets, self.names, self.options = what, targets, names, options
        self.progress = progress or quiet
        self.id = migration_id()
        self.phase = Phase.PREFLIGHT
        self.work = Path(options.image_root) / f"{self.id}-source"
        self.held: workdirs.Held | None = None        # self.work, ours while we live
        self.to = [TargetSession(t, transport_factory, options, self.id) for t in targets]
        self.workload: podman.PodmanContainer | None = None
        self.report = CloneReport(source=socket.gethostname(), workload=what, migration_id=self.id)

    # --- the whole ---------------------------------------------------------------------------
    async def run(self) -> CloneReport:
        t0 = time.monotonic()
        self.report.started_at = now()
        try:
            await self._phases()      # every request goes through _each, which names its host
            self.report.outcome = "cloned"
            return self.report
        except BaseException as e:
            record_failure(e, self.phase, self.report)
            await asyncio.shield(self.rollback())
            raise
        finally:
            self.report.total_seconds = time.monotonic() - t0
            self.report.ended_at = now()
            if await interrupts.to_the_end(self.close()):
                self.report.warnings.append("interrupted while tidying up once the clone ended: it ended as told")

    async def _phases(self) -> None:
        await self.preflight()
        self.phase = Phase.PRECOPY
        await self.send_image()
        self.phase = Phase.FINAL_DUMP
        await self.checkpoint()
        self.phase = Phase.TRANSFER
        await self.transfer()
        self.phase = Phase.RESTORE
        await self.restore()
        self.phase = Phase.COMMIT
        await self.commit()

    async def _each(self, fn: Callable[[TargetSession], Coroutine[Any, Any, T]]) -> list[T]:
        """fn(session) on every target at once; a failure names the host it came from."""
        async def one(s: TargetSession) -> T:
            try:
                return await fn(s)
            except p.RemoteFailure as e:
                raise remote_error(e, self.phase, s.target) from None
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(one(s)) for s in self.to]
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None   # the first failure is the one to tell
        return [t.result() for t in tasks]

    # --- preflight: every target can take every replica -----------------------------------------
    async def preflight(self) -> None:
        if os.geteuid() != 0:
            raise PreflightError("livemig must run as root (CRIU needs it)", phase=Phase.PREFLIGHT)
        w = await runtimes.resolve(self.what, self.options.runtime, self.options.criu, self.work)
        if not isinstance(w, podman.PodmanContainer):
            raise PreflightError(f"{self.what} is a {w.kind} {'tree' if w.kind == 'process' else 'container'}: "
                                 "only podman containers clone", phase=Phase.PREFLIGHT,
                                 hint="a runc or crun replica needs its own copy of the bundle; "
                                      "run the container under podman")
        preflight.refuse_traced(w.pids())
        preflight.refuse_stopped_in_a_frozen_cgroup(w.pids())
        self.workload = w
        self.report.runtime, self.report.workload = w.kind, w.name
        self.report.replicas = [Replica(t, n) for t in self.targets for n in self.names]
        self.held = make_work_dir(self.options.image_root, self.work)
        if self.held is None:
            raise PreflightError(f"{self.work} exists already: not this clone's", phase=Phase.PREFLIGHT)
        spec = self._spec(self.names[0])
        local = await local_facts([], self.work, spec)
        cpuinfo = await local_cpuinfo(self.work)
        need = host.resident_bytes(w.pids()) * len(self.names)

        async def check(s: TargetSession) -> list[str]:
            self.progress(Connecting(s.target))
            await s.open()
            facts = await s.request(p.Probe(container=spec, names=self.names[1:]), p.HostFacts)
            s.facts = facts
            rows, _, _ = preflight.compare(local, facts, "stopcopy", need_bytes=need, container=spec)
            warnings = preflight.enforce(rows, s.target, self.options.force)
            preflight.enforce([await s.check_cpu(cpuinfo)], s.target)
            return [f"{s.target}: {x}" for x in warnings]
        for warnings in await self._each(check):
            self.report.warnings += warnings

    @property
    def w(self) -> podman.PodmanContainer:
        if self.workload is None:
            raise LivemigError("no container resolved yet", phase=self.phase)
        return self.workload

    def _spec(self, name: str) -> p.Container:
        spec = self.w.target_spec()
        if spec is None:
            raise LivemigError(f"{self.w.name} has no spec for its replicas", phase=self.phase)
        return dataclasses.replace(spec, id=name)

    # --- image: a target that lacks the container's image gets it first -------------------------
    async def send_image(self) -> None:
        async def send(s: TargetSession) -> None:
            if s.facts is None or not s.facts.image_present:
                meter = await s.load_image(self.w)
                self._replicas(s.target)[0].bytes_wire += meter.wire
                self.progress(Copied("image", meter.raw, meter.wire, s.target))
        await self._each(send)

    def _replicas(self, target: str) -> list[Replica]:
        return [r for r in self.report.replicas if r.host == target]

    # --- checkpoint: the original stands still only while CRIU dumps it --------------------------
    async def checkpoint(self) -> None:
        self.progress(Stepping(Phase.FINAL_DUMP, "checkpoint (the original runs on)"))
        (self.work / "final").mkdir(mode=0o700)
        t0 = time.monotonic()
        st = await self.w.copy(self.work / "final")
        self.report.checkpoint_seconds = time.monotonic() - t0
        self.report.frozen_seconds, self.report.pages_written = st.frozen_time, st.pages_written
        self.report.checkpoint_bytes = (self.work / "final" / podman.ARCHIVE).stat().st_size

    # --- transfer: one archive, to every target at once -------------------------------------------
    async def transfer(self) -> None:
        async def send(s: TargetSession) -> None:
            meter = await s.send_images("final", None, self.work / "final")
            self._replicas(s.target)[0].bytes_wire += meter.wire
            self.progress(Copied("images", meter.raw, meter.wire, s.target))
        await self._each(send)
        shutil.rmtree(self.work / "final", ignore_errors=True)    # the memory image is there now

    # --- restore: every replica, paused ---------------------------------------------------------
    async def restore(self) -> None:
        self.progress(Stepping(Phase.RESTORE, "restoring on the targets"))

        async def restore_all(s: TargetSession) -> None:
            for r in self._replicas(s.target):
                restored = await s.request(p.Restore(dir="final", container=self._spec(r.name), replica=True), p.Restored)
                r.pid, r.restore_seconds = restored.pid, restored.restore_seconds
        await self._each(restore_all)

    # --- commit: all of them run, or none ----------------------------------------------------------
    async def commit(self) -> None:
        # every replica runs before any agent is told the clone's end: a finished agent is
        # gone, and a resume failing elsewhere leaves the rollback every agent, which kills
        # its replicas, running or not
        await self._each(lambda s: s.request(p.Resume(), p.Resumed))
        await self._each(lambda s: s.request(p.Finish(), p.Done))
        self.progress(Running([r.pid for r in self.report.replicas]))

    # --- rollback: no replica anywhere; the original was never stopped -----------------------------
    async def rollback(self) -> None:
        await asyncio.gather(*(s.abort() for s in self.to))
        if self.workload is not None and await podman.inspect(self.workload.container) is None:
            self.report.warnings.append(f"the original {self.workload.container} is gone here")

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.to), return_exceptions=True)
        if self.held is not None:       # the work directory is ours to remove only if we made it
            shutil.rmtree(self.work, ignore_errors=True)
            self.held.release()


DEFAULTS = Options()      # what a call that names no options runs with


async def clone(what: str, targets: list[str], options: Options = DEFAULTS, *, name: str | None = None,
                count: int = 1, keep_name: bool = False, progress: Callable[[Event], None] | None = None,
                transport_factory: Connector | None = None) -> CloneReport:
    """Replicas of the running podman container what, on each of targets, from one checkpoint:
    count of them per host, named as replica_names() says. The original runs on. Returns the
    report, or raises a LivemigError naming the phase that failed (then no replica runs)."""
    names = replica_names(what, name, count, keep_name)
    try:
        return await Clone(what, targets, names, options, transport_factory or ssh_connector(options), progress).run()
    except (ConnectionError, EOFError) as e:
        raise ConnectionFailed(f"lost the connection to an agent ({e or type(e).__name__})",
                               host=",".join(targets)) from None
