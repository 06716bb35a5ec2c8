"""The trial restore, the move's step between its preflight and its pre-copy (--trial; a dry
run takes it too, unless much shared memory would lengthen its freeze): the workload's images
without its pages, restored on the target in namespaces of their own and thrown away (trial.py
has both halves). A failure there refuses the move with CRIU's reason, the workload running
on as it was, nothing frozen for the move.

The trial's freeze goes into the report on its own (trial_freeze_seconds): the workload
stood still for it, outside the move's downtime, and is never counted in it nor left out."""

from __future__ import annotations

import shutil

from .. import addresses, carried, host, interrupts, trial, unixsockets
from ..errors import DumpError, Phase, PreflightError
from ..options import SIZES
from ..progress import Stepping
from ..report import Report
from ..wire import protocol as p
from . import bundles
from .move import Move

CARRIED = "trial-carried"     # the image directory the trial's carried files cross in


async def run(m: Move) -> None:
    """Take the trial's images here, have the target restore them, and say how it went in the
    report: PreflightError (Phase.TRIAL) with CRIU's first error if the restore failed there.
    What no trial is taken of (Workload.untried: crun's, podman's) is refused if the trial was
    asked for (--trial), else said so (a dry run). A container's bundle goes first, as its
    pre-copy sends it (unless the target shares it): its runtime restores it from there."""
    w = m.w
    if w.untried:
        if m.options.trial:
            raise PreflightError(f"--trial: {w.untried}", phase=Phase.TRIAL,
                                 hint="move it without --trial: its preflight still runs")
        m.report.trial = f"not tried: {w.untried}"
        return
    pids = w.pids()
    shared = host.shared_memory_bytes(pids)
    if shared > SIZES.trial_shared_most and not m.options.trial:
        m.report.trial = (f"not tried: CRIU's dump would write the workload's {shared / 2**20:.0f} MiB of shared "
                          "memory while it is frozen for it (--trial takes it all the same)")
        return
    m.progress(Stepping(Phase.TRIAL, "trying the restore on the target"))
    await bundles.precopy_bundle(m)
    images = m.work / trial.IMAGES
    try:
        bound = [b.ip for b in addresses.held(pids)]
        if m.options.criu.tcp_established:
            bound += [ip for ip, *_ in addresses.connected(pids)]
        try:
            # (a Ctrl-C waits for the dump's end: CRIU killed mid-dump would leave its parasite
            # in the workload's processes, which only CRIU takes out and resumes)
            m.report.trial_freeze_seconds = await interrupts.uncancellable(w.trial_dump(images))
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
        sockets=unixsockets.bound_paths(pids), journal_inodes=[s.inode for s in m.journal], container=m.spec),
        p.TrialRestored)
    m.report.trial_restore_seconds = outcome.seconds
    if not outcome.ok:
        m.report.trial = f"failed: {outcome.reason}"
        raise trial.refused(outcome, m.target)
    m.report.trial = "passed"


def told(r: Report) -> dict:
    """The trial's fields of a dry run's plan (report.Plan), as the report has them."""
    return {"trial": r.trial, "trial_freeze_seconds": r.trial_freeze_seconds,
            "trial_restore_seconds": r.trial_restore_seconds}
