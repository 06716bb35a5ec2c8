"""The Python API as failover scripts use it: examples/failover.py, run for real in the lab."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_containers import Counter

pytestmark = pytest.mark.lab

EXAMPLE = "/opt/livemig/examples/failover.py"
NOBODY = "198.18.0.99"    # in the lab's subnet, and no host answers there


def evacuate(lab, *args: str):
    res = lab.run("a", ["python3", EXAMPLE, *args], check=False, timeout=600)
    return res.returncode, [json.loads(line) for line in res.stdout.decode().splitlines()], res.stderr.decode()


def test_failover_example_passes_over_a_dead_host_and_moves_a_container_and_a_process(lab):
    work = lab.start_workload("a", mib=32, pid=4460)
    ctr = Counter(lab, "a", "runc", "evac1")
    time.sleep(0.5)
    before = work.query("a")["counter"]
    code, lines, err = evacuate(lab, "--to", NOBODY, "--to", "b", "evac1", str(work.pid))
    assert code == 0, err
    assert [(x["workload"], x["target"], x["moved"]) for x in lines] == [
        ("evac1", NOBODY, False), ("evac1", "b", True), ("4460", NOBODY, False), ("4460", "b", True)]
    assert lines[0]["exit_code"] == 4 and lines[0]["phase"] == "preflight"
    assert work.query("b", wait=10)["counter"] > before and ctr.status("b") == "running"
    lab.run("b", ["kill", str(work.pid)])
    ctr.remove("b")


def test_failover_example_reports_what_no_target_took(lab):
    code, lines, _ = evacuate(lab, "--to", "b", "no-such-container")
    assert code == 3 and len(lines) == 1 and not lines[0]["moved"]
    assert "no container 'no-such-container'" in lines[0]["error"]
