"""The downtime, told or promised before the freeze.

Before anything freezes, the move estimates what its switchover will cost the workload
(policy.py's arithmetic), and the report keeps the last estimate as expected_downtime_seconds:
- pre-copy and hybrid: what the last round says the final dump sends (policy.expected_downtime),
  once the rounds stop (after_rounds);
- stop-and-copy: every page, at the link's rate (measured here: session.measure_link);
- post-copy: none of the private memory (it follows after the resume);
and in every mode what goes through image files whatever pre-copy or post-copy does: the
tree's shared memory (anonymous shared mappings, memfd, SysV segments;
host.shared_memory_bytes), which CRIU writes as it dumps, which crosses then, and which its
restore reads back (options.RATES), the workload frozen all the while; and post-copy's pages
shared copy-on-write (pages/cow.py), which cross before the copy runs. A lazy final dump's
modes count, too, CRIU's writing the whole memory of a process with a thread that waits with its
stack pointer on a page boundary (pages/relazy.py foresees it, and keeps it from crossing).

A --max-downtime given is a promise: a move whose estimate is over it is refused before the
freeze (DowntimeRefused, its own exit code), the workload running on where it was, and the
error says what it would take. Pre-copy's modes are refused at once (foresee) where what no
round can take off is over it already. None given, pre-copy aims at options.DOWNTIME_AIM and a
longer downtime is told (a warning), not refused.

The freeze, CRIU's dump and restore of everything but memory, and a fill's pass over the
frozen memory are counted at rates measured in the lab (options.RATES), not on the hosts at
hand; a container's, at its runtime's rate, or as its trial timed them on these hosts where one
ran (--trial, and a dry run), whichever is more (switchover). A container's bundle changes are
not counted.
"""

from __future__ import annotations

import os

import zstandard

from .. import addresses, host
from ..errors import DowntimeRefused
from ..options import RATES, SIZES, Mode
from ..pages import pagehash, relazy
from ..pages.pagemap import PAGE
from ..progress import Cautioned
from . import policy
from .move import Move


async def foresee(m: Move, mode: Mode) -> None:
    """After the preflight, before anything crosses: the tree's shared memory, and the
    downtime of a mode without rounds, kept or refused; for pre-copy's modes, the least no
    round can take off, refused at once if over a promise (the rounds tell the rest)."""
    pids = m.w.pids()
    m.report.shared_memory_bytes = host.shared_memory_bytes(pids)
    at_freeze = host.resident_bytes(pids) if mode is Mode.STOPCOPY else _frozen(m, mode.value, pids)
    if at_freeze >= SIZES.frozen_least or m.options.max_downtime is not None:
        link, ratio = await link_rate(m), wire_ratio(pids, m.options.compression_level)
    else:       # too little to measure the link for: CRIU's work alone, and the fixed cost
        link, ratio = float("inf"), 1.0
    est, why = estimate(m, mode.value, m.fills, link, ratio)
    in_memory, slip, slip_why = _at_freeze(m, mode.value, m.fills, pids)
    m.frozen_seconds = policy.frozen_seconds(_frozen(m, mode.value, pids), link, ratio, _named(m, mode.value),
                                             in_memory)
    m.slip = (slip, slip_why)      # (pre-copy's rounds count it too)
    if m.options.max_downtime is not None:      # for the hint, should the promise be broken
        m.downtime_by_mode = {x: estimate(m, x, fills_in(m, x), link, ratio)[0].downtime
                              for x in m.modes_here if x in (Mode.POSTCOPY.value, Mode.STOPCOPY.value)}
    if mode in (Mode.PRECOPY, Mode.HYBRID):
        # what no round can take off; the rounds tell the rest
        least = est.downtime - m.options.downtime_budget
        if m.options.max_downtime is not None and least > m.options.max_downtime:
            keep(m, least, why)
        return
    keep(m, est.downtime, why)


