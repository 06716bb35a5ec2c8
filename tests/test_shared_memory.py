"""Shared memory in the namespaced lab: the downtime it costs, told or promised before the
freeze (issue 33).

CRIU writes a tree's shared memory (an anonymous shared mapping here: memcounter --shared)
into image files as it dumps, in every mode: none of pre-copy or post-copy applies to it, so
it crosses, and is read back, while the workload is frozen. The move counts it before the
freeze (source/downtime.py): a --max-downtime it would break is refused then, the workload
running on where it was, its clients none the wiser; with none promised, the move goes and
says what the downtime will be. That the estimate is over the promise holds by construction,
not by the machine's speed: the memory is sized so that at the rates CRIU is credited with
(options.RATES) its writing and reading alone take twice the promise (or the aim), whatever
the link."""

from __future__ import annotations

import json
import math

import pytest

from livemig.options import RATES
from tests.clients import Client
from tests.test_move import leftovers

pytestmark = pytest.mark.lab

MODES = {"auto": (), "postcopy": ("--mode", "postcopy"), "stopcopy": ("--mode", "stopcopy")}


def mib_for(seconds: float) -> int:
    """MiB of shared memory whose writing and reading by CRIU alone take twice seconds."""
    per_mib = 2**20 * (1 / RATES.criu_writes_images + 1 / RATES.criu_reads_images)
    return max(32, math.ceil(2 * seconds / per_mib))


@pytest.mark.parametrize("mode", MODES)
def test_a_promised_downtime_that_shared_memory_would_break_is_refused_before_the_freeze(lab, mode):
    i = list(MODES).index(mode)
    mib = mib_for(0.5)
    work = lab.start_workload("a", mib=mib, pid=5871 + i, port=7871 + i, shared=True)
    try:
        with Client(lab, work.port) as client:
            res = lab.run("a", ["livemig", "move", "--json", "--pid", str(work.pid), "--max-downtime", "0.5",
                                *MODES[mode], "b"], check=False, timeout=600)
            client.until_answered_by("a")           # it runs on there, and answers
        assert res.returncode == 10, res.stderr.decode()
        said = res.stderr.decode()
        assert "over --max-downtime 500 ms" in said and f"{mib} MiB of shared memory" in said, said
        report = json.loads(res.stdout)
        assert report["outcome"] == "failed" and report["failed_phase"] == "preflight"
        assert report["shared_memory_bytes"] >= mib << 20 and report["expected_downtime_seconds"] > 0.5
        assert report["rounds"] == [] and report["downtime_seconds"] == 0    # nothing crossed, nothing froze
        # the client: every answer from a, none taken back, not one from b
        assert not client.errors and not client.taken_back(), client.said()
        assert {a.host for a in client.answers} == {"a"}, client.said()
        assert work.query("a", "verify")["bad_pages"] == 0
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    finally:
        lab.run("a", ["kill", "-9", str(work.pid)], check=False)


@pytest.mark.parametrize("mode", MODES)
def test_shared_memory_moves_intact_and_the_downtime_it_costs_is_told_before_the_freeze(lab, mode):
    i = list(MODES).index(mode)
    mib = mib_for(0.3)
    work = lab.start_workload("a", mib=mib, dirty_mibps=2, pid=5881 + i, port=7881 + i, shared=True)
    before = work.query("a")
    with Client(lab, work.port) as client:
        res = lab.run("a", ["livemig", "move", "--json", "--pid", str(work.pid), *MODES[mode], "b"],
                      check=False, timeout=600)
        client.until_answered_by("b")
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["outcome"] == "moved" and report["shared_memory_bytes"] >= mib << 20
    # through image files: more than pre-copy's 300 ms aim, by the rates alone; told, not refused
    assert report["expected_downtime_seconds"] > 0.3
    assert [w for w in report["warnings"] if w.startswith("the downtime will be about ")
            and f"{mib} MiB of shared memory goes through image files" in w], report["warnings"]
    after = work.query("b", wait=10)
    assert after["host"] == "b" and after["counter"] > before["counter"]
    assert work.query("b", "verify")["bad_pages"] == 0
    assert lab.run("a", ["kill", "-0", str(work.pid)], check=False).returncode != 0   # one copy only
    assert not client.errors and not client.taken_back(), client.said()
    assert client.answers[-1].host == "b"
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("b", ["kill", "-9", str(work.pid)], check=False)
