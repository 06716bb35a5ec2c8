"""The downtime before the freeze: what the tree's shared memory costs in every mode, the
estimate kept, told or refused (source/downtime.py), and the shared memory counted as CRIU
dumps it (host.shared_memory_bytes)."""

import mmap
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from livemig import host
from livemig.errors import DowntimeRefused, ExitCode
from livemig.options import RATES, Options
from livemig.report import Report
from livemig.source import downtime, policy

MIB = 2**20
CRIU = 1 / RATES.criu_writes_images + 1 / RATES.criu_reads_images     # seconds a byte, at the freeze


def test_shared_memory_goes_through_image_files_in_every_mode_and_is_counted_in_each():
    link, shared = 100 * MIB, 512 * MIB
    frozen = policy.frozen_seconds(shared, link)
    assert frozen == pytest.approx(shared * (CRIU + 1 / link))
    limits = policy.Limits(max_downtime=0.3, frozen_bytes=shared)
    by = {mode: policy.estimate(mode, 1024 * MIB, link, limits, into_images=mode == "stopcopy").downtime
          for mode in ("precopy", "hybrid", "postcopy", "stopcopy")}
    assert by["postcopy"] == pytest.approx(frozen)
    assert by["precopy"] == by["hybrid"] == pytest.approx(0.3 + frozen)
    assert by["stopcopy"] == pytest.approx(policy.frozen_seconds(1024 * MIB, link))
    filled = policy.estimate("stopcopy", 1024 * MIB, link, limits).downtime
    assert filled == pytest.approx(1024 * MIB / link + shared * CRIU)   # its pages crossed with the rest
    assert "512 MiB of shared memory" in policy.estimate("postcopy", MIB, link, limits).note


def test_pre_copy_s_estimate_counts_what_no_round_can_take_off():
    last = policy.RoundStats(pages_written=50, bytes_on_wire=50 * 2048, seconds=0.1)   # compressed to half
    frozen = policy.frozen_seconds(256 * MIB, 100 * MIB, 0.5)      # as measured before the rounds
    fixed = policy.fixed_cost(1024 * MIB, fills=True, frozen=frozen)
    assert fixed == pytest.approx(RATES.per_tree + 1024 * MIB / RATES.fill + frozen)
    without = policy.expected_downtime(last, policy.Limits())
    assert policy.expected_downtime(last, policy.Limits(fixed_cost=fixed)) == pytest.approx(without + fixed)
    # few pages left stop the rounds, but the estimate says what the freeze costs all the same;
    # and the few pages' round, whose rate says nothing of the link's, does not weigh in it
    d = policy.decide([last], policy.Limits(fixed_cost=fixed))
    assert d.stop and d.reason is policy.StopReason.FEW_PAGES and d.expected_downtime == pytest.approx(without + fixed)


def moved(max_downtime=None, by_mode=None):
    said = []
    m = SimpleNamespace(report=Report(pid=1, source="a", target="b", mode="precopy"),
                        options=Options(max_downtime=max_downtime), phase="pre-copy", progress=said.append,
                        downtime_by_mode=by_mode or {})
    return m, said


def test_a_promised_downtime_the_move_would_not_keep_is_refused_before_the_freeze():
    m, said = moved(max_downtime=0.5)
    with pytest.raises(DowntimeRefused) as e:
        downtime.keep(m, 2.0, "600 MiB of shared memory goes through image files while it is frozen")
    assert e.value.exit_code == ExitCode.DOWNTIME == 10 and e.value.phase == "pre-copy"
    assert str(e.value).startswith("pre-copy: the downtime would be about 2.0 s, over --max-downtime 500 ms "
                                   "(600 MiB of shared memory")
    assert "--max-downtime 2.5 would let it go" in e.value.hint
    assert m.report.expected_downtime_seconds == 2.0 and not said


def test_a_refusal_names_the_modes_that_would_keep_the_promise():
    m, _ = moved(max_downtime=0.5, by_mode={"postcopy": 0.3, "stopcopy": 4.0})
    with pytest.raises(DowntimeRefused) as e:
        downtime.keep(m, 2.0, "pre-copy's last round left 40 MiB to send")
    assert e.value.hint.startswith("--mode postcopy (about 300 ms) would keep it; --max-downtime 2.5 would")


def test_a_downtime_within_the_promise_is_kept_and_recorded():
    m, said = moved(max_downtime=0.5)
    downtime.keep(m, 0.4, "")
    assert m.report.expected_downtime_seconds == 0.4 and not m.report.warnings and not said


