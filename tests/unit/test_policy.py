"""The pre-copy stop policy: every stop reason, and the downtime estimate behind them."""

import mmap
import os
import signal
from pathlib import Path

import pytest

from livemig import host
from livemig.options import SIZES
from livemig.source.policy import (
    Limits,
    RoundStats,
    StopReason,
    Throttling,
    choose_mode,
    decide,
    expected_downtime,
    shared_first,
    shares_much,
    stopcopy_fills,
)

MiB = 1 << 20


def rnd(pages: int, seconds: float = 1.0, ratio: float = 1.0) -> RoundStats:
    """A round that wrote pages, compressed by ratio, and took seconds."""
    return RoundStats(pages_written=pages, bytes_on_wire=int(pages * 4096 / ratio), seconds=seconds)


def test_no_rounds_yet_means_go_on():
    d = decide([])
    assert not d.stop and d.reason is None


def test_estimate_is_pending_bytes_over_last_bandwidth_plus_fixed_cost():
    # 100 MiB in 1 s -> 100 MiB/s; 25,600 pages pending = 100 MiB -> 1 s, plus 0.2 s fixed
    last = rnd(25_600, seconds=1.0)
    assert expected_downtime(last, Limits(fixed_cost=0.2)) == pytest.approx(1.2)
    # compression changes bytes per page and bandwidth alike: pages per second is what counts
    assert expected_downtime(rnd(25_600, 0.5, ratio=4), Limits()) == pytest.approx(0.5)


def test_stops_when_pending_pages_fit_the_downtime_limit():
    rounds = [rnd(131_072, 4.0), rnd(20_000, 1.0), rnd(1_000, 0.1)]
    d = decide(rounds, Limits(max_downtime=0.3))
    assert d.stop and d.reason is StopReason.WITHIN_DOWNTIME
    assert d.expected_downtime == pytest.approx(0.1)
    assert d.bandwidth == pytest.approx(1_000 * 4096 / 0.1)


def test_a_small_workload_stops_after_one_round():
    d = decide([rnd(2_000, 0.05)], Limits(max_downtime=0.3))
    assert d.stop and d.reason is StopReason.WITHIN_DOWNTIME


def test_goes_on_while_converging_above_the_limit():
    d = decide([rnd(131_072, 4.0), rnd(40_000, 1.2)], Limits(max_downtime=0.3))
    assert not d.stop and d.expected_downtime > 0.3


def test_few_pages_stops_whatever_the_estimate():
    d = decide([rnd(131_072, 4.0), rnd(64, 10.0)], Limits(max_downtime=0.001))
    assert d.stop and d.reason is StopReason.FEW_PAGES


def test_growth_over_ten_percent_means_diverging():
    rounds = [rnd(131_072, 4.0), rnd(40_000, 1.2), rnd(44_001, 1.3)]
    d = decide(rounds, Limits(max_downtime=0.3))
    assert d.stop and d.reason is StopReason.DIVERGING
    # exactly +10 % is no divergence yet, but no progress either
    d = decide([rnd(131_072, 4.0), rnd(40_000, 1.2), rnd(44_000, 1.3)], Limits(max_downtime=0.3))
    assert d.stop and d.reason is StopReason.STALLED


def test_a_round_that_shrank_less_than_ten_percent_stops_pre_copy_as_stalled():
    # the dirty set levelled off (dirty rate x round length): more rounds send it again and again
    d = decide([rnd(131_072, 4.0), rnd(5_000, 1.5), rnd(4_600, 1.5)], Limits(max_downtime=0.3))
    assert d.stop and d.reason is StopReason.STALLED
    assert not decide([rnd(131_072, 4.0), rnd(5_000, 1.5), rnd(4_499, 1.5)], Limits(max_downtime=0.3)).stop


def test_round_limit():
    rounds = [rnd(131_072, 4.0)] + [rnd(int(40_000 * 0.8 ** i), 1.2) for i in range(7)]
    assert len(rounds) == 8
    d = decide(rounds, Limits(max_downtime=0.3, max_rounds=8))
    assert d.stop and d.reason is StopReason.MAX_ROUNDS
    assert not decide(rounds[:7], Limits(max_downtime=0.3, max_rounds=8)).stop


