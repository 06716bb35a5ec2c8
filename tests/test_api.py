"""The Python API as failover scripts use it: examples/failover.py, run for real in the lab."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.held import go_on, wait_stopped
from tests.test_containers import Counter
from tests.test_move import assert_still_on_source

pytestmark = pytest.mark.lab

EXAMPLE = "/opt/livemig/examples/failover.py"
API_MOVE = "/opt/livemig/tests/workloads/api_move.py"
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


def test_a_script_killed_with_sigterm_mid_move_gets_the_rollback_the_cli_gives(lab):
    # The script leaves SIGTERM to its default (death, which would leave the move half done:
    # the workload frozen); livemig.migrate rolls it back instead and raises Terminated.
    # Held where the images are on b, not restored: the signal comes there, however fast the machine.
    work = lab.start_workload("a", mib=128, dirty_mibps=4, pid=4802, port=7882)
    before = work.query("a")
    mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=restore", "python3", API_MOVE, str(work.pid), "b", "stopcopy"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stopped = wait_stopped(lab, mover, "restore", named=API_MOVE)
        lab.run("a", ["kill", "-TERM", *stopped])
        go_on(lab, mover, stopped)
        out, err = mover.communicate(timeout=300)
    finally:
        if mover.poll() is None:
            lab.run("a", ["pkill", "-KILL", "-f", API_MOVE], check=False)
    assert mover.returncode == 0, err.decode()
    ended = json.loads(out)
    assert ended == {"error": "Terminated", "exit_code": 143, "outcome": "rolled back", "phase": "restore"}, ended
    assert_still_on_source(lab, work, before)
    lab.run("a", ["kill", str(work.pid)])


def test_check_recover_and_pending_from_python(lab):
    code = ("import asyncio, dataclasses, json, livemig\n"
            "async def main():\n"
            "    found = await livemig.check('root@b')\n"
            "    return {'ok': found.ok, 'mode': found.mode, 'checks': len(found.checks),\n"
            "            'pending': await livemig.pending(), 'settled': await livemig.recover()}\n"
            "print(json.dumps(asyncio.run(main())))\n")
    res = lab.run("a", ["python3", "-c", code], check=False)
    assert res.returncode == 0, res.stderr.decode()
    got = json.loads(res.stdout)
    assert (got["ok"], got["mode"], got["pending"], got["settled"]) == (True, "precopy", [], []), got
    assert got["checks"] >= 5
