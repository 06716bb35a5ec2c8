"""What the source keeps when post-copy may fail, and how `livemig recover` settles it.

Once a post-copy's target runs, two copies exist: the target's, which may lack pages,
and the source's, stopped since the final dump, whole. Exactly one may run on. The
target decides for its copy (target/postcopy.py: a copy lacking pages dies with its page stream,
and the target writes down the verdict); the source's copy follows that verdict, and
waits, stopped, as long as nobody knows it: after a cut link, after the coordinator
was killed. This module is the source's half: the record written before the final
dump (so that a coordinator killed with SIGKILL leaves it too), the source's copy as
something to resume or end, and `recover`, which asks the target and acts.

What was written down is checked against what is: `recover` reads the source's copy on
the host (HeldCopy.standing: running, stopped, held by CRIU still, gone, or of an earlier
boot), and a tree's commit in CRIU's own journal, and the target's agent answers as its
copy is, not as it was written. Nothing is said to run that does not: a copy resumed is
checked to run, and one gone with a restart is said to be.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .. import proc, units, workdirs
from ..errors import LivemigError, Phase
from ..options import WAITS, Options
from ..recoverreport import Settled
from ..runtimes import Workload, hook
from ..runtimes.held import GONE, HELD, REBOOTED, RUNNING, STOPPED, HeldCopy
from ..service_address import put_back
from ..wire import protocol as p
from . import fresh_agent, throttle
from .session import AgentGone, Connector, TargetSession

R = TypeVar("R")
RECORD = "RECOVER.json"


@dataclass
class Record:
    """A move past its final dump, as `livemig recover` finds it in the source's work
    directory if its coordinator vanished."""
    migration_id: str
    target: str
    source_copy: HeldCopy
    coordinator: tuple[int, int]      # the livemig move that wrote it: (PID, start time), of
                                      # source_copy.boot
    lazy: bool = True                 # post-copy: the target's verdict decides who runs on
    committed: bool = False           # stop-and-copy: the source's copy is given up (saved before
                                      # it goes), so the target's copy is the workload. A tree's is
                                      # given up once CRIU's journal says so too, which is written
                                      # after this (runtimes/hook.py): recover reads both
    source_resumed: bool = False      # recover ran it again; the target's stopped copy may remain
    target_resumed_at: float = 0.0    # post-copy's or a fill's commit point: when the target's copy was
                                      # told to run (time.time(); 0: never). From then on the source's
                                      # copy runs again only by the operator's word (--target-lost)
    rejoin_token: str = ""            # post-copy: the target's agent takes back whoever comes with it,
    stream_socket: str = ""           # here, once its coordinator is gone (rejoin.py)
    protocol: int = 0                 # the wire protocol agreed with that agent (0: a record older than 16)
    addresses: dict[str, str] = dataclasses.field(default_factory=dict)   # --move-address: those taken off
                                      # here (ADDR/PREFIX -> interface), for a resume here to put back
    unit: str = ""                    # the systemd service that runs it here, held from the freeze (units.py)

    def save(self, work: Path) -> None:
        workdirs.write_private(work / RECORD, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> Record:
        d = json.loads(path.read_text())
        copy = HeldCopy.from_dict(d.pop("source_copy"))
        copy.tcp_established |= d.pop("tcp_established", False)     # (records written before said it beside it)
        return cls(source_copy=copy, coordinator=tuple(d.pop("coordinator")), **d)

    @classmethod
    def mine(cls, migration: str, target: str, workload: Workload | None, lazy: bool, bundle_moves: bool = False) -> Record:
        me = os.getpid()
        return cls(migration, target, HeldCopy.of(workload, bundle_moves), (me, proc.start_time(me) or 0), lazy)

    def target_ran_for(self) -> float:
        """How long, at most, the target's copy has run: since it was told to (0: never)."""
        return max(time.time() - self.target_resumed_at, 0.0) if self.target_resumed_at else 0.0

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
    workdirs.unmount_under(work)        # (a lazy dump's images in memory: switchover._in_memory)
    for child in work.iterdir() if work.exists() else ():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    # gone already, or not empty: the move is settled all the same (its record went first)
    with contextlib.suppress(OSError):
        work.rmdir()


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
        # killed in pre-copy: nothing was frozen, the workload ran on here all along (or until a restart)
        ran = ("the workload ran on here until this host restarted (nothing of it runs now unless the host "
               "started it again)" if throttle.restarted(work) else "the workload ran on here throughout")
        detail = throttle.lift_left(work)
        forget(work)
        done.append(Settled(work.name.removesuffix("-source"), "", what, "rolled back",
                            f"livemig was killed in pre-copy; {ran}; {detail}"))
    for work, rec in _scan(options.image_root):
        if isinstance(rec, LivemigError):
            done.append(Settled(work.name.removesuffix("-source"), "", "a workload", "unresolved",
                                f"{rec.message}: which workload it held, and where, cannot be told; settle it "
                                f"by hand, then delete {work}"))
            continue
        settled, finished = await _settle(work, rec, connect, options, target_lost)
        if finished and rec.unit:       # its unit as the workload now stands: here, or moved
            settled.detail += await units.settled(rec.unit, settled.outcome == "moved", rec.target)
        done.append(settled)
        if finished:
            forget(work)
            # The target's verdict is forgotten too, where it answers: said lost (--target-lost)
            # it may only have lost its copy, or be gone for good, so its answer is waited for
            # no longer than a moment.
            try:
                async with asyncio.timeout(WAITS.verdict_forgotten if target_lost else None):
                    await fresh_agent.forget_verdict(rec.target, rec.migration_id, connect, options)
            except (*_UNREACHABLE, TimeoutError):
                pass    # a stale verdict file there, a few bytes: recover asks it no more
    return done