def test_auto_converge_throttles_instead_of_stopping_when_pre_copy_does_not_converge():
    limits = Limits(max_downtime=0.3, throttling=Throttling())
    stalled = [rnd(131_072, 4.0), rnd(40_000, 1.2), rnd(39_000, 1.2)]
    d = decide(stalled, limits)
    assert not d.stop and d.throttle == 20              # QEMU's cpu-throttle-initial
    d = decide(stalled + [rnd(38_000, 1.2)], limits, throttle=20)
    assert not d.stop and d.throttle == 30              # + cpu-throttle-increment
    diverging = [rnd(131_072, 4.0), rnd(40_000, 1.2), rnd(50_000, 1.5)]
    assert decide(diverging, limits, throttle=90).throttle == 99     # never past the cap
    # at the cap, nothing more to try: stop, and say why
    d = decide(diverging, limits, throttle=99)
    assert d.stop and d.reason is StopReason.DIVERGING and d.throttle == 99
    # a throttled round that converged stops as any round does; the throttle stays as it is
    d = decide(stalled + [rnd(60, 0.1)], limits, throttle=40)
    assert d.stop and d.reason is StopReason.FEW_PAGES and d.throttle == 40
    # shrinking to less than half under the throttle: go on, the throttle unchanged
    d = decide(stalled + [rnd(15_000, 0.8)], limits, throttle=20)
    assert not d.stop and d.throttle == 20
    # shrinking, but by less than half (QEMU's trigger): a step, before any stall
    d = decide([rnd(131_072, 4.0), rnd(40_000, 1.2), rnd(25_000, 1.0)], limits)
    assert not d.stop and d.reason is None and d.throttle == 20
    assert decide([rnd(131_072, 4.0), rnd(40_000, 1.2), rnd(25_000, 1.0)], Limits(max_downtime=0.3)).throttle == 0


def test_auto_converge_gets_rounds_past_the_round_limit_but_only_as_many_as_its_steps():
    t = Throttling()
    assert t.steps == 9                                 # 20, 30, ... 90, 99
    limits = Limits(max_downtime=0.3, max_rounds=8, throttling=t)
    rounds = [rnd(131_072, 4.0)] + [rnd(int(40_000 * 0.8 ** i), 1.2) for i in range(7)]
    d = decide(rounds, limits)
    assert not d.stop and d.throttle == 20
    long = rounds + [rnd(5_000, 1.0)] * 9
    d = decide(long, limits, throttle=50)
    assert d.stop and d.reason is StopReason.STALLED
    # at the cap, rounds that still shrink go on past the round limit, to its steps' end
    shrinking = rounds + [rnd(int(8_000 * 0.85 ** i), 1.0) for i in range(9)]
    assert not decide(shrinking[:12], limits, throttle=99).stop
    d = decide(shrinking, limits, throttle=99)
    assert d.stop and d.reason is StopReason.MAX_ROUNDS and len(shrinking) == 8 + t.steps
    # off (--no-throttle, or no cgroup of its own): the same rounds stop as before
    assert decide(rounds, Limits(max_downtime=0.3, max_rounds=8)).reason is StopReason.MAX_ROUNDS


def test_thp_always_stops_after_the_first_round():
    d = decide([rnd(131_072, 4.0)], Limits(thp_always=True))
    assert d.stop and d.reason is StopReason.THP_ALWAYS


def test_a_round_that_took_no_time_gives_no_bandwidth_and_no_false_stop():
    d = decide([RoundStats(131_072, 0, 0.0)], Limits())
    assert d.expected_downtime == float("inf") and not d.stop


ALL = {"mem_dirty_track": True, "uffd-noncoop": True}
NO_DIRTY = {"mem_dirty_track": False, "uffd-noncoop": True}
NOTHING = {"mem_dirty_track": False, "uffd-noncoop": False}


@pytest.mark.parametrize("src, dst, mode", [
    (ALL, ALL, "hybrid"),
    (ALL, NOTHING, "precopy"),
    (NO_DIRTY, ALL, "precopy"),       # no soft-dirty (the namespaced lab, AArch64): by page hashes
    (NO_DIRTY, NOTHING, "stopcopy"),  # ...which needs lazy pages on both hosts
    (NOTHING, NOTHING, "stopcopy"),
])
def test_auto_picks_the_best_strategy_both_hosts_support(src, dst, mode):
    chosen, why = choose_mode("auto", src, dst)
    assert chosen == mode and why


