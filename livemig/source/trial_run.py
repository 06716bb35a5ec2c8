"""The trial restore, the move's step between its preflight and its pre-copy (--trial; a dry
run always takes it): the workload's images without its pages, restored on the target in
namespaces of their own and thrown away (trial.py has both halves). A failure there refuses
the move with CRIU's reason, the workload running on as it was, nothing frozen for the move.

The trial's freeze goes into the report on its own (trial_freeze_seconds): the workload
stood still for it, outside the move's downtime, and is never counted in it nor left out."""

from __future__ import annotations

import shutil

from .. import addresses, carried, host, trial, unixsockets
from ..errors import DumpError, Phase, PreflightError
from ..progress import Stepping
from ..report import Report
from ..runtimes.process import ProcessTree
from ..wire import protocol as p
from .move import Move

CARRIED = "trial-carried"     # the image directory the trial's carried files cross in

# Why a container's trial is not taken: what a dry run says, and a move asked for one is refused.
NOT_FOR_CONTAINERS = ("a container's trial restore is not built yet: its runtime restores it, from a bundle "
                      "the target gets only during the move")


async def run(m: Move) -> None:
    """Take the trial's images here, have the target restore them, and say how it went in the
    report: PreflightError (Phase.TRIAL) with CRIU's first error if the restore failed there.
    A container is not tried: refused if the trial was asked for (--trial), else said so (a dry run)."""
    w = m.w
    if not isinstance(w, ProcessTree):
        if m.options.trial:
            raise PreflightError(f"--trial: {NOT_FOR_CONTAINERS}", phase=Phase.TRIAL,
                                 hint="move it without --trial: its preflight still runs")
        m.report.trial = f"not tried: {NOT_FOR_CONTAINERS}"
        return
    m.progress(Stepping(Phase.TRIAL, "trying the restore on the target"))
    images = m.work / trial.IMAGES
    try:
        pids = w.pids()
        bound = [b.ip for b in addresses.held(pids)]
        if m.options.criu.tcp_established:
            bound += [ip for ip, *_ in addresses.connected(pids)]
        try:
            m.report.trial_freeze_seconds = await trial.take(w.root_pid, images, m.options.criu,
                                                             nothing_to_lock=host.same_netns(w.root_pid),
                                                             extra=tuple(w.dump_flags))
        except DumpError as e:
            m.report.trial = f"failed: {e.message}"
            raise
        await m.to.send_images(trial.IMAGES, None, images)
        if m.report.carried_files:      # as the move will carry them (switchover._carry)
            packed = m.work / CARRIED
            carried.pack(m.report.carried_files, packed)
            await m.to.send_images(CARRIED, None, packed)
    finally:
        trial.images_gone(images)
        shutil.rmtree(m.work / CARRIED, ignore_errors=True)
    outcome = await m.to.request(p.TrialRestore(
        dir=trial.IMAGES, tcp_established=m.options.criu.tcp_established, file_locks=m.options.criu.file_locks,
        carried=CARRIED if m.report.carried_files else "", addresses=sorted(set(bound)),
        sockets=unixsockets.bound_paths(pids), journal_inodes=[s.inode for s in m.journal]), p.TrialRestored)
    m.report.trial_restore_seconds = outcome.seconds
    if not outcome.ok:
        m.report.trial = f"failed: {outcome.reason}"
        raise trial.refused(trial.Outcome(outcome.ok, outcome.reason, outcome.detail, outcome.seconds), m.target)
    m.report.trial = "passed"


def told(r: Report) -> dict:
    """The trial's fields of a dry run's plan (report.Plan), as the report has them."""
    return {"trial": r.trial, "trial_freeze_seconds": r.trial_freeze_seconds,
            "trial_restore_seconds": r.trial_restore_seconds}