async def _settle(work: Path, rec: Record, connect: Connector, options: Options, target_lost: bool
                  ) -> tuple[Settled, bool]:
    """One record, on its own: what it left, and whether it is done with. A failure here
    (a runtime that cannot resume its container) is told, and the record kept for the next
    try; the records after it are settled all the same."""
    c = rec.source_copy
    if rec.coordinator_alive():
        outcome, detail, finished = "unresolved", f"livemig (PID {rec.coordinator[0]}) is still moving it", False
    else:
        try:
            throttle.lift_left(work)      # killed between its record and the switchover
            here = await c.standing()     # what is here, read now: never only what was written
            if here == HELD:
                outcome, detail, finished = "unresolved", (f"{c.what} is {HeldCopy.told(here)} still: run "
                                                           "`livemig recover` again in a moment"), False
            else:
                settle = _settle_postcopy if rec.lazy else _settle_stopcopy
                outcome, detail, finished = await settle(work, rec, here, connect, options, target_lost)
        except (LivemigError, OSError) as e:
            outcome, detail, finished = "unresolved", f"{e}; run `livemig recover` again once that is fixed", False
    return Settled(rec.migration_id, rec.target, c.what, outcome, detail), finished


def _gone_here(here: str) -> str:
    return ("this host restarted since the final dump, and the source's copy went with it" if here == REBOOTED
            else "the source's copy is no more here (it was killed, or ended, since)")


