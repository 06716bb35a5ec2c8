"""Copies left behind by an agent that is gone, and what a fresh agent tells `livemig recover`
of them, as they actually are here now, never only as they were written down.

A copy left stopped because the coordinator vanished between the restore and the resume:
the agent cannot tell then whether the source committed (its copy is dead: ours is the
workload) or not (the source's runs again), so ours stays stopped, never killed, and a
marker in the work directory (ORPHANED.json) says what it is. The work directory outlives
the agent (workdirs.sweep keeps it for the marker); the source's `livemig recover` settles
it, through a fresh agent (SettleOrphan), by the commit mark the source wrote.

A post-copy's verdict (AskVerdict): "serving" is true only while its agent, or its guard,
lives (they hold the move's work directory); else they died without a word (killed both,
or the host restarted), and the answer says so ("abandoned", "restarted"), and whether
the copy still runs. A copy resumed here ("running") is said to run only if it does.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from .. import proc, service_address, workdirs
from ..errors import LivemigError, Phase
from ..runtimes.held import GONE, REBOOTED, HeldCopy
from ..wire import protocol as p
from .copy import Copy
from .failures import AgentFailure, checked_name
from .verdicts import Verdicts

ORPHAN = "ORPHANED.json"


@dataclasses.dataclass
class Orphan:
    """A restored copy left stopped: what `livemig recover`, through SettleOrphan, resumes or ends."""
    what: str
    copy: HeldCopy          # its bundle, if this move brought it here, goes with it
    addresses: dict[str, str] = dataclasses.field(default_factory=dict)   # put on for it (service_address.py)
    guarding: str = ""      # the guard against resets from them, still up

    def save(self, work: Path) -> None:
        workdirs.write_private(work / ORPHAN, dataclasses.asdict(self))

    @classmethod
    def load(cls, work: Path) -> Orphan:
        d = json.loads((work / ORPHAN).read_text())
        return cls(d["what"], HeldCopy.from_dict(d["copy"]), d.get("addresses", {}), d.get("guarding", ""))


def held(copy: Copy) -> HeldCopy:
    """The copy restored here, as it is now, its processes named for good."""
    c = copy.containers[0] if copy.containers else None      # a move restores one (replicas never hold it)
    return HeldCopy(c.runtime if c else "process", proc.tasks(copy.pids()), c.id if c else "",
                    str(copy.created_tree) if copy.created_tree else "", proc.boot_id(), stopped=c is not None,
                    own_stops=copy.own_stops, hushed=list(copy.hushed))


def mark(copy: Copy, work: Path) -> None:
    """What was restored here, stopped, in the marker recover reads: written at once after
    a restore, so that an agent killed outright (no guard keeps a stop-and-copy's copy:
    after the commit it is the only one) leaves it too."""
    Orphan(copy.what(), held(copy), dict(copy.addresses), copy.guarding).save(work)


def leave(copy: Copy, work: Path) -> None:
    """The coordinator vanished before Resume: the copy stays, stopped, marked; its images go."""
    workdirs.remove(work, images_only=True)     # the memory images go, whatever happens
    mark(copy, work)
    print(f"livemig agent: the coordinator vanished; restored {copy.what()} left "
          f"stopped (see {work / ORPHAN}; `livemig recover` on the source settles it)", file=sys.stderr)


async def settle(root: Path, verdicts: Verdicts, msg: p.SettleOrphan) -> p.OrphanSettled:
    """SettleOrphan: resume or end the copy another agent left under root."""
    mid = checked_name(msg.migration_id, "migration id")
    work = root / mid
    held: workdirs.Held | None
    try:
        held = workdirs.hold(work)
    except BlockingIOError:
        # its agent still tidies up (it lost its coordinator a moment ago)
        raise AgentFailure(Phase.COMMIT, f"the agent of move {mid} is still there: try again") from None
    except FileNotFoundError:
        held = None
    try:
        return await _settle(verdicts, mid, work, msg.resume)
    finally:
        if held is not None:
            held.release()


async def _settle(verdicts: Verdicts, mid: str, work: Path, resume: bool) -> p.OrphanSettled:
    try:
        orphan = Orphan.load(work)
    except FileNotFoundError:
        # resumed before its coordinator vanished (that verdict is written at Resume)?
        return await _resumed_before(verdicts, mid)
    now = await orphan.copy.standing()
    if now in (GONE, REBOOTED):
        # nothing of it to resume or to end: said as such, never as resumed
        workdirs.remove(work)
        return p.OrphanSettled("gone", f"{orphan.what}, restored here and never run, is "
                                       f"{HeldCopy.told(now)} since")
    if resume:
        try:
            # (its own network, quiet until now, opened with it: what could not be, said)
            warnings = await orphan.copy.resume()
        except LivemigError as e:
            raise AgentFailure(Phase.COMMIT, f"cannot resume {orphan.what}: {e}") from None
        verdicts.write(mid, "running", phase=Phase.COMMIT)
        warnings += await service_address.settle_in(orphan.addresses, orphan.guarding)
    else:
        warnings = await orphan.copy.end()     # its bundle with it (and its links: quiet.unlink)
        warnings += await service_address.let_go(orphan.addresses, orphan.guarding)
    workdirs.remove(work)
    return p.OrphanSettled("resumed" if resume else "killed", "; ".join([orphan.what, *warnings]))


async def _resumed_before(verdicts: Verdicts, mid: str) -> p.OrphanSettled:
    """A copy its agent resumed ("running"), as it is now: "running" only if it still runs,
    "ended" if it ran and is no more; "none": no copy of that move was resumed here."""
    state, _, writer = verdicts.read_all(mid)
    if state != "running":
        return p.OrphanSettled("none")
    ended = _restarted_since(writer)
    if not ended:
        noted = verdicts.noted_copy(mid)
        ran = HeldCopy.from_dict(noted) if noted else None
        if ran is not None and await ran.standing() in (GONE, REBOOTED):
            ended = f"{ran.what} ran here, and has ended since"
    return p.OrphanSettled("ended", ended) if ended else p.OrphanSettled("running")


def _restarted_since(writer: dict) -> str:
    boot = writer.get("boot", "")
    return "" if not boot or boot == proc.boot_id() else "this host restarted since: the copy went with it"


async def ask(root: Path, verdicts: Verdicts, msg: p.AskVerdict) -> p.Verdict:
    """AskVerdict: how the move's post-copy ended here, as written, but for a copy whose
    agent died without a word: "restarted" (a verdict of an earlier boot, but "killed",
    which a restart does not undo) or "abandoned" (its agent and its guard are gone)."""
    mid = checked_name(msg.migration_id, "migration id")
    state, detail, writer = verdicts.read_all(mid)
    restarted = _restarted_since(writer)
    if state in ("serving", "whole", "running") and restarted:
        was = {"serving": "its copy was still taking in its pages", "whole": "its copy had every page and ran",
               "running": "its copy ran"}[state]
        return p.Verdict(mid, "restarted", f"{was} when {restarted}")
    if state == "serving" and not workdirs.owned(root / mid):     # its agent's, or guard's
        return p.Verdict(mid, "abandoned", await _abandoned(verdicts, mid, writer))
    return p.Verdict(mid, state, detail)


async def _abandoned(verdicts: Verdicts, mid: str, writer: dict) -> str:
    agent = f"its agent (PID {writer['pid']})" if "pid" in writer else "its agent"
    said = f"{agent} and its guard died while its copy still took in its pages, and nobody ended the copy: "
    noted = verdicts.noted_copy(mid)
    if noted is None:
        return said + "it was never restored, or what it was cannot be told"
    copy = HeldCopy.from_dict(noted)
    now = await copy.standing()
    if now in (GONE, REBOOTED):
        return said + f"{copy.what} is gone"
    return said + f"{copy.what} is still here, {HeldCopy.told(now)}, and the pages it lacked may read as zeros"


async def forget(verdicts: Verdicts, msg: p.ForgetVerdict) -> p.Done:
    verdicts.forget(checked_name(msg.migration_id, "migration id"))
    return p.Done()
