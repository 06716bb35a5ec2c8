"""A drain's placement (source/placement.py): where each workload goes, in what order, how
many at once, from plans made up here (their logic alone: the lab's test_drain.py moves real ones)."""

from __future__ import annotations

from livemig.options import SIZES, Mode, Options
from livemig.report import Plan
from livemig.source import placement
from livemig.source.placement import Candidate, DrainOrder

MIB = 1 << 20


def plan(target: str, memory: int, free: int, cpus: int = 2, load: float = 0.0) -> Plan:
    return Plan(workload="w", runtime="process", source="a", target=target, mode="precopy", mode_reason="",
                processes=1, memory_bytes=memory, link_bytes_per_s=100 * MIB, copy_seconds=1.0,
                expected_downtime_seconds=0.2, expected_rounds="1", note="",
                target_memory_available_bytes=free, target_cpus=cpus, target_load=load)


def candidate(name: str, mib: int, free: dict[str, int], cpu: float = 0.0, refused: dict[str, str] | None = None,
              **target_facts) -> Candidate:
    return Candidate("runc", name, mib * MIB, cpu, {t: plan(t, mib * MIB, f * MIB, **target_facts)
                                                      for t, f in free.items()}, refused or {})


def test_the_biggest_are_placed_first_each_where_the_least_would_then_be_taken():
    free = {"b": 1000, "c": 1000}
    placed, left = placement.place([candidate("small", 100, free), candidate("big", 500, free),
                                    candidate("mid", 300, free)])
    assert not left
    assert [(p.candidate.workload, p.target) for p in placed] == [("big", "b"), ("mid", "c"), ("small", "c")]


def test_a_workload_goes_only_where_its_memory_fits_a_fill_room_over():
    # b has room for it once, not twice; c refused it in its preflight
    free = {"b": int(400 * SIZES.fill_room) + 1}      # MiB
    first = candidate("one", 400, free, refused={"c": "no runc there"})
    second = candidate("two", 400, free, refused={"c": "no runc there"})
    placed, left = placement.place([first, second])
    assert [(p.candidate.workload, p.target) for p in placed] == [("one", "b")]
    [(c, why)] = left
    assert c.workload == "two"
    assert why.startswith("c: no runc there; b would take it, but it needs 500 MiB free") and "on b" in why


def test_a_target_loaded_in_cpu_takes_less_though_it_has_the_memory():
    busy = Candidate("runc", "hot", 10 * MIB, 0.9, {"b": plan("b", 10 * MIB, 4000 * MIB, cpus=1, load=0.5),
                                                     "c": plan("c", 10 * MIB, 1000 * MIB, cpus=1, load=0.0)})
    [p], _ = placement.place([busy])
    assert p.target == "c"       # b's CPU would be 140 % taken, c's 90 %


def test_a_workload_nobody_takes_says_why_for_each_target():
    lonely = Candidate("process", "4242", 0, 0.0, {}, {"b": "PID 4242 is taken there", "c": "no CRIU"})
    placed, [(_, why)] = placement.place([lonely])
    assert not placed and why == "b: PID 4242 is taken there; c: no CRIU"


def test_the_order_is_the_biggest_first_or_the_smallest():
    free = {"b": 10_000}
    placed, _ = placement.place([candidate(n, m, free) for n, m in (("x", 5), ("y", 50), ("z", 20))])
    assert [p.candidate.workload for p in placement.ordered(placed, DrainOrder.LARGEST)] == ["y", "z", "x"]
    assert [p.candidate.workload for p in placement.ordered(placed, DrainOrder.SMALLEST)] == ["x", "z", "y"]


def test_as_many_move_at_once_as_there_are_cpus_here_unless_asked_never_more_than_moves():
    assert placement.parallel(None, 2, 6)[0] == 2
    assert placement.parallel(None, 8, 3)[0] == 3
    assert placement.parallel(None, 2, 0)[0] == 1
    assert placement.parallel(4, 2, 6) == (4, "4: --parallel")


def test_a_moves_options_cross_to_its_process_and_back_whole():
    o = Options(mode=Mode.POSTCOPY, max_downtime=0.5, max_bandwidth=50 * MIB, move_addresses=("198.18.0.100/24",),
                agent_command=("livemig", "-x"), bandwidth_share="/var/lib/livemig/drain-1/bandwidth-share")
    assert Options.from_dict(o.to_dict()) == o
    assert Options.from_dict(Options().to_dict()) == Options()


def test_load_averages_a_moment_apart_do_not_send_everything_to_one_target():
    # two idle targets, their loads read a moment apart: the workloads spread by memory
    cands = [Candidate("runc", n, m * MIB, 0.01, {"b": plan("b", m * MIB, 8000 * MIB, cpus=2, load=1.2549),
                                                  "c": plan("c", m * MIB, 8000 * MIB, cpus=2, load=1.2773)})
             for n, m in (("w1024", 1024), ("w512", 512), ("w256", 256), ("w64", 64))]
    placed, _ = placement.place(cands)
    assert {p.candidate.workload: p.target for p in placed} == {"w1024": "b", "w512": "c", "w256": "c", "w64": "c"}