async def _settle_postcopy(work: Path, rec: Record, here: str, connect, options, target_lost: bool
                           ) -> tuple[str, str, bool]:
    """The target's verdict decides: its copy, whole, runs on; else the source's does, if it
    is still here. A target's copy whose agent died unheard may have run: the source's then
    runs again only by the operator's word (--target-lost)."""
    c, target = rec.source_copy, rec.target
    gone = here in (GONE, REBOOTED)
    if target_lost:
        if gone:
            return "lost", f"{target} is gone, said the operator (--target-lost), and {_gone_here(here)}", True
        state, detail = "killed", "the target is gone, said the operator (--target-lost)"
    else:
        try:
            state, detail = await fresh_agent.ask_target(target, rec.migration_id, connect, options)
        except _UNREACHABLE as e:
            return "unresolved", f"cannot ask {target}: {e}", False
    if state == "serving":
        if gone:
            return "lost", (f"the copy on {target} still waits for pages only the source's copy held, and "
                            f"{_gone_here(here)}: it can never be whole (its agent ends it)"), True
        if not rec.rejoin_token:
            return "unresolved", f"the copy on {target} is still taking in its pages: try again in a minute", False
        if rec.protocol and p.agree(rec.protocol, rec.protocol) is None:
            return "unresolved", (f"the copy on {target} is still taking in its pages, from an agent that speaks "
                                  f"wire protocol {rec.protocol}, which this livemig does not ({p.spoken()}): "
                                  "run `livemig recover` with the livemig that made the move"), False
        try:
            sent = await _take_up(rec, connect, options)
        except AgentGone:      # its agent ended meanwhile: its verdict says how
            return "unresolved", f"the copy on {target} was settled meanwhile: run `livemig recover` again", False
        except _UNREACHABLE as e:
            # A fill goes on without its coordinator: the copy may have become whole as we
            # joined, and its agent, done, ended and closed our stream. Its verdict says.
            try:
                state, detail = await fresh_agent.ask_target(target, rec.migration_id, connect, options)
            except _UNREACHABLE:
                state = "unheard"     # the first error is the one to tell
            if state != "whole":
                return "unresolved", (f"cannot take up the copy's pages on {target}: {e}; try again in a "
                                      "moment: `livemig recover`"), False
        else:
            warnings = await c.end()
            return "moved", (f"the target's copy has every page now (the {sent} it still lacked were sent from "
                             "the source's copy, stopped here) and runs; the source's copy is gone"
                             + "".join(f"; {w}" for w in warnings)), True
    if state == "whole":
        warnings = [] if gone else await c.end()
        return "moved", ("the target's copy has every page and runs; " + (_gone_here(here) if gone else
                         "the source's copy is gone") + "".join(f"; {w}" for w in warnings)), True
    if state in ("abandoned", "restarted"):
        if gone:
            return "lost", f"on {target}, {detail}; and {_gone_here(here)}", True
        return "unresolved", (f"on {target}, {detail}. The source's copy waits here, stopped, whole as of its "
                              f"final dump: once nothing of the move runs on {target}, `livemig recover "
                              "--target-lost` runs it here"), False
    # "lost", "killed", or "none": the target's copy is gone (or never was), after it ran or before
    said = "the target's copy is gone " + (f"({detail})" if detail else "")
    if gone:
        return "lost", f"{said.rstrip()}, and {_gone_here(here)}", True
    ran = _target_ran(rec) if state == "lost" or target_lost else ""
    if ran and not target_lost and here != RUNNING:
        # the commit point was passed: answers the target's copy gave, the source's would give again
        return "target lost", (f"{said.rstrip()}, after it ran ({ran}). The workload waits here, stopped, whole "
                               "as of its final dump; livemig runs it again only by your word: `livemig recover "
                               "--target-lost` does, losing what the copy there did"), False
    # (a rollback the target did not hear resumed it already)
    unlocked = await put_back(rec.addresses) + (await c.resume(work / "final") if here != RUNNING else [])
    lost = f"; what the target's copy did ({ran}) is lost" if ran else ""
    return "rolled back", (f"{said.rstrip()}; the workload runs here again, from its final dump{lost}"
                           + "".join(f"; {w}" for w in unlocked)), True


async def _take_up(rec: Record, connect: Connector, options: Options) -> int:
    """The dead coordinator's page stream, taken up: the pages the target's copy still
    lacks, read in the source's copy, stopped here (how many)."""
    from . import rejoin  # the move's machinery: loaded only when a copy waits for it
    session = TargetSession(rec.target, connect, options, rec.migration_id)
    # the agent's own, as its Welcome was to the move's coordinator (a record older than 16: ours)
    session.welcome = p.Welcome(rec.protocol or p.PROTOCOL_VERSION, "", "", rec.stream_socket)
    pids = [pid for pid, _ in rec.source_copy.pids]
    try:
        return await rejoin.take_up(session, rec.rejoin_token, options.compression_level,
                                    proc.in_dump(pids[0], pids) if pids else {}, options.reconnect_timeout)
    finally:
        with contextlib.suppress(*_UNREACHABLE):      # it may be told, or not: it forgets its verdict later
            await session.request(p.Finish(), p.Done)
        await session.close()


def _target_ran(rec: Record) -> str:
    """How long the target's copy may have run, from its Resume on ("" if it was never told to)."""
    if not rec.target_resumed_at:
        return ""
    return f"told to run at {time.strftime('%H:%M:%S', time.localtime(rec.target_resumed_at))}, " \
           f"{rec.target_ran_for():.0f} s ago at most"


async def _orphan(rec: Record, resume: bool, connect, options) -> p.OrphanSettled:
    """The target's restored copy, resumed or removed, as its agent found it."""
    return await fresh_agent.ask_agent(rec.target, p.SettleOrphan(rec.migration_id, resume=resume), p.OrphanSettled,
                            connect, options)


