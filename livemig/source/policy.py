"""When to stop pre-copy and take the final dump: pure functions over the rounds so far.

In QEMU's terms: switch over once the pages still to send fit the downtime limit
at the bandwidth the last round measured (pending / bandwidth <= max downtime).
With P.Haul's safety nets: at most 8 rounds, stop when a round writes 64 pages or
fewer, stop when a round writes more than 10 % more pages than the one before
(the workload dirties memory faster than we send it: going on only loses).

Auto-converge (QEMU's cpu-throttle): while the downtime limit is not met and a round
wrote more than half as many pages as the one before (QEMU's throttle-trigger-threshold:
the workload dirtied more than half of what pre-copy sent meanwhile), the workload is
slowed: 20 % off its CPU, then 10 % more at each such round, up to 99 %. A round that
would have stopped pre-copy (diverged, stalled, the round limit) throttles instead while
the throttle can rise, and the throttle's steps get rounds of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ..errors import Phase, PreflightError
from ..options import RATES, SIZES
from ..pages import wptrack

PAGE_SIZE = 4096


def stopcopy_fills(wanted: bool, runtime: str, source_features: dict[str, bool],
                   target_features: dict[str, bool], mem_available: int, need_bytes: int) -> tuple[bool, str]:
    """Whether stop-and-copy pushes the pages into the target's memory and fills the copy
    while it runs (a lazy dump, the pages read from the frozen tree), rather than writing
    them as image files that CRIU's restore reads back; and why. The fill takes the
    restore's page allocation (seconds per GiB) off the downtime, at post-copy's price:
    the source's copy waits, stopped, until the target's is whole. (What the tree's processes
    share copy-on-write goes into image files either way, and stays shared: pages/cow.py.)"""
    if not wanted:
        return False, "into image files, as asked (--no-fill)"
    if runtime in ("podman", "crun"):
        return False, f"into image files: {runtime} restores its checkpoint whole, with no lazy pages"
    if not (source_features.get("uffd-noncoop") and target_features.get("uffd-noncoop")):
        return False, "into image files: a fill needs userfaultfd on both hosts"
    if mem_available < SIZES.fill_room * need_bytes:
        return False, (f"into image files: the target's memory cannot hold the pages while they go in "
                       f"({mem_available >> 20} MiB available, {int(SIZES.fill_room * need_bytes) >> 20} MiB needed)")
    return True, "into the target's memory, and into the copy while it runs"


def shares_much(shared_bytes: int, need_bytes: int) -> bool:
    """Is what the tree shares copy-on-write (host.cow_shared_bytes) enough of its resident
    memory (need_bytes) to tell what keeping it shared costs? SIZES.cow_shared_least."""
    return shared_bytes > 0 and shared_bytes >= SIZES.cow_shared_least * need_bytes


def shared_first(shared_bytes: int) -> str:
    """What post-copy does with what the tree shares, said in preflight: it is not lazy."""
    return (f"the tree's processes share {shared_bytes >> 20} MiB copy-on-write: to stay shared, it crosses "
            "before the target's copy runs, as in stop-and-copy (downtime), and the rest after")


@dataclass(frozen=True)
class RoundStats:
    """What one pre-copy round did, as the policy needs it."""
    pages_written: int       # pages CRIU sent in the round (dirtied since the round before)
    bytes_on_wire: int       # what those pages cost on the link, after compression
    seconds: float           # from the round's start until its last byte was delivered

    @property
    def bandwidth(self) -> float:
        """Bytes on the wire per second that this round achieved."""
        return self.bytes_on_wire / self.seconds if self.seconds > 0 else 0.0

    @property
    def wire_bytes_per_page(self) -> float:
        return self.bytes_on_wire / self.pages_written if self.pages_written else PAGE_SIZE


@dataclass(frozen=True)
class Throttling:
    """QEMU's cpu-throttle-initial, cpu-throttle-increment and max-cpu-throttle, in %."""
    initial: int = 20
    increment: int = 10
    cap: int = 99
    trigger: float = 0.5      # throttle-trigger-threshold: a round over half the one before

    @property
    def steps(self) -> int:
        return 1 + -(-(self.cap - self.initial) // self.increment)

    def after(self, percent: int) -> int:
        return self.initial if percent == 0 else min(self.cap, percent + self.increment)


@dataclass(frozen=True)
class Limits:
    max_downtime: float = 0.300    # seconds: QEMU's downtime-limit default
    max_rounds: int = 8            # P.Haul
    min_pages: int = 64            # P.Haul: a round this small is as good as it gets
    max_growth: float = 0.10       # P.Haul: +10 % pages over the round before: diverging
    min_shrink: float = 0.10       # a round at least 10 % smaller than the one before still gains
    fixed_cost: float = 0.0        # seconds of downtime that do not depend on pre-copy's pages (freeze,
    #                                restore, a fill's pass, what goes through image files: fixed_cost())
    thp_always: bool = False       # the workload sits on huge pages: soft-dirty marks 2 MiB at a time
    throttling: Throttling | None = None   # auto-converge; None: off (--no-throttle, or no cgroup of its own)
    max_bandwidth: float | None = None     # --max-bandwidth: the final dump's pages go no faster than this
    frozen_bytes: int = 0          # what goes through image files at the freeze whatever pre-copy did:
    #                                the tree's shared memory (host.shared_memory_bytes), for estimate()
    named_bytes: int = 0           # of it, the shared memory pre-copy sent, which does not cross (frozen_seconds)
    in_memory: bool = False        # the final dump's images go into memory (host.images_in_memory)


class StopReason(str, Enum):
    WITHIN_DOWNTIME = "the pages left fit the downtime limit"
    FEW_PAGES = "the last round wrote few pages"
    DIVERGING = "pages written grew: the workload dirties memory faster than it is sent"
    STALLED = "pages written stopped shrinking: more rounds would send the same again"
    MAX_ROUNDS = "the round limit was reached"
    THP_ALWAYS = "the workload's memory is on transparent huge pages: every round would resend it all"


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: StopReason | None
    expected_downtime: float     # seconds, if the final dump were taken now
    bandwidth: float             # bytes per second on the wire, last round
    throttle: int = 0            # % off the workload's CPU for the next round (auto-converge)


def expected_downtime(last: RoundStats, limits: Limits, rate: float | None = None) -> float:
    """The final dump sends about what the last round did (the dirty set levels off at
    dirty rate x round length), at rate (by default the last round's bandwidth, never above
    the cap), plus the fixed cost (what goes through image files whatever pre-copy does
    among it)."""
    rate = bandwidth(last, limits) if rate is None else rate
    if rate <= 0:
        return float("inf")
    pending = last.pages_written * last.wire_bytes_per_page
    return limits.fixed_cost + pending / rate


def frozen_seconds(image_bytes: int, link_bytes_per_s: float, wire_ratio: float = 1.0, named: int = 0,
                   in_memory: bool = False) -> float:
    """What image_bytes of memory written into image files at the freeze add to the downtime:
    CRIU's dump writes them (on the image root's disk, or in_memory), they cross the link
    (wire_ratio of them on the wire), and its restore reads them back (options.RATES). Of them,
    named bytes (shared memory pre-copy sent: pages/shmem.py) are compared with what the target
    holds and put back from its memory instead."""
    if not image_bytes:
        return 0.0
    if link_bytes_per_s <= 0:
        return float("inf")
    write = 1 / (RATES.criu_writes_memory if in_memory else RATES.criu_writes_images)
    # (an infinite link: CRIU's writing and reading alone)
    return ((image_bytes - named) * (write + wire_ratio / link_bytes_per_s + 1 / RATES.criu_reads_images)
            + named * (write + 1 / RATES.shared_named))


def final_estimate(rounds: Sequence[RoundStats], limits: Limits) -> tuple[float, float]:
    """The downtime to expect once pre-copy has stopped, and the rate it is reckoned at: the
    best a round reached. The stop rule keeps QEMU's (the last round's rate), but a round of
    a few pages spends its time reading the memory, not sending, and at its rate the final
    dump's few pages took as long as that whole round (0.5 s for 1.5 GiB read by hashes)."""
    rate = max(bandwidth(r, limits) for r in rounds)
    return expected_downtime(rounds[-1], limits, rate), rate


def bandwidth(last: RoundStats, limits: Limits) -> float:
    """The rate the final dump's pages can expect: the last round's, within the cap. (A
    round too short for the cap to show may have gone faster than the cap allows.)"""
    if limits.max_bandwidth:
        return min(last.bandwidth, limits.max_bandwidth)
    return last.bandwidth


def decide(rounds: Sequence[RoundStats], limits: Limits = Limits(), throttle: int = 0) -> Decision:
    """Whether to take the final dump after these rounds, and why; throttle: the % the
    workload is throttled by now, and the decision's, what it should be next."""
    if not rounds:
        return Decision(False, None, float("inf"), 0.0, throttle)
    last = rounds[-1]
    estimate = expected_downtime(last, limits)
    t = limits.throttling
    # once throttling, its steps get rounds of their own: at the cap, rounds that still
    # shrink go on to the end of them
    round_limit = limits.max_rounds + (t.steps if t is not None and throttle > 0 else 0)
    reason = None
    if limits.thp_always:
        reason = StopReason.THP_ALWAYS
    elif last.pages_written <= limits.min_pages:
        reason = StopReason.FEW_PAGES
    elif estimate <= limits.max_downtime:
        reason = StopReason.WITHIN_DOWNTIME
    elif len(rounds) >= 2 and last.pages_written > rounds[-2].pages_written * (1 + limits.max_growth):
        reason = StopReason.DIVERGING
    elif len(rounds) >= 2 and last.pages_written > rounds[-2].pages_written * (1 - limits.min_shrink):
        # the dirty set has levelled off at dirty rate x round length: the final dump sends
        # it whatever happens, and each further round only adds its length to the move
        reason = StopReason.STALLED
    elif len(rounds) >= round_limit:
        reason = StopReason.MAX_ROUNDS
    if t is not None and throttle < t.cap and len(rounds) < limits.max_rounds + t.steps:
        slow = len(rounds) >= 2 and last.pages_written > t.trigger * rounds[-2].pages_written
        if reason is StopReason.MAX_ROUNDS or (slow and reason in (None, StopReason.DIVERGING,
                                                                     StopReason.STALLED)):
            # not converging (fast enough): slow the workload down and go on
            return Decision(False, None, estimate, bandwidth(last, limits), t.after(throttle))
    return Decision(reason is not None, reason, estimate, bandwidth(last, limits), throttle)


class ModeUnavailable(PreflightError, ValueError):
    """The requested mode cannot run between these hosts (a preflight row, not a crash)."""

    def __init__(self, message: str):
        super().__init__(message, phase=Phase.PREFLIGHT)


def choose_mode(requested: str, source_features: dict[str, bool],
                target_features: dict[str, bool], runtime: str = "process") -> tuple[str, str]:
    """The strategy to run, and why. Raises ModeUnavailable when the requested one cannot run.
    runtime names what checkpoints the workload: crun cannot serve pages lazily."""
    dirty = source_features.get("mem_dirty_track", False)
    uffd = source_features.get("uffd-noncoop", False) and target_features.get("uffd-noncoop", False)
    lazy = uffd and runtime != "crun"
    if runtime == "podman":
        # podman restores an exported archive, never lazily; and it keeps one
        # pre-checkpoint, so its pre-copy is one round (MAX_ROUNDS_FOR).
        if requested in ("postcopy", "hybrid"):
            raise ModeUnavailable(f"{requested} is not available for podman containers: podman restores an "
                             "exported checkpoint whole, with no lazy pages")
        if requested == "precopy" and not dirty:
            raise ModeUnavailable("precopy needs dirty-page tracking (soft-dirty), which this kernel lacks")
        if requested == "stopcopy" or not dirty:
            return "stopcopy", ("as requested" if requested == "stopcopy" else
                                "podman checkpoints in one piece here: this kernel cannot track dirty pages")
        return "precopy", ("as requested" if requested == "precopy" else
                           "one pre-checkpoint while it runs, then the dirty pages: podman has no lazy restore")
    if requested == "hybrid" and not dirty:
        raise ModeUnavailable("hybrid needs dirty-page tracking (soft-dirty), which this kernel lacks")
    if requested == "precopy" and not dirty and not lazy:
        # by hashes (pagehash.py), the final dump is lazy: the copy is filled from the target's memory
        raise ModeUnavailable("precopy needs dirty-page tracking (soft-dirty), which this kernel lacks, or "
                         "else userfaultfd on both hosts and a runtime that serves lazy pages (not crun)")
    if requested in ("postcopy", "hybrid") and runtime == "crun":
        raise ModeUnavailable(f"{requested} needs lazy pages, which crun cannot serve (runc can)")
    if requested in ("postcopy", "hybrid") and not lazy:
        raise ModeUnavailable(f"{requested} needs userfaultfd (uffd-noncoop) on both hosts")
    if requested != "auto":
        return requested, "as requested"
    if dirty and lazy:
        return "hybrid", "both hosts track dirty pages and support lazy pages"
    if dirty:
        return "precopy", ("crun cannot serve pages lazily" if runtime == "crun" else
                           "the target has no userfaultfd for lazy pages")
    if lazy and source_features.get(wptrack.FEATURE):
        return "precopy", ("by write-protection: this kernel has no soft-dirty, and userfaultfd's "
                           "write-protection tracks the written pages instead")
    if lazy:
        return "precopy", ("by page hashes: this kernel cannot track dirty pages (no soft-dirty), so pages "
                           "are compared by content")
    return "stopcopy", ("this kernel cannot track dirty pages (no soft-dirty), and pre-copy by page hashes "
                        + ("needs lazy pages, which crun cannot serve" if runtime == "crun" else
                           "needs userfaultfd on both hosts"))


def runs_here(mode: str, source_features: dict[str, bool], target_features: dict[str, bool],
              runtime: str = "process") -> bool:
    """Can mode run between these hosts (choose_mode would take it)?"""
    try:
        choose_mode(mode, source_features, target_features, runtime)
    except ModeUnavailable:
        return False
    return True


@dataclass(frozen=True)
class Estimate:
    """What a migration should cost, before it runs (livemig move --dry-run), and the downtime
    expected before the freeze of stop-and-copy and post-copy."""
    copy_seconds: float          # the memory at the measured link rate
    downtime: float              # seconds of downtime to expect, apart from freeze and restore
    rounds: str                  # how many pre-copy rounds to expect, in words
    note: str


def fixed_cost(private_bytes: int, fills: bool, frozen: float = 0.0, watched: bool = False,
               switchover: float = RATES.per_tree) -> float:
    """The downtime that pre-copy's pages do not make: the switchover's own (switchover: the
    freeze, the dump and restore of all but memory, the resume; a tree's by default, a
    container's from downtime.switchover), for a fill going through every private page of the
    frozen tree (options.RATES; watched: only listed, pre-copy having watched the writes), and
    frozen, the seconds of what goes through image files (frozen_seconds)."""
    per_byte = 0.0 if not fills else 1 / (RATES.watched_fill if watched else RATES.fill)
    return switchover + private_bytes * per_byte + frozen


def shared_words(frozen: int, named: int) -> str:
    """What becomes of frozen bytes that go through image files, named of them pre-copied."""
    if named:
        return (f"{frozen / 2**20:.0f} MiB of shared memory, pre-copied, goes into image files and comes back "
                "from the target's memory")
    return f"{frozen / 2**20:.0f} MiB of shared memory goes through image files"


def estimate(mode: str, memory_bytes: int, link_bytes_per_s: float, limits: Limits = Limits(),
             into_images: bool = False, wire_ratio: float = 1.0) -> Estimate:
    """The plan's figures. The link rate is measured with incompressible bytes, so the copy
    time is an upper bound; the downtime counts the pages as they compress (wire_ratio: what
    a sample of them came to). What goes through image files (limits.frozen_bytes; stop-and-
    copy's every page with into_images) is downtime in every mode: pre-copy and post-copy
    carry none of it. limits.fixed_cost: what no page crossing takes (fixed_cost())."""
    copy = memory_bytes / link_bytes_per_s if link_bytes_per_s > 0 else float("inf")
    frozen = frozen_seconds(limits.frozen_bytes, link_bytes_per_s, wire_ratio, limits.named_bytes,
                            limits.in_memory)
    shared = (f"; {shared_words(limits.frozen_bytes, limits.named_bytes)} while it is frozen, about {frozen:.1f} s"
              if limits.frozen_bytes else "")
    fixed = limits.fixed_cost
    if mode == "stopcopy":
        if into_images:
            down = fixed + frozen_seconds(memory_bytes, link_bytes_per_s, wire_ratio)
        else:      # every page crosses at the link's rate; the shared ones through image files too
            down = fixed + copy * wire_ratio + frozen_seconds(limits.frozen_bytes, float("inf"))
        return Estimate(copy, down, "none", "the workload is frozen while all its memory is copied" + shared)
    if mode == "postcopy":
        return Estimate(copy, fixed + frozen, "none", f"the target runs at once; its memory follows in about "
                                                      f"{copy:.1f} s, while it runs" + shared)
    final = "a lazy final dump: what is left follows after the resume" if mode == "hybrid" else \
        "then the final dump"
    return Estimate(copy, fixed + limits.max_downtime + frozen,
                    f"1 to {limits.max_rounds}: fewer when the workload dirties little memory",
                    f"the first round copies everything while the workload runs, about {copy:.1f} s; {final}. "
                    f"The pages left meet {limits.max_downtime * 1000:.0f} ms if the workload dirties memory "
                    "slower than the link sends it" + shared)