@pytest.mark.parametrize("requested, src, dst", [
    ("precopy", NO_DIRTY, NOTHING), ("hybrid", NO_DIRTY, ALL), ("postcopy", ALL, NOTHING), ("hybrid", ALL, NOTHING),
])
def test_a_requested_strategy_the_hosts_cannot_run_is_refused(requested, src, dst):
    with pytest.raises(ValueError, match=requested):
        choose_mode(requested, src, dst)


def test_a_requested_strategy_they_can_run_is_kept():
    assert choose_mode("postcopy", NO_DIRTY, NO_DIRTY) == ("postcopy", "as requested")
    assert choose_mode("precopy", NO_DIRTY, NO_DIRTY) == ("precopy", "as requested")


def test_without_soft_dirty_auto_pre_copies_by_hashes_and_says_so_but_not_with_crun():
    mode, why = choose_mode("auto", NO_DIRTY, NO_DIRTY)
    assert mode == "precopy" and "page hashes" in why
    mode, why = choose_mode("auto", NO_DIRTY, NO_DIRTY, "crun")
    assert mode == "stopcopy" and "crun" in why
    with pytest.raises(ValueError, match="crun"):
        choose_mode("precopy", NO_DIRTY, NO_DIRTY, "crun")


def test_podman_pre_copies_one_round_where_soft_dirty_exists_and_never_lazily():
    from livemig.source.policy import choose_mode
    both = {"mem_dirty_track": True, "uffd-noncoop": True}
    none = {"mem_dirty_track": False, "uffd-noncoop": True}
    assert choose_mode("auto", both, both, "podman")[0] == "precopy"
    assert choose_mode("auto", none, none, "podman")[0] == "stopcopy"
    assert choose_mode("stopcopy", both, both, "podman") == ("stopcopy", "as requested")
    for mode, features in (("postcopy", both), ("hybrid", both), ("precopy", none)):
        with pytest.raises(ValueError):
            choose_mode(mode, features, features, "podman")


UFFD = {"uffd-noncoop": True}
GIB = 1 << 30


@pytest.mark.parametrize("wanted, runtime, features, available, fills, why", [
    (True, "process", UFFD, 4 * GIB, True, "into the target's memory"),
    (True, "runc", UFFD, int(SIZES.fill_room * GIB), True, "into the target's memory"),
    (False, "process", UFFD, 4 * GIB, False, "as asked (--no-fill)"),
    (True, "crun", UFFD, 4 * GIB, False, "crun restores its checkpoint whole"),
    (True, "podman", UFFD, 4 * GIB, False, "podman restores its checkpoint whole"),
    (True, "process", {}, 4 * GIB, False, "needs userfaultfd on both hosts"),
    (True, "process", UFFD, int(SIZES.fill_room * GIB) - 1, False, "cannot hold the pages"),
])
def test_stop_and_copy_fills_from_memory_only_where_the_target_can_hold_it_and_the_runtime_lets_it(
        wanted, runtime, features, available, fills, why):
    got, reason = stopcopy_fills(wanted, runtime, UFFD, features, available, GIB)
    assert got is fills and why in reason


def test_post_copy_says_what_a_tree_shares_copy_on_write_crosses_first():
    # a pre-fork server's sharing is told; a forked helper's few pages are not
    assert shares_much(512 << 20, 1 << 30) and not shares_much(8 << 20, 1 << 30) and not shares_much(0, 0)
    assert "share 512 MiB copy-on-write: to stay shared, it crosses before" in shared_first(512 << 20)


def test_what_a_tree_shares_copy_on_write_is_what_its_own_copies_would_cost():
    memory = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.write(b"x" * (16 << 20))        # every page present, then shared with the child
    alone = host.cow_shared_bytes([os.getpid()])
    anonymous = next(int(line.split()[1]) << 10 for line in Path(f"/proc/{os.getpid()}/smaps_rollup").read_text()
                     .splitlines() if line.startswith("Anonymous:"))
    child = os.fork()
    if child == 0:
        signal.pause()
        os._exit(0)
    try:
        # the child shares all the parent had (its 16 MiB and the interpreter's own), each page once
        shared = host.cow_shared_bytes([os.getpid(), child])
        assert alone == 0 and abs(shared - anonymous) <= 4 << 20 and shared >= 16 << 20, (shared, anonymous)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
