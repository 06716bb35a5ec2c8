"""What the source keeps when post-copy may fail, and how `livemig recover` settles it.

Once a post-copy's target runs, two copies exist: the target's, which may lack pages,
and the source's, stopped since the final dump, whole. Exactly one may run on. The
target decides for its copy (target/postcopy.py: a copy lacking pages dies with its page stream,
and the target writes down the verdict); the source's copy follows that verdict, and
waits, stopped, as long as nobody knows it: after a cut link, after the coordinator
was killed. This module is the source's half: the record written before the final
dump (so that a coordinator killed with SIGKILL leaves it too), the source's copy as
something to resume or end, and `recover`, which asks the target and acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .. import proc, workdirs
from ..errors import LivemigError, Phase
from ..options import WAITS, Options
from ..runtimes import Workload
from ..runtimes.held import HeldCopy
from ..wire import protocol as p
from ..workdirs import write_private
from . import throttle
from .session import Connector, TargetSession, migration_id

R = TypeVar("R")
RECORD = "RECOVER.json"


@dataclass
class Record:
    """A move past its final dump, as `livemig recover` finds it in the source's work
    directory if its coordinator vanished."""
    migration_id: str
    target: str
    source_copy: HeldCopy
    coordinator: tuple[int, int]      # the livemig move that wrote it: (PID, start time)
    lazy: bool = True                 # post-copy: the target's verdict decides who runs on
    committed: bool = False           # stop-and-copy: the source's copy was given up (saved
                                      # before it goes), so the target's copy is the workload
    source_resumed: bool = False      # recover ran it again; the target's stopped copy may remain

    def save(self, work: Path) -> None:
        write_private(work / RECORD, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> Record:
        d = json.loads(path.read_text())
        return cls(source_copy=HeldCopy.from_dict(d.pop("source_copy")),
                   coordinator=tuple(d.pop("coordinator")), **d)

    @classmethod
    def mine(cls, migration: str, target: str, workload: Workload | None, lazy: bool, bundle_moves: bool = False) -> Record:
        me = os.getpid()
        return cls(migration, target, HeldCopy.of(workload, bundle_moves), (me, proc.start_time(me) or 0), lazy)

    def coordinator_alive(self) -> bool:
        pid, t = self.coordinator
        return bool(proc.named([(pid, t)], self.source_copy.boot))


def records(image_root: str) -> list[tuple[Path, Record]]:
    """Every move whose post-copy has not been settled here and whose record reads, oldest first."""
    return [(work, rec) for work, rec in _scan(image_root) if isinstance(rec, Record)]


def _scan(image_root: str) -> list[tuple[Path, Record | LivemigError]]:
    """Every record here, oldest first: each read, or why it cannot be (each on its own, so
    that one unreadable record never keeps the others from being settled)."""
    found: list[tuple[Path, Record | LivemigError]] = []
    for path in sorted(Path(image_root).glob(f"*-source/{RECORD}")):
        try:
            found.append((path.parent, Record.load(path)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            found.append((path.parent, LivemigError(f"cannot read {path}: {e}", phase=Phase.ROLLBACK)))
    return found


def drop(work: Path) -> None:
    """The move is settled: its record goes."""
    (work / RECORD).unlink(missing_ok=True)


def forget(work: Path) -> None:
    """`livemig recover` settled the move: its record and work directory go."""
    drop(work)
    for child in work.iterdir() if work.exists() else ():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    # gone already, or not empty: the move is settled all the same (its record went first)
    with contextlib.suppress(OSError):
        work.rmdir()


@dataclass
class Settled:
    """One move as `livemig recover` left it."""
    migration_id: str
    target: str
    workload: str
    outcome: str        # "moved", "rolled back", "unresolved" (ask again), or "lost" (neither host has it)
    detail: str


async def _ask_agent(target: str, msg: Any, reply_type: type[R], connect: Connector, options: Options) -> R:
    """One request to a fresh agent on target, in a session of its own."""
    session = TargetSession(target, connect, options, migration_id())
    try:
        await session.open()
        return await session.request(msg, reply_type)
    finally:
        await session.close()


async def ask_target(target: str, migration: str, connect: Connector, options: Options) -> tuple[str, str]:
    """The verdict the target's agents left for migration: (state, detail)."""
    verdict = await _ask_agent(target, p.AskVerdict(migration), p.Verdict, connect, options)
    return verdict.state, verdict.detail


async def forget_verdict(target: str, migration: str, connect: Connector, options: Options) -> None:
    await _ask_agent(target, p.ForgetVerdict(migration), p.Done, connect, options)