async def _settle_stopcopy(work: Path, rec: Record, here: str, connect, options, target_lost: bool
                           ) -> tuple[str, str, bool]:
    """What was done to the source's copy decides, and what is here now says it: given up
    (CRIU's journal said "committed" to a tree's dump; a container's commit is its mark), the
    target's copy is the workload, resumed there; never given up, the source's copy is, and
    runs again at once, the target's stopped copy removed. A tree's mark is written before
    the journal (hook.py) and may claim a commit CRIU never got: the journal says what CRIU
    did. A source's copy that runs is never ended for a target's that never ran."""
    c, target = rec.source_copy, rec.target
    if here == REBOOTED:
        # nothing here to contradict the mark (and the journal may have missed the disk)
        given_up = rec.committed
    else:
        given_up = hook.committed(hook.journal(work)) if c.runtime == "process" else rec.committed
    if here == GONE and not given_up and c.runtime == "podman":
        if kept := await c.from_its_checkpoint(work, rec.unit):
            return "unresolved", kept, False
        here = await c.standing()
    if here in (GONE, REBOOTED):
        return await _nothing_here(rec, here, given_up, connect, options, target_lost)
    note = ("livemig was killed between its commit mark and CRIU's journal: CRIU never got the commit, and "
            "resumed the workload; " if rec.committed and not given_up else
            "the source's copy was given up, but it was not ended, and runs; " if here == RUNNING and given_up
            else "")
    if given_up and here == STOPPED and not target_lost:
        try:
            got = await _orphan(rec, True, connect, options)
        except _UNREACHABLE as e:
            return "unresolved", f"cannot ask {target} to resume its copy: {e}", False
        if got.state in ("resumed", "running"):
            warnings = await c.end()
            return "moved", (f"the copy on {target} runs " + ("again" if got.state == "running" else "now")
                             + "; the source's is gone" + "".join(f"; {w}" for w in warnings)), True
        if got.state == "ended":     # it ran: the source's runs again only by the operator's word
            return "unresolved", (f"the copy on {target} ran, and is no more ({got.detail}); the source's copy, "
                                  "given up, still stands here, stopped: `livemig recover --target-lost` runs "
                                  "it here"), False
        back = await put_back(rec.addresses)
        await c.resume()      # given up on paper only: the target holds no copy
        return "rolled back", (f"{target} holds no copy" + (f" ({got.detail})" if got.detail else "")
                               + "; the workload runs here again" + "".join(f"; {w}" for w in back)), True
    note += "".join(f"{w}; " for w in await put_back(rec.addresses))
    if here != RUNNING:
        await c.resume()
    rec.source_resumed = True
    rec.save(work)
    if target_lost:
        return "rolled back", note + "the workload runs here again; the target is gone, said the operator", True
    try:
        got = await _orphan(rec, False, connect, options)
    except _UNREACHABLE as e:
        return "rolled back", (f"{note}the workload runs here again; {target} may still hold a stopped copy "
                               f"({e}): run `livemig recover` again once it answers"), False
    if got.state == "running":
        # CRIU let the source's copy go after the commit, and the target's was resumed too: that
        # one is the workload (it ran: the source's runs on only by the operator's word)
        warnings = await c.end()
        return "moved", (f"both copies ran (CRIU let the source's go after the commit); the copy on {target} "
                         "runs on, the source's is ended" + "".join(f"; {w}" for w in warnings)), True
    return "rolled back", (note + "the workload runs here again" +
                           (f"; the stopped copy on {target} is gone" if got.state == "killed" else "")), True


async def _nothing_here(rec: Record, here: str, given_up: bool, connect, options, target_lost: bool
                        ) -> tuple[str, str, bool]:
    """Stop-and-copy, the source's copy gone: the target's copy is the workload if the
    source's was given up; else the workload was the source's, and is no more."""
    target, gone = rec.target, _gone_here(here)
    if target_lost:
        return "lost", f"{gone}, and {target} is gone, said the operator (--target-lost): no copy is left", True
    if not given_up and here == REBOOTED:
        # the workload may have run on here past the final dump: the stopped copy there is the operator's to judge
        return "lost", (f"{gone}; it was the workload, never given up. {target} may keep a copy restored from the "
                        "final dump, stopped and never run, older than what ran here: it is left there for you to "
                        f"resume or remove (ORPHANED.json in its work directory under the image root names it)"), True
    try:
        got = await _orphan(rec, given_up, connect, options)
    except _UNREACHABLE as e:
        return "unresolved", f"{gone}; cannot ask {target} about its copy: {e}", False
    if given_up:
        if got.state in ("resumed", "running"):
            mine = gone if here == REBOOTED else "the source's is gone"
            return "moved", f"the copy on {target} runs {'again' if got.state == 'running' else 'now'}; {mine}", True
        if got.state == "ended":
            return "lost", f"the source's copy was given up ({gone}), and the copy on {target} ran: {got.detail}", True
        return "lost", (f"the source's copy was given up ({gone}), and {target} holds no copy of it"
                        + (f": {got.detail}" if got.detail else "")), True
    removed = f"; the stopped copy on {target} is gone" if got.state == "killed" else ""
    if rec.source_resumed:
        return "rolled back", f"the workload ran here again after the rollback, and has ended since{removed}", True
    return "lost", f"{gone}: it was the workload, never given up, and ended or was killed after CRIU let it go{removed}", True
