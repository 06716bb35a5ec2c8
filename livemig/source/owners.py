"""Who runs the workload here, and what the move does with them (units.py's mechanism, at
the move's steps): found in the preflight, the unit held from the freeze, let go of here
and adopted there once the copy runs whole, put back as it was by a rollback."""

from __future__ import annotations

from .. import journal, units
from ..errors import LivemigError, Phase, PreflightError
from ..runtimes import podman
from ..runtimes.podman import PodmanContainer
from ..runtimes.process import ProcessTree
from ..wire import protocol as p
from .move import Move


async def find(m: Move, pids: list[int]) -> None:
    """The preflight's part: a workload another supervisor runs is refused (never forced);
    a tree a systemd service runs is handed over to the same unit on the target; the tree's
    streams to journald become streams of the target's journal. Nothing is touched."""
    w = m.w
    units.refuse_foreign(w.root_pid, f"PID {w.root_pid}" if w.kind == "process" else f"container {w.name}")
    if isinstance(w, PodmanContainer) and w.unit:      # a Quadlet's
        m.unit = await units.find_container(w.unit, w.name, w.conmon)
        w.unit_cgroup = m.unit.cgroup if m.unit else ""
    elif isinstance(w, ProcessTree):     # (a container's stdout is its runtime's, never journald's)
        m.unit = await units.find(w.root_pid, pids)
        m.journal = await journal.streams(pids, m.unit)
        w.dump_flags = journal.dump_flags(m.journal)
    if m.unit is not None:
        m.report.unit = m.unit.name
        said = (f"{m.unit.name} runs the workload: on {m.target} the same unit takes it once it runs there, "
                f"and here it ends without a restart" + (" and is disabled" if m.unit.enabled else ""))
        m.caution(said)


def refuse(m: Move, remote: p.HostFacts) -> None:
    """PreflightError if the target cannot take the unit, from its answer to the probe."""
    why = _refusal(m, remote)
    if why:
        raise PreflightError(why, phase=Phase.PREFLIGHT)


def _refusal(m: Move, remote: p.HostFacts) -> str:
    if m.unit is None:
        return ""
    if remote.unit_state == "no systemd":
        return f"{m.target}'s init is not systemd: nothing there would run {m.unit.name}"
    if remote.unit_state not in ("absent", "inactive", "failed", "masked"):
        return f"{m.unit.name} is {remote.unit_state} on {m.target}: the workload would run twice there"
    if remote.unit_state == "absent" and not m.unit.files:
        return f"{m.target} has no {m.unit.name}, and its definition here is not a file to carry"
    return ""


async def hold(m: Move) -> None:
    """Just before the freeze: the target has the unit's definition (written there if it had
    none), and the unit here will not restart the workload when its copy here goes."""
    if m.unit is not None:
        await m.to.request(p.InstallUnit(m.unit), p.Done)
        m.rec.unit = m.unit.name        # for `livemig recover`, should we vanish from here on
        m.save_record()
        await units.hold(m.unit)
        m.unit_held = True


async def unhold(m: Move) -> None:
    """A rollback's: the unit as it was, its workload running on here. A Quadlet's container,
    ended by its checkpoint with its unit, is restored by then (runtimes/podman.py): its unit
    takes it again."""
    if m.unit is not None and m.unit_held:
        if m.unit.container and await units.state(m.unit.name) != "active":
            try:
                m.report.warnings += await units.adopt(m.unit, await podman.adoptable(m.unit.container), m.work)
            except LivemigError as e:
                m.report.warnings.append(f"{m.unit.name} did not take its container again: {e.message}")
        m.report.warnings += await units.unhold(m.unit)
        m.unit_held = False


async def hand_over(m: Move) -> None:
    """The move is done: the unit here lets go (inactive, disabled if it was enabled), and the
    same unit there takes the copy. What could not be done is a warning: the copy runs."""
    if m.unit is None:
        return
    m.report.warnings += await units.let_go(m.unit, m.target)
    m.unit_held = False
    adopted = await m.to.request(p.AdoptUnit(m.unit), p.Adopted)
    m.report.warnings += adopted.warnings
