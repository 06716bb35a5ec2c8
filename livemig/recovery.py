"""What the source keeps when post-copy may fail, and how `livemig recover` settles it.

Once a post-copy's target runs, two copies exist: the target's, which may lack pages,
and the source's, stopped since the final dump, whole. Exactly one may run on. The
target decides for its copy (agent.py: a copy lacking pages dies with its page stream,
and the target writes down the verdict); the source's copy follows that verdict, and
waits, stopped, as long as nobody knows it: after a cut link, after the coordinator
was killed. This module is the source's half: the record written before the final
dump (so that a coordinator killed with SIGKILL leaves it too), the source's copy as
something to resume or end, and `recover`, which asks the target and acts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from . import host, proc, protocol as p
from .errors import LivemigError, Phase
from .session import TargetSession, migration_id

RECORD = "RECOVER.json"


def start_time(pid: int) -> int | None:
    """When pid started (clock ticks since boot): with the PID, names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class SourceCopy:
    """The workload as the source still holds it: stopped (a tree) or paused (a container)."""
    runtime: str                                   # "process", or the container's runtime
    pids: list[tuple[int, int]] = field(default_factory=list)   # (PID, start time)
    container: str = ""

    @classmethod
    def of(cls, workload) -> "SourceCopy":
        pids = [(pid, t) for pid in workload.pids() if (t := start_time(pid)) is not None]
        return cls(workload.kind, pids, "" if workload.kind == "process" else workload.name)

    def _alive(self) -> list[int]:
        return [pid for pid, t in self.pids if start_time(pid) == t]

    def _control(self, action: str) -> list[str]:
        from .runtimes import control
        return control(p.Container(self.runtime, self.container, ""), action)

    async def resume(self) -> None:
        """Let it run again, from the final dump."""
        if self.runtime == "process":
            host.signal_tree(self._alive(), signal.SIGCONT)
        else:
            await proc.run(self._control("resume"), phase=Phase.ROLLBACK)

    async def end(self) -> list[str]:
        """Its target's copy runs: this one goes. Returns warnings."""
        if self.runtime == "process":
            host.signal_tree(self._alive(), signal.SIGKILL)
            return []
        res = await proc.run(self._control("delete"), check=False)
        return [] if res.returncode == 0 else [f"{self.runtime} delete {self.container} failed here: "
                                               f"{proc.why(res.stderr)}"]


@dataclass
class Record:
    """A move in post-copy, as `livemig recover` finds it in the source's work directory."""
    migration_id: str
    target: str
    source_copy: SourceCopy
    coordinator: tuple[int, int]      # the livemig move that wrote it: (PID, start time)

    def save(self, work: Path) -> None:
        fd = os.open(work / RECORD, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(self), f)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: Path) -> "Record":
        d = json.loads(path.read_text())
        copy = d.pop("source_copy")
        return cls(source_copy=SourceCopy(copy["runtime"], [tuple(x) for x in copy["pids"]], copy["container"]),
                   coordinator=tuple(d.pop("coordinator")), **d)

    @classmethod
    def mine(cls, migration: str, target: str, workload) -> "Record":
        me = os.getpid()
        return cls(migration, target, SourceCopy.of(workload), (me, start_time(me) or 0))

    def coordinator_alive(self) -> bool:
        pid, t = self.coordinator
        return start_time(pid) == t


def records(image_root: str) -> list[tuple[Path, Record]]:
    """Every move whose post-copy has not been settled here, oldest first."""
    found = []
    for path in sorted(Path(image_root).glob(f"*-source/{RECORD}")):
        try:
            found.append((path.parent, Record.load(path)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LivemigError(f"cannot read {path}: {e}", phase=Phase.ROLLBACK) from None
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
    try:
        work.rmdir()
    except OSError:
        pass


@dataclass
class Settled:
    """One move as `livemig recover` left it."""
    migration_id: str
    target: str
    workload: str
    outcome: str        # "moved", "rolled back" or "unresolved"
    detail: str


async def _ask_agent(target: str, msg, reply_type, connect, options):
    """One request to a fresh agent on target, in a session of its own."""
    session = TargetSession(target, connect, options, migration_id())
    try:
        await session.open()
        return await session.request(msg, reply_type)
    finally:
        await session.close()


async def ask_target(target: str, migration: str, connect, options) -> tuple[str, str]:
    """The verdict the target's agents left for migration: (state, detail)."""
    verdict = await _ask_agent(target, p.AskVerdict(migration), p.Verdict, connect, options)
    return verdict.state, verdict.detail


async def forget_verdict(target: str, migration: str, connect, options) -> None:
    await _ask_agent(target, p.ForgetVerdict(migration), p.Done, connect, options)


async def recover(options, connect, *, target_lost: bool = False) -> list[Settled]:
    """Settle every unsettled post-copy on this host: the target's verdict decides which copy
    runs on. target_lost: the operator knows the target is gone for good (its copy with it),
    so the source's copy runs on without asking."""
    done = []
    for work, rec in records(options.image_root):
        c = rec.source_copy
        what = f"PID {c.pids[0][0]}" if c.runtime == "process" and c.pids else f"{c.runtime} container {c.container}"

        def settled(outcome: str, detail: str) -> None:
            done.append(Settled(rec.migration_id, rec.target, what, outcome, detail))
        if rec.coordinator_alive():
            settled("unresolved", f"livemig (PID {rec.coordinator[0]}) is still moving it")
            continue
        if target_lost:
            state, detail = "killed", "the target is gone, said the operator (--target-lost)"
        else:
            try:
                state, detail = await ask_target(rec.target, rec.migration_id, connect, options)
            except (LivemigError, p.RemoteFailure, OSError, EOFError) as e:
                settled("unresolved", f"cannot ask {rec.target}: {e}")
                continue
        if state == "serving":
            settled("unresolved", f"post-copy is still under way on {rec.target}: try again in a minute")
            continue
        if state == "whole":
            warnings = await c.end()
            settled("moved", "the target's copy has every page and runs; the source's copy is gone"
                    + "".join(f"; {w}" for w in warnings))
        else:
            # "killed", or "none": the target never held a copy that could run
            await c.resume()
            settled("rolled back", "the target's copy is gone " + (f"({detail}); " if detail else "; ")
                    + "the workload runs here again, from its final dump")
        forget(work)
        if not target_lost:
            try:
                await forget_verdict(rec.target, rec.migration_id, connect, options)
            except (LivemigError, p.RemoteFailure, OSError, EOFError):
                pass    # a stale verdict file there, a few bytes: recover asks it no more
    return done