def test_with_no_promise_a_longer_downtime_is_told_not_refused():
    m, said = moved()
    downtime.keep(m, 1.5, "all 512 MiB cross while it is frozen")
    assert m.report.warnings == [("the downtime will be about 1.5 s, over the 300 ms pre-copy aims at "
                                 "(all 512 MiB cross while it is frozen)")]
    assert [e.text for e in said] == m.report.warnings
    assert m.options.downtime_budget == 0.3 and Options(max_downtime=2.0).downtime_budget == 2.0


def test_shared_memory_is_counted_once_however_many_map_it_and_only_where_it_holds_data():
    shared = mmap.mmap(-1, 64 * MIB)                  # anonymous shared: 48 MiB written, 16 never
    shared[:48 * MIB] = b"s" * (48 * MIB)
    fd = os.memfd_create("t")                         # a memfd, held and mapped: 8 MiB of 32 written
    os.ftruncate(fd, 32 * MIB)
    os.pwrite(fd, b"m" * (8 * MIB), 0)
    held = mmap.mmap(fd, 32 * MIB)
    private = mmap.mmap(-1, 16 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # not shared: not counted
    private[:] = b"p" * (16 * MIB)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:              # maps both too, inherited: still one copy each for CRIU
        os.close(r)
        os.write(w, b"ok")
        signal.pause()
        os._exit(0)
    try:
        os.close(w)
        assert os.read(r, 2) == b"ok"
        assert host.shared_memory_bytes([os.getpid(), child]) == 56 * MIB
        assert host.shared_memory_bytes([child]) == 56 * MIB
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        held.close()
        os.close(fd)
        shared.close()
        private.close()


HOLDER = """
import mmap, os, sys
private = mmap.mmap(-1, 128 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
private[:] = os.urandom(128 << 20)                 # does not compress
if sys.argv[1] == "shared":
    shared = mmap.mmap(-1, 384 << 20)              # three times as much, compresses to nothing
    shared[:] = b"a" * (384 << 20)
print("ready", flush=True)
sys.stdin.read()
"""


def test_what_the_memory_comes_to_on_the_wire_is_sampled_from_what_the_tree_holds():
    got = {}
    for kind in ("private", "shared"):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert p.stdout.readline() == b"ready\n"
            got[kind] = downtime.wire_ratio([p.pid], 1)
        finally:
            p.kill()
            p.wait()
    # the interpreter's own few MiB compress: a little under 1 alone, about a quarter with the rest
    assert got["private"] > 0.85 and 0.15 < got["shared"] < 0.35, got


def test_once_pre_copy_stops_its_estimate_is_at_the_best_rate_a_round_reached():
    # 1.5 GiB read by hashes in 4 s, then 0.5 s to find 50 pages changed: the final dump sends
    # 50 pages, not as long as the round that found them
    rounds = [policy.RoundStats(393_216, 393_216 * 2048, 4.0), policy.RoundStats(50, 50 * 2048, 0.5)]
    limits = policy.Limits(fixed_cost=0.2)
    assert policy.decide(rounds, limits).expected_downtime == pytest.approx(0.2 + 0.5)   # the stop rule's
    expected, rate = policy.final_estimate(rounds, limits)
    assert rate == rounds[0].bandwidth and expected == pytest.approx(0.2 + 50 * 2048 / rate) and expected < 0.21


@pytest.mark.parametrize("kind, processes, own, trial, want", [
    ("process", 6, True, (0.9, 0.9), RATES.per_tree),              # a tree's: the lab's rate, whatever a trial said
    ("runc", 1, False, None, RATES.per_container["runc"]),        # a container untried: its runtime's rate
    ("runc", 6, True, None, RATES.per_container["runc"] + 5 * RATES.per_container_process + RATES.own_network),
    ("runc", 1, False, (0.01, 0.01), RATES.per_container["runc"]),  # tried, and faster: the rate, which errs high
    ("crun", 1, False, (0.5, 0.4), 0.9 + RATES.beside_trial),     # tried, and slower here: what it measured
])
def test_a_container_s_switchover_is_its_runtime_s_or_what_its_trial_measured_if_more(monkeypatch, kind, processes,
                                                                                         own, trial, want):
    m, _ = moved()
    m.w, pids = SimpleNamespace(kind=kind), list(range(100, 100 + processes))
    monkeypatch.setattr(downtime.addresses, "own_network", lambda pids: own)
    if trial:
        m.report.trial, (m.report.trial_freeze_seconds, m.report.trial_restore_seconds) = "passed", trial
    assert downtime.switchover(m, pids) == pytest.approx(want)
    assert policy.fixed_cost(0, fills=False, switchover=downtime.switchover(m, pids)) == pytest.approx(want)