def estimate(m: Move, mode: str, fills: bool, link: float, ratio: float) -> tuple[policy.Estimate, str]:
    """mode's estimate for the tree as it is now, at link bytes a second with its pages
    coming to ratio of themselves on the wire; and what weighs in it, in words."""
    pids = m.w.pids()
    memory, frozen, named = host.resident_bytes(pids), _frozen(m, mode, pids), _named(m, mode)
    in_memory, slip, slip_why = _at_freeze(m, mode, fills, pids)
    limits = policy.Limits(max_downtime=m.options.downtime_budget, frozen_bytes=frozen, named_bytes=named,
                           in_memory=in_memory,
                           fixed_cost=policy.fixed_cost(host.private_bytes(pids), fills, frozen=slip,
                                                        watched=_watched(m, mode), switchover=switchover(m, pids)),
                           max_rounds=min(m.options.max_rounds, m.w.max_rounds or m.options.max_rounds))
    est = policy.estimate(mode, memory, link, limits, into_images=mode == Mode.STOPCOPY.value and not fills,
                          wire_ratio=ratio)
    why = ([f"all {memory >> 20} MiB cross while it is frozen, at {link / 2**20:.0f} MiB/s"]
           if mode == Mode.STOPCOPY.value else [])
    if frozen:
        why.append(_shared(frozen, named, policy.frozen_seconds(frozen, link, ratio, named, limits.in_memory)))
    if slip_why:
        why.append(slip_why)
    return est, "; ".join(why) or "the freeze, and CRIU's dump and restore"


def switchover(m: Move, pids: list[int]) -> float:
    """What the switchover costs beside memory: a tree's, at the lab's rate; a container's, its
    runtime's for one process (its pause and checkpoint, its restore making its namespaces and
    mounts again, the source's copy deleted, its resume), more for each process beyond it and
    for a network namespace of its own (options.RATES); or what its trial measured on these
    hosts, its freeze and its restore through the runtime, with what a trial does not do, where
    that is more. pids: its processes, as the caller read them."""
    r, rate = m.report, RATES.per_container.get(m.w.kind)
    if rate is None:
        return RATES.per_tree
    rate += RATES.per_container_process * max(len(pids) - 1, 0) + RATES.own_network * addresses.own_network(pids)
    if r.trial == "passed" and r.trial_freeze_seconds is not None and r.trial_restore_seconds is not None:
        return max(rate, r.trial_freeze_seconds + r.trial_restore_seconds + RATES.beside_trial)
    return rate


def _watched(m: Move, mode: str) -> bool:
    """Does mode's final pass read only what was written since pre-copy sent it (pages/wptrack.py),
    not every page?"""
    return mode == Mode.PRECOPY.value and m.report.precopy_tracking == "write-protect"


def fills_in(m: Move, mode: str) -> bool:
    """Would mode fill the copy from the target's memory (the chosen mode: as the preflight
    said)? Pre-copy by hashes does where no mode tracks dirty pages (hybrid needs it); stop-
    and-copy, where lazy pages could run (its room is not asked here)."""
    if mode == m.report.mode:
        return m.fills
    if mode == Mode.PRECOPY.value:
        return Mode.HYBRID.value not in m.modes_here
    return mode == Mode.STOPCOPY.value and m.options.fill and Mode.POSTCOPY.value in m.modes_here


def _named(m: Move, mode: str) -> int:
    """Of what goes through image files in mode, the shared memory pre-copy by hashes sent
    (pages/shmem.py): the target puts it back from its own memory. Pre-copy sends it where
    no soft-dirty tracks it; post-copy, where there is enough (precopy.shared_memory_first)."""
    if mode == m.report.mode:
        return m.report.shared_memory_bytes if m.tracker is not None else 0
    precopied = (mode == Mode.PRECOPY.value and not _soft_dirty(m)
                 or mode == Mode.POSTCOPY.value and m.report.shared_memory_bytes >= SIZES.frozen_least)
    return m.report.shared_memory_bytes if precopied else 0


def _at_freeze(m: Move, mode: str, fills: bool, pids: list[int]) -> tuple[bool, float, str]:
    """What mode's final dump does with its images, from one reading of the tree's threads:
    whether a lazy one writes them into memory (host.images_in_memory; the shared memory as
    foresee measured it), and what CRIU's writing whole the processes it would meet with a
    thread's stack pointer on a page boundary costs the freeze (pages/relazy.py, which takes
    them out again), in seconds and in words ("": nothing)."""
    if not (mode in (Mode.POSTCOPY.value, Mode.HYBRID.value) or fills):
        return False, 0.0, ""
    slips = relazy.slips(pids)
    much = host.private_bytes(slips)
    in_memory = bool(host.images_in_memory(m.report.shared_memory_bytes + host.cow_shared_bytes(pids) + much))
    if not much:
        return in_memory, 0.0, ""
    seconds = much / (RATES.criu_writes_memory if in_memory else RATES.criu_writes_images)
    return in_memory, seconds, (f"CRIU writes {much >> 20} MiB of PID {', '.join(map(str, slips))} into image files "
                                f"as it freezes (a thread waits with its stack pointer on a page boundary), about "
                                f"{_s(seconds)}")


