"""The dry run's estimate: pure arithmetic over the measured link and the memory size."""

import json

from livemig.report import Plan
from livemig.source import policy

MIB = 2**20


def test_stop_and_copy_expects_the_whole_copy_as_downtime():
    e = policy.estimate("stopcopy", 512 * MIB, 256 * MIB)
    assert e.copy_seconds == e.downtime == 2.0 and e.rounds == "none"


def test_post_copy_expects_no_copy_in_the_downtime_and_says_how_long_the_pages_follow():
    e = policy.estimate("postcopy", 512 * MIB, 128 * MIB)
    assert e.downtime == 0.0 and e.copy_seconds == 4.0 and "4.0 s" in e.note


def test_pre_copy_aims_at_the_downtime_limit_within_the_round_limit():
    e = policy.estimate("hybrid", 64 * MIB, 64 * MIB, policy.Limits(max_downtime=0.5, max_rounds=3))
    assert e.downtime == 0.5 and "1 to 3" in e.rounds and "500 ms" in e.note and "lazy" in e.note


def test_a_link_that_moved_nothing_gives_no_finite_estimate():
    assert policy.estimate("stopcopy", MIB, 0.0).copy_seconds == float("inf")


def test_the_plan_reads_as_one_screen_and_as_json():
    p = Plan(workload="4242", runtime="process", source="a", target="b", mode="stopcopy",
             mode_reason="no soft-dirty", processes=2, memory_bytes=512 * MIB, link_bytes_per_s=256 * MIB,
             copy_seconds=2.0, expected_downtime_seconds=2.0, expected_rounds="none", note="frozen",
             warnings=["THP"])
    text = p.summary()
    assert text.startswith("would move: PID 4242 a -> b, mode stopcopy") and "about 2000 ms" in text
    assert "warning: THP" in text
    assert json.loads(p.to_json())["expected_downtime_seconds"] == 2.0