async def undo_on_target(target: str, migration: str, connect, options, within: float) -> bool:
    """A rollback the move's own agent did not hear (killed, or its link cut): through a
    fresh agent, whose start sweeps what a dead agent left, the copy restored there (never
    resumed: nothing was committed) goes, and the verdict with it. Its agent may still be
    tidying up for a moment (\"try again\"). True: done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                await _ask_agent(target, p.SettleOrphan(migration, resume=False), p.OrphanSettled, connect, options)
                await forget_verdict(target, migration, connect, options)
            return True
        except p.RemoteFailure as e:
            if "try again" not in str(e) or loop.time() >= deadline:
                return False
        except (Exception, TimeoutError):  # noqa: BLE001 (not heard, however: recover settles it later)
            return False
        await asyncio.sleep(WAITS.recover_retry_poll)


# what says the target cannot be asked now
_UNREACHABLE = (LivemigError, p.RemoteFailure, OSError, EOFError)


async def recover(options: Options, connect: Connector, *, target_lost: bool = False) -> list[Settled]:
    """Settle every move on this host whose coordinator vanished past its final dump, or
    whose post-copy failed: exactly one copy runs on. target_lost: the operator knows the
    target is gone for good (its copy with it), so the source's copy runs on if it can."""
    done = []
    workdirs.check_root(options.image_root, sockets=False)     # livemig's alone, before it is swept
    workdirs.sweep(options.image_root)      # what moves killed before their record left
    for work in sorted(Path(options.image_root).glob(f"*-source/{throttle.FILE}")):
        work = work.parent
        what = throttle.left(work)
        if what is None or (work / RECORD).exists():
            continue
        # killed in pre-copy: nothing was frozen, the workload ran on here all along
        detail = throttle.lift_left(work)
        forget(work)
        done.append(Settled(work.name.removesuffix("-source"), "", what, "rolled back",
                            f"livemig was killed in pre-copy; the workload ran on here throughout; {detail}"))
    for work, rec in _scan(options.image_root):
        if isinstance(rec, LivemigError):
            done.append(Settled(work.name.removesuffix("-source"), "", "a workload", "unresolved",
                                f"{rec.message}: which workload it held, and where, cannot be told; settle it "
                                f"by hand, then delete {work}"))
            continue
        settled, finished = await _settle(work, rec, connect, options, target_lost)
        done.append(settled)
        if finished:
            forget(work)
            if not target_lost:
                try:
                    await forget_verdict(rec.target, rec.migration_id, connect, options)
                except _UNREACHABLE:
                    pass    # a stale verdict file there, a few bytes: recover asks it no more
    return done


async def _settle(work: Path, rec: Record, connect: Connector, options: Options, target_lost: bool
                  ) -> tuple[Settled, bool]:
    """One record, on its own: what it left, and whether it is done with. A failure here
    (a runtime that cannot resume its container) is told, and the record kept for the next
    try; the records after it are settled all the same."""
    c = rec.source_copy
    what = f"PID {c.pids[0][0]}" if c.runtime == "process" and c.pids else f"{c.runtime} container {c.container}"
    if rec.coordinator_alive():
        outcome, detail, finished = "unresolved", f"livemig (PID {rec.coordinator[0]}) is still moving it", False
    else:
        try:
            throttle.lift_left(work)      # killed between its record and the switchover
            settle = _settle_postcopy if rec.lazy else _settle_stopcopy
            outcome, detail, finished = await settle(work, rec, connect, options, target_lost)
        except (LivemigError, OSError) as e:
            outcome, detail, finished = "unresolved", f"{e}; run `livemig recover` again once that is fixed", False
    return Settled(rec.migration_id, rec.target, what, outcome, detail), finished


async def _settle_postcopy(work: Path, rec: Record, connect, options, target_lost: bool) -> tuple[str, str, bool]:
    """The target's verdict decides: its copy, whole, runs on; else the source's does."""
    c = rec.source_copy
    if target_lost:
        state, detail = "killed", "the target is gone, said the operator (--target-lost)"
    else:
        try:
            state, detail = await ask_target(rec.target, rec.migration_id, connect, options)
        except _UNREACHABLE as e:
            return "unresolved", f"cannot ask {rec.target}: {e}", False
    if state == "serving":
        return "unresolved", f"the copy on {rec.target} is still taking in its pages: try again in a minute", False
    if state == "whole":
        warnings = await c.end()
        return "moved", ("the target's copy has every page and runs; the source's copy is gone"
                         + "".join(f"; {w}" for w in warnings)), True
    # "killed", or "none": the target never held a copy that could run
    if not rec.source_resumed:      # a rollback the target did not hear resumed it already
        await c.resume()
    return "rolled back", ("the target's copy is gone " + (f"({detail}); " if detail else "; ")
                           + "the workload runs here again, from its final dump"), True


async def _settle_stopcopy(work: Path, rec: Record, connect, options, target_lost: bool) -> tuple[str, str, bool]:
    """Before the commit mark the source's copy is the workload: the target resumes its copy
    only after the source gave its own up, so the source's may run again at once, and the
    target's stopped copy goes. After it, the target's copy is the workload: it is resumed,
    and what is left of the source's goes."""
    c, target = rec.source_copy, rec.target
    if rec.committed and not (target_lost and await c.exists()):
        if target_lost:
            return "lost", (f"the source's copy was given up for {target}'s, and {target} is gone "
                            "(--target-lost): no copy is left"), True
        try:
            got = await _ask_agent(target, p.SettleOrphan(rec.migration_id, resume=True), p.OrphanSettled,
                                   connect, options)
        except _UNREACHABLE as e:
            return "unresolved", f"cannot ask {target} to resume its copy: {e}", False
        if got.state == "none":
            if await c.exists():      # given up on paper only: the source's copy still stands
                await c.resume()
                return "rolled back", f"{target} holds no copy; the workload runs here again", True
            return "lost", f"the source's copy was given up, and {target} holds no copy of it", True
        warnings = await c.end()
        return "moved", (f"the copy on {target} runs " + ("again" if got.state == "running" else "now")
                         + "; the source's is gone" + "".join(f"; {w}" for w in warnings)), True
    if not rec.source_resumed:
        await c.resume()
        rec.source_resumed = True
        rec.save(work)
    if target_lost:
        return "rolled back", "the workload runs here again; the target is gone, said the operator", True
    try:
        got = await _ask_agent(target, p.SettleOrphan(rec.migration_id, resume=False), p.OrphanSettled,
                               connect, options)
    except _UNREACHABLE as e:
        return "rolled back", (f"the workload runs here again; {target} may still hold a stopped copy ({e}): "
                               "run `livemig recover` again once it answers"), False
    return "rolled back", ("the workload runs here again" +
                           (f"; the stopped copy on {target} is gone" if got.state == "killed" else "")), True
