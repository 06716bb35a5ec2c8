"""What the target holds or lacks that would make CRIU's restore fail after the freeze, refused
in the preflight instead, before anything is frozen (issue 35): a port the workload holds that a
process on the target holds too (said with who holds it), and a container's volume whose source
only the source host has. Each move goes once the target is put right: the checks refuse only
what the restore would have failed on."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.lab

HOLDER = ("import socket, sys, time\n"
          "s = socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
          "import os; print(os.getpid(), flush=True); time.sleep(600)\n")


def _refused(lab, argv: list[str]) -> dict:
    res = lab.run("a", ["livemig", "move", "--json", *argv, "b"], check=False, timeout=600)
    report = json.loads(res.stdout)
    assert res.returncode == 3 and report["outcome"] == "failed", (res.returncode, report)
    assert report["downtime_seconds"] == 0, report            # never frozen
    return report


def test_a_port_the_target_holds_refuses_the_move_before_the_freeze_saying_who_holds_it(lab):
    work = lab.start_workload("a", mib=16, pid=4821, port=7921)
    holder, pid = lab.popen("b", ["python3", "-c", HOLDER, "7921"], stdout=-1), 0
    try:
        pid = int(holder.stdout.readline())        # once it listens
        before, t = work.query("a"), time.time()
        report = _refused(lab, ["--pid", str(work.pid)])
        assert f"7921/tcp on 0.0.0.0 held by python3 (PID {pid})" in report["error"], report["error"]
        # the dry run says the same, and the workload ran on through both, untouched
        res = lab.run("a", ["livemig", "move", "--dry-run", "--pid", str(work.pid), "b"], check=False)
        assert res.returncode == 3 and b"7921/tcp on 0.0.0.0 held by python3" in res.stderr, res.stderr
        after = work.query("a")
        assert after["counter"] > before["counter"] and work.stall_between("a", t) < 0.5
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
    finally:
        if pid:      # (the popen is nsenter's, outside b's PID namespace: killing it leaves the holder)
            lab.run("b", ["kill", str(pid)], check=False)
        holder.wait()
    # the port free again, the same move goes
    res = lab.run("a", ["livemig", "move", "--json", "--pid", str(work.pid), "b"], check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    assert work.query("b", wait=10)["host"] == "b" and work.query("b", "verify")["bad_pages"] == 0
    lab.run("b", ["kill", str(work.pid)])


def test_a_container_volume_only_the_source_has_refuses_the_move_before_the_freeze(lab):
    volume = "/srv/only-on-a"
    lab.run("a", ["mkdir", "-p", volume])
    work = lab.start_container_workload("a", mib=16, port=7922, container="vol1", binds=(volume,))
    try:
        before, t = work.query("a"), time.time()
        report = _refused(lab, [work.container])
        assert f"the container binds in {volume}, which the target lacks" in report["error"], report["error"]
        after = work.query("a")
        assert after["counter"] > before["counter"] and work.stall_between("a", t) < 0.5
        assert lab.text("a", ["runc", "state", work.container]).count('"running"') == 1
        # made on b, the move goes, the volume bound in there
        lab.run("b", ["mkdir", "-p", volume])
        res = lab.run("a", ["livemig", "move", "--json", work.container, "b"], check=False, timeout=600)
        assert res.returncode == 0, res.stderr.decode()
        assert work.query("b", wait=10)["host"] == "b" and work.query("b", "verify")["bad_pages"] == 0
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
    finally:
        for h in ("a", "b"):
            lab.run(h, ["runc", "delete", "--force", work.container], check=False)
            lab.run(h, ["rm", "-rf", volume, work.bundle], check=False)
