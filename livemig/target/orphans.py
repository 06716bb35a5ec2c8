"""Copies left stopped because the coordinator vanished between the restore and the resume.

The agent cannot tell then whether the source committed (its copy is dead: ours is the
workload) or not (the source's runs again), so ours stays stopped, never killed, and a
marker in the work directory (ORPHANED.json) says what it is. The work directory outlives
the agent (workdirs.sweep keeps it for the marker); the source's `livemig recover` settles
it, through a fresh agent (SettleOrphan), by the commit mark the source wrote.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from .. import proc, workdirs
from ..errors import LivemigError, Phase
from ..runtimes.held import HeldCopy
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

    def save(self, work: Path) -> None:
        workdirs.write_private(work / ORPHAN, dataclasses.asdict(self))

    @classmethod
    def load(cls, work: Path) -> Orphan:
        d = json.loads((work / ORPHAN).read_text())
        return cls(d["what"], HeldCopy.from_dict(d["copy"]))


def mark(copy: Copy, work: Path) -> None:
    """What was restored here, stopped, in the marker recover reads: written at once after
    a restore, so that an agent killed outright (no guard keeps a stop-and-copy's copy:
    after the commit it is the only one) leaves it too."""
    c = copy.containers[0] if copy.containers else None      # a move restores one (replicas never hold it)
    Orphan(copy.what(), HeldCopy(
        c.runtime if c else "process", proc.tasks(copy.pids()), c.id if c else "",
        str(copy.created_tree) if copy.created_tree else "", proc.boot_id(), stopped=c is not None)).save(work)


def leave(copy: Copy, work: Path) -> None:
    """The coordinator vanished before Resume: the copy stays, stopped, marked; its images go."""
    for d in work.iterdir():   # the memory images go, whatever happens
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
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
        running = verdicts.read(mid)[0] == "running"
        return p.OrphanSettled("running" if running else "none")
    warnings = []
    if resume:
        try:
            await orphan.copy.resume()
        except LivemigError as e:
            raise AgentFailure(Phase.COMMIT, f"cannot resume {orphan.what}: {e}") from None
        verdicts.write(mid, "running", phase=Phase.COMMIT)
    else:
        warnings = await orphan.copy.end()     # its bundle with it
    shutil.rmtree(work, ignore_errors=True)
    return p.OrphanSettled("resumed" if resume else "killed", "; ".join([orphan.what, *warnings]))
