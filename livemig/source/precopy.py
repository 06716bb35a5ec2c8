"""Pre-copy's rounds: pages go while the workload runs, round after round, until
policy.decide says the final dump's downtime is short enough (or no round helps any
more). Between rounds auto-converge may slow the workload (autoconverge.py). One round
of either kind is rounds.py's.

Post-copy's pages follow the resume, but a tree's shared memory cannot: CRIU restores it
from image files alone. So post-copy pre-copies that first, alone, in rounds by page hashes
(shared_memory_first; pages/shmem.py), and only what changed since crosses at the freeze."""

from __future__ import annotations

import dataclasses

from .. import host
from ..errors import LivemigError, Phase
from ..options import SIZES
from ..pages import pagehash
from ..progress import RoundDone
from . import autoconverge, downtime, policy
from .move import Move
from .rounds import hashed_round, predump_round
from .testpoints import stop_for_tests


def shared_memory_first(m: Move, pids: list[int]) -> str:
    """Post-copy: the tree's shared memory is pre-copied by hashes before the freeze, where it
    has enough to matter (below SIZES.frozen_least its round would cost more than it saves).
    What the mode's reason says of it."""
    shared = host.shared_memory_bytes(pids)
    if shared < SIZES.frozen_least:
        return ""
    m.tracker = pagehash.Tracker()      # (m.fills stays False: no private page is pre-copied)
    return f"; its {shared >> 20} MiB of shared memory first, by page hashes while it runs"


def limits(m: Move) -> policy.Limits:
    """When pre-copy stops: the user's limits, and the runtime's."""
    w, o = m.w, m.options
    max_rounds = min(o.max_rounds, w.max_rounds or o.max_rounds)
    # (the final pass reads only what was written since: pages/wptrack.py)
    watched = m.tracker is not None and m.tracker.watching
    pids = w.pids()
    return policy.Limits(max_downtime=o.downtime_budget, max_rounds=max_rounds,
                         fixed_cost=policy.fixed_cost(host.private_bytes(pids), m.fills, m.frozen_seconds + m.slip[0],
                                                     watched, downtime.switchover(m, pids)),
                         thp_always=m.tracker is None and host.huge_pages_in_use(pids),
                         # podman keeps one pre-checkpoint: no round to throttle for
                         throttling=policy.Throttling() if m.throttle and max_rounds > 1 else None,
                         max_bandwidth=o.max_bandwidth)


async def precopy_rounds(m: Move, lazy_final: bool) -> None:
    lim = limits(m)
    stats: list[policy.RoundStats] = []
    started: list[float] = []
    percent = 0          # auto-converge's throttle on the workload, in % of its CPU
    if lim.throttling and m.throttle is not None:
        m.throttle.begin()
    while True:
        n = len(stats) + 1
        if n == 1:
            stop_for_tests("round")
        if m.tracker is not None:
            st, sent, seconds, t0 = await hashed_round(m)
        else:
            st, sent, seconds, t0 = await predump_round(m, n, lazy_final)
        started.append(t0)
        if m.original is not None and m.original.root_gone():
            # pages read in a tree that is gone (its root: a container's init); run()
            # tells it as the workload's own doing. (/proc, not the runtime: every round)
            raise LivemigError("its root process is gone", phase=Phase.PRECOPY)
        m.report.rounds[-1].throttle = percent
        stats.append(policy.RoundStats(st.pages_written, sent.wire, seconds))
        decision = policy.decide(stats, lim, percent)
        # what this round wrote, the workload dirtied since the round before began
        dirtied = st.pages_written * policy.PAGE_SIZE / (t0 - started[-2]) if n > 1 else None
        m.progress(RoundDone(n, st.pages_written, sent.wire, seconds, decision.bandwidth, dirtied,
                             decision.expected_downtime, lim.max_downtime))
        if decision.throttle != percent:
            if autoconverge.step(m, decision.throttle, n):
                percent = decision.throttle
            else:
                lim = dataclasses.replace(lim, throttling=None)
                decision = policy.decide(stats, lim, percent)
        if decision.stop:
            _stopped(m, decision, lim)
            downtime.after_rounds(m, stats, lim)
            return


def _stopped(m: Move, decision: policy.Decision, lim: policy.Limits) -> None:
    """Why pre-copy stopped, in the report; and a warning where it did not converge and
    auto-converge could not help."""
    m.report.precopy_stop_reason = decision.reason.value if decision.reason else ""
    if (decision.reason in (policy.StopReason.DIVERGING, policy.StopReason.STALLED, policy.StopReason.MAX_ROUNDS)
            and decision.expected_downtime > lim.max_downtime
            and m.report.throttle.startswith("unavailable")):
        m.report.warnings.append("pre-copy did not converge, and auto-converge could not slow the "
                                 f"workload: {m.report.throttle}")
