"""Emptying a host (`livemig drain`): every workload it runs moved off it, to the targets
given, several at once within one bandwidth budget.

    settle -> find -> plan -> place -> move

settle   moves an earlier drain (or anyone) left unfinished here are settled first
         (recovery.py), so that exactly one copy of each runs before anything else moves
find     the containers podman, runc and crun run here (--only, --except), and the trees
         named with --pid; what an earlier drain moved already (DONE) is said, not looked for
plan     each workload's preflight against each target, a dry run that touches nothing; the
         link to each target is measured once, by its first plan
place    where each goes, and in what order (placement.py)
move     each workload moved by a move of its own in a process of its own (onemove.py):
         a move's CPU work (its cipher, its compression) gets a CPU of its own, and a move
         that fails is that move alone. --parallel at once; each move under way gets an
         equal share of --max-bandwidth, which the drain rewrites (in a file each move's
         bandwidth.Cap reads) as moves start and end. A move refused or rolled back for what
         another may have caused is tried again once they are done (AGAIN)

Interrupted (Ctrl-C, SIGTERM, or the drain itself killed: each move dies with a SIGINT of
its own then, onemove.py), the moves under way roll back, each by itself, and those done
stay done. A drain run again settles what a killed move left, finds what is still here,
and goes on; what the earlier runs moved, DONE says.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from .. import host, proc, runtimes, workdirs
from ..drainreport import (
    DrainEarlier,
    DrainLeft,
    DrainMove,
    DrainPlacement,
    DrainReport,
    named,
)
from ..errors import ExitCode, LivemigError, Phase, PreflightError, UsageError
from ..options import Options
from ..progress import Callback, Draining, quiet
from ..report import now
from ..runtimes import podman
from ..runtimes.oci import state as oci_state
from . import placement
from .migration import plan as plan_move
from .pending import pending
from .placement import Candidate, DrainOrder, Placement
from .recovery import recover
from .session import Connector, ssh_connector
from .testpoints import moves_stop_for_tests, stop_for_tests

DONE = "drained.json"      # under the image root: {runtime:workload: {target, moved_at}} of every drain's moves
# A move that ended so is tried again (move_all): refused by the target's preflight, its link lost, its
# restore failed, or its downtime foreseen over --max-downtime on a link shared with the others, each of
# which another move under way may have caused; the workload runs here.
AGAIN = (ExitCode.PREFLIGHT, ExitCode.CONNECTION, ExitCode.RESTORE, ExitCode.DOWNTIME)
ORDER_REASON = {
    DrainOrder.SMALLEST: ("the smallest first: most workloads are off this host soonest, and it is empty no later "
                          "(measured side by side: bench/results/2026-12-06T17-15-29-drain.md)"),
    DrainOrder.LARGEST: "the biggest first: --order largest",
}
_DEFAULTS = Options()


async def drain(targets: Sequence[str], options: Options = _DEFAULTS, *, only: Sequence[str] = (),
                exclude: Sequence[str] = (), pids: Sequence[int] = (), parallel: int | None = None,
                order: DrainOrder = DrainOrder.SMALLEST, dry_run: bool = False,
                progress: Callback | None = None, transport_factory: Connector | None = None) -> DrainReport:
    """Move every workload asked for off this host (see the module's doc); the report says
    where each went. An interrupt rolls back the moves under way and raises, the report in
    the exception's .report."""
    tell = progress or quiet
    if not targets:
        raise UsageError("drain needs a target: --to HOST[,HOST...]")
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel {parallel}: at least one move must run")
    if os.geteuid() != 0:
        raise PreflightError("livemig must run as root (CRIU needs it)", phase=Phase.PREFLIGHT)
    workdirs.check_root(options.image_root)
    connect = transport_factory or ssh_connector(options)
    r = DrainReport(source=socket.gethostname(), targets=list(targets), dry_run=dry_run, started_at=now(),
                    order=order.value, order_reason=ORDER_REASON[order],
                    max_bandwidth_bytes_per_s=options.max_bandwidth)
    t0 = time.monotonic()
    try:
        await settle(r, options, connect, tell)
        asked = await find(r, options, only, exclude, pids)
        candidates = await plan_all(asked, list(targets), options, connect, tell)
        placed, left = placement.place(candidates)
        placed = placement.ordered(placed, order)
        r.placements = [DrainPlacement(p.candidate.workload, p.candidate.runtime, p.target, p.candidate.memory_bytes,
                                       round(p.candidate.cpu, 3), p.plan.mode, p.plan.expected_downtime_seconds,
                                       p.plan) for p in placed]
        r.unplaced = [DrainLeft(c.workload, c.runtime, why) for c, why in left]
        for u in r.unplaced:
            tell(Draining(f"{named(u.runtime, u.workload)} stays here: {u.reason}"))
        r.parallel, r.parallel_reason = placement.parallel(parallel, len(os.sched_getaffinity(0)), len(placed))
        stop_for_tests("drain-planned")
        if not dry_run:
            await move_all(placed, r, options, tell)
    finally:
        r.total_seconds, r.ended_at = time.monotonic() - t0, now()
        moved = {(m.runtime, m.workload) for m in r.moves if m.exit_code == 0}
        r.empty = not r.unplaced and (dry_run or all((p.runtime, p.workload) in moved for p in r.placements))
    return r


# --- settle: what killed moves left, first --------------------------------------------------------
async def settle(r: DrainReport, options: Options, connect: Connector, tell: Callback) -> None:
    """A move left unfinished here (its livemig killed) is settled before anything else
    moves, so that it runs once; a dry run only says there is one."""
    unfinished = [x for x in await pending(options) if not x.livemig_alive]
    if not unfinished:
        return
    if r.dry_run:
        r.warnings.append(f"{len(unfinished)} move(s) left unfinished here ({', '.join(x.workload for x in unfinished)}): "
                          "the drain would settle them first (`livemig recover`)")
        return
    r.settled = await recover(options, connect)
    for s in r.settled:
        tell(Draining(f"settled a move left unfinished: {s.workload}: {s.outcome} ({s.detail})"))


# --- find: what is here to move --------------------------------------------------------------------
async def find(r: DrainReport, options: Options, only: Sequence[str], exclude: Sequence[str],
               pids: Sequence[int]) -> list[Candidate]:
    """The workloads asked for that run here; those an earlier drain moved go in r.earlier.
    One asked for by name or PID that is neither here nor moved earlier: UsageError, before
    anything is touched."""
    done = _done(options.image_root)
    here = await runtimes.hosted()
    present = [f"{h.runtime}:{h.name}" for h in here] + [f"process:{pid}" for pid in pids
                                                         if os.path.exists(f"/proc/{pid}")]
    back = [key for key in present if key in done]
    if back:
        done = forget(options.image_root, back)     # here again (moved back): no longer away
    found = []
    if only:
        for name in only:
            match = [h for h in here if h.name == name]
            if match:
                found.append(Candidate(match[0].runtime, name))
            else:
                _earlier_or_refuse(r, done, name, f"no container {name!r} here (podman, runc and crun know none)")
    else:
        found = [Candidate(h.runtime, h.name) for h in here if h.name not in exclude]
        # (every container is asked for: those earlier drains moved, and still away, are said)
        r.earlier += [e for e in (_earlier(k, v) for k, v in done.items())
                      if e.runtime != "process" and e.workload not in exclude]
    for pid in pids:
        if os.path.exists(f"/proc/{pid}"):
            found.append(Candidate("process", str(pid)))
        else:
            _earlier_or_refuse(r, done, str(pid), f"no process {pid} here")
    return found


def _earlier_or_refuse(r: DrainReport, done: dict, name: str, refusal: str) -> None:
    was = next((e for e in (_earlier(k, v) for k, v in done.items()) if e.workload == name), None)
    if was is None:
        raise UsageError(refusal)
    r.earlier.append(was)


def _earlier(key: str, v: dict) -> DrainEarlier:
    """DONE's entry for key (runtime:workload), as the report says it."""
    runtime, workload = key.split(":", 1)
    return DrainEarlier(workload, runtime, v["target"], v["moved_at"])


def _done(image_root: str) -> dict:
    try:
        return json.loads((Path(image_root) / DONE).read_text())
    except FileNotFoundError:
        return {}
    except ValueError:       # torn by a crash mid-write (it is written by rename: never seen yet)
        return {}


def remember(image_root: str, key: str, target: str) -> None:
    """Note in DONE that the workload key moved to target: said by the move itself, once it
    moved (onemove.py), so that a drain killed meanwhile still knows it."""
    _rewrite(image_root, lambda done: done.update({key: {"target": target, "moved_at": now()}}))


def forget(image_root: str, keys: list[str]) -> dict:
    """Take keys out of DONE (those workloads are here again); what is left in it."""
    return _rewrite(image_root, lambda done: [done.pop(k, None) for k in keys])


def _rewrite(image_root: str, change: Callable[[dict], object]) -> dict:
    """DONE changed by change, under a lock (several moves end at once), written whole (by
    rename); as it is now."""
    root = Path(image_root)
    with open(root / f"{DONE}.lock", "a") as lock:
        os.chmod(lock.name, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)        # (released as it closes)
        done = _done(image_root)
        change(done)
        fresh = root / f"{DONE}.new"
        fresh.write_text(json.dumps(done, indent=1))
        os.chmod(fresh, 0o600)
        fresh.replace(root / DONE)
    return done


# --- plan: each workload against each target, nothing touched ----------------------------------------
async def plan_all(found: list[Candidate], targets: list[str], options: Options, connect: Connector,
                   tell: Callback) -> list[Candidate]:
    """Each candidate's plan (or refusal) for each target, and the CPU it used meanwhile. The
    first plan for a target measures the link alone (another beside it would share it); the
    rest, told that rate, run a CPU of this host's at a time each."""
    links: dict[str, float] = {}
    t0, cpu0 = time.monotonic(), {c.key: await _cpu_ns(c) for c in found}

    async def one(c: Candidate, target: str) -> None:
        asked = replace(options, runtime=None if c.runtime == "process" else c.runtime)
        what: int | str = int(c.workload) if c.runtime == "process" else c.workload
        try:
            plan = await plan_move(what, target, asked, transport_factory=connect, link=links.get(target))
        except LivemigError as e:
            c.refused[target] = e.message
            return
        links.setdefault(target, plan.link_bytes_per_s)
        if options.max_downtime is not None and plan.expected_downtime_seconds > options.max_downtime:
            c.refused[target] = (f"its downtime would be about {plan.expected_downtime_seconds:.2f} s, over "
                                 f"--max-downtime {options.max_downtime:g} s")
            return
        c.plans[target], c.memory_bytes = plan, plan.memory_bytes

    gate = asyncio.Semaphore(len(os.sched_getaffinity(0)))

    async def gated(c: Candidate, target: str) -> None:
        async with gate:
            await one(c, target)
    for target in targets:
        for i, c in enumerate(found):
            await one(c, target)
            if target in links:     # measured: the rest at once
                async with asyncio.TaskGroup() as tg:
                    for rest in found[i + 1:]:
                        tg.create_task(gated(rest, target))
                break
        tell(Draining(f"planned against {target}: {sum(target in c.plans for c in found)} of {len(found)} "
                      "workload(s) could go there"))
    spent = max(time.monotonic() - t0, 1e-3)
    for c in found:
        c.cpu = max(0.0, (await _cpu_ns(c) - cpu0[c.key]) / 1e9 / spent)
    return found


async def _cpu_ns(c: Candidate) -> int:
    """CPU time the workload's processes have used so far (0: not found)."""
    if c.runtime == "process":
        root = int(c.workload)
    elif c.runtime == "podman":
        root = int(((await podman.inspect(c.workload)) or {}).get("State", {}).get("Pid") or 0)
    else:
        root = int(((await oci_state(c.runtime, c.workload)) or {}).get("pid") or 0)
    return sum(host.cpu_ns(pid) for pid in proc.process_tree(root)) if root else 0


# --- move: the moves, several at once, within the budget ---------------------------------------------
async def move_all(placed: list[Placement], r: DrainReport, options: Options, tell: Callback) -> None:
    """Each placement moved, r.parallel at once in the order given; each move's end in r.moves.
    A move that fails leaves the others going. Interrupted: the moves under way are interrupted
    and waited for, each rolling back, and the interrupt goes on, the report on it."""
    gate = asyncio.Semaphore(r.parallel)
    under_way: list[DrainMove] = []
    workdirs.sweep(options.image_root)      # what a drain killed before it tidied up left: gone first
    work = Path(options.image_root) / f"drain-{os.getpid()}-{time.time_ns():x}"
    held = workdirs.make(options.image_root, work)
    share = work / "bandwidth-share"
    t0 = time.monotonic()

    def reshare() -> None:
        """Each move under way's share of the budget (what is not capped is not shared)."""
        if options.max_bandwidth is None:
            return
        fresh = share.with_suffix(".new")
        fresh.write_text(str(options.max_bandwidth / max(1, len(under_way))))
        fresh.replace(share)

    async def one(p: Placement, alone: bool = False) -> DrainMove:
        async with gate:
            m = DrainMove(p.candidate.workload, p.candidate.runtime, p.target, "interrupted", 130,
                          started_seconds=round(time.monotonic() - t0, 3))
            r.moves.append(m)
            under_way.append(m)
            reshare()
            tell(Draining(f"moving {named(m.runtime, m.workload)} to {m.target}..."))
            try:
                # its link measured by its plan, alone: a share of it now, as the moves under way share it
                await _moved(p, replace(options, bandwidth_share=str(share) if options.max_bandwidth else "",
                                        link_rate=p.plan.link_bytes_per_s / (1 if alone else r.parallel)), m)
            except (LivemigError, OSError) as e:     # its process could not start: that move alone failed
                m.outcome, m.exit_code = "failed", int(getattr(e, "exit_code", ExitCode.FAILED))
                m.error = f"its move could not start: {e}"
            finally:
                under_way.remove(m)
                reshare()
            if m.exit_code == 0:      # (DONE has it: the move said so itself)
                tell(Draining(f"moved {named(m.runtime, m.workload)} to {m.target}: downtime "
                              f"{m.downtime_seconds * 1000:.0f} ms, {m.total_seconds:.1f} s"))
            else:
                tell(Draining(f"{named(m.runtime, m.workload)} did not move ({m.outcome}): {m.error}"))
            stop_for_tests("drain-moved")
            return m

    try:
        async with asyncio.TaskGroup() as tg:
            first = [(p, tg.create_task(one(p))) for p in placed]
        # Refused or rolled back for what may have been the other moves' doing (a PID one of their
        # copies took on the target, its memory, the link), a workload gets another try once they
        # are done, alone: on its target again, then on each other target that took it in its plan.
        for p, went in first:
            if went.result().exit_code not in AGAIN:      # (moved: 0)
                continue
            for target in sorted(p.candidate.plans, key=lambda t: (t != p.target, t)):
                if (await one(Placement(p.candidate, target, p.candidate.plans[target]), alone=True)).exit_code == 0:
                    break
    except asyncio.CancelledError as e:
        # what moved, and what rolled back, told by the CLI as the interrupt's: Python's own
        # exception, hence no declared attribute (errors.record_failure does the same)
        e.report = r  # type: ignore[attr-defined]
        raise
    finally:
        r.moving_seconds = time.monotonic() - t0
        workdirs.remove(work)
        held.release()


async def _moved(p: Placement, options: Options, m: DrainMove) -> None:
    """p's move, in a process of its own (onemove.py), its end in m; cancelled, the move is
    interrupted (SIGINT: it rolls back, or ends as moved past its commit) and waited for."""
    c = p.candidate
    asked = {"what": int(c.workload) if c.runtime == "process" else c.workload, "target": p.target,
             "options": options.to_dict(), "parent": os.getpid(), "key": c.key}
    child = await proc.start([sys.executable, "-m", "livemig.source.onemove"], stdin=asyncio.subprocess.PIPE,
                             env=proc.environ(PYTHONPATH=os.pathsep.join(x for x in sys.path if x),
                                              **moves_stop_for_tests()))
    t0 = time.monotonic()
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None   # (PIPEs, above)
    child.stdin.write(json.dumps(asked).encode())
    child.stdin.close()
    ended = asyncio.ensure_future(asyncio.gather(child.stdout.read(), child.stderr.read(), child.wait()))
    interrupted = False
    while True:
        try:
            out, err, code = await asyncio.shield(ended)
            break
        except asyncio.CancelledError:
            if not interrupted and child.returncode is None:
                child.send_signal(signal.SIGINT)    # once: a second would cut its rollback short
            interrupted = True
    try:
        doc = json.loads(out)
    except ValueError:       # it died before it could say (killed): its stderr says what it could
        doc = {}
    m.exit_code, m.report = code, doc
    m.outcome = doc.get("outcome") or ("moved" if code == 0 else "failed")
    m.error = "" if code == 0 else doc.get("error") or doc.get("message") or proc.why(err)
    m.downtime_seconds = float(doc.get("downtime_seconds") or 0.0)
    m.total_seconds = float(doc.get("total_seconds") or time.monotonic() - t0)
    if interrupted:
        raise asyncio.CancelledError