def _soft_dirty(m: Move) -> bool:
    """Does pre-copy here track dirty pages by soft-dirty (CRIU's pre-dump)? Hybrid needs it."""
    return m.report.precopy_tracking == "soft-dirty" or Mode.HYBRID.value in m.modes_here


def _frozen(m: Move, mode: str, pids: list[int]) -> int:
    """What goes through image files in mode, whatever pre-copy or post-copy does: the shared
    memory, the files carried (carried.py); and in post-copy what the tree shares copy-on-write
    (pages/cow.py)."""
    return (m.report.shared_memory_bytes + m.report.carried_bytes
            + (host.cow_shared_bytes(pids) if mode == Mode.POSTCOPY.value else 0))


def wire_ratio(pids: list[int], level: int) -> float:
    """What the tree's memory comes to on the wire, compressed as the streams do it: a sample
    of SIZES.wire_sample_pages of its pages, spread evenly over what it holds (its private
    pages present, and its shared memory's data)."""
    # (what to read, from, to)
    spans = [(f"/proc/{pid}/mem", a, b) for pid, a, b in pagehash.tree_runs(pids)]
    spans += [(path, a, b) for path in host.shared_memory(pids) for a, b in host.data_extents(path)]
    total = sum(b - a for _, a, b in spans)
    step = max(PAGE, total // SIZES.wire_sample_pages // PAGE * PAGE)
    sample, at = bytearray(), 0
    for path, a, b in spans:
        first = -(-at // step) * step - at       # the first sampled page in this span
        if first < b - a:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:     # gone meanwhile: its pages are not sampled
                fd = -1
            if fd >= 0:
                try:
                    for off in range(a + first, b, step):
                        sample += os.pread(fd, PAGE, off)
                except OSError:     # gone, or unmapped, meanwhile: sampled as far as it went
                    pass
                finally:
                    os.close(fd)
        at += b - a
    if not sample:
        return 1.0
    return len(zstandard.ZstdCompressor(level=level).compress(bytes(sample))) / len(sample)


def after_rounds(m: Move, rounds: list[policy.RoundStats], limits: policy.Limits) -> None:
    """Pre-copy has stopped: its estimate of the final dump's downtime, kept or refused."""
    expected, rate = policy.final_estimate(rounds, limits)
    left = rounds[-1].pages_written * rounds[-1].wire_bytes_per_page
    why = [f"pre-copy's last round left {left / 2**20:.1f} MiB to send, at {rate / 2**20:.0f} MiB/s"]
    if m.report.shared_memory_bytes:
        why.append(_shared(m.report.shared_memory_bytes, _named(m, m.report.mode), m.frozen_seconds))
    if m.slip[1]:
        why.append(m.slip[1])
    keep(m, expected, "; ".join(why))


def keep(m: Move, expected: float, why: str) -> None:
    """expected: the downtime the switchover would cost now. Recorded; over a promise,
    refused (before the freeze, nothing of the workload touched); over the aim, told."""
    m.report.expected_downtime_seconds = expected
    promised = m.options.max_downtime
    if expected <= m.options.downtime_budget:
        return
    if promised is not None:
        keeping = [f"--mode {x} (about {_s(t)})" for x, t in m.downtime_by_mode.items()
                   if t <= promised and x != m.report.mode]
        raise DowntimeRefused(
            f"the downtime would be about {_s(expected)}, over --max-downtime {_s(promised)} ({why})",
            phase=m.phase, hint=(" or ".join(keeping) + " would keep it; " if keeping else "")
            + f"--max-downtime {_up(expected)} would let it go; or move it with less memory in use, "
              "or over a faster link")
    said = (f"the downtime will be about {_s(expected)}, over the {_s(m.options.downtime_budget)} "
            f"pre-copy aims at ({why})")
    m.report.warnings.append(said)
    m.progress(Cautioned(said))


async def link_rate(m: Move) -> float:
    """The rate the switchover's bytes can expect: the cap, where there is one (the move goes
    no faster), else measured with incompressible bytes (once a move)."""
    if m.options.max_bandwidth:
        return float(m.options.max_bandwidth)
    if m.link_bytes_per_s is None:
        m.link_bytes_per_s = await m.to.measure_link(m.work)
    return m.link_bytes_per_s


def _shared(frozen: int, named: int, seconds: float) -> str:
    return f"{policy.shared_words(frozen, named)} while it is frozen, about {_s(seconds)}"


def _s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _up(seconds: float) -> str:
    """A budget a little over seconds, as a user would write it."""
    return f"{seconds * 1.25:.2g}" if seconds < 10 else f"{seconds * 1.25:.0f}"
