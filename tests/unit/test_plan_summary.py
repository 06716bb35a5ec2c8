"""What `livemig move --dry-run` prints: the numbers, never the template."""

from livemig.report import Plan


def test_the_plan_says_how_long_the_copy_takes():
    text = Plan(workload="4242", runtime="process", source="a", target="b", mode="stopcopy", mode_reason="asked",
                processes=1, memory_bytes=1 << 30, link_bytes_per_s=1 << 29, copy_seconds=2.0,
                expected_downtime_seconds=2.0, expected_rounds="none", note="frozen").summary()
    assert "so at most 2.0 s to copy it" in text and "{" not in text
