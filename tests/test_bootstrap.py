"""The agent comes along (issue 28; livemig/source/bootstrap.py): a target with Python, its
libraries and CRIU but no livemig takes a move, the coordinator's own livemig brought over
ssh into a root-only cache, once; with --no-bootstrap, the move stops in its preflight."""

from __future__ import annotations

import json

import pytest

from livemig.source import bootstrap

pytestmark = pytest.mark.lab


def test_a_host_without_livemig_takes_a_move_from_one_that_brings_it(lab, b_without_livemig):
    work = lab.start_workload("a", mib=64, dirty_mibps=4, pid=4804, port=7884)
    other = None
    try:
        before = work.query("a")
        res = lab.run("a", ["livemig", "move", "--no-bootstrap", "--pid", str(work.pid), "b"], check=False)
        assert res.returncode == 3 and b"cannot start the livemig agent" in res.stderr, res.stderr
        assert work.query("a")["counter"] > before["counter"]

        res = lab.run("a", ["livemig", "move", "--json", "--pid", str(work.pid), "b"], check=False, timeout=600)
        assert res.returncode == 0, res.stderr.decode()
        assert json.loads(res.stdout)["outcome"] == "moved"
        after = work.query("b", wait=10)
        assert after["host"] == "b" and after["counter"] > before["counter"]
        assert work.query("b", "verify")["bad_pages"] == 0
        assert lab.run("a", ["kill", "-0", str(work.pid)], check=False).returncode != 0

        # brought once, root's alone: the next move finds it there and brings nothing
        h = bootstrap.packed()[0]
        home = f"{bootstrap.AGENTS}/{h}"
        assert lab.text("b", ["stat", "-c", "%U %a", bootstrap.AGENTS, home]).split() == ["root", "700", "root", "700"]
        assert lab.text("b", ["ls", "-A", bootstrap.AGENTS]).split() == [h]
        inode = lab.text("b", ["stat", "-c", "%i", home])
        other = lab.start_workload("a", mib=16, pid=4805, port=7885)
        res = lab.run("a", ["livemig", "move", "--json", "--pid", str(other.pid), "b"], check=False, timeout=600)
        assert res.returncode == 0, res.stderr.decode()
        assert lab.text("b", ["stat", "-c", "%i", home]) == inode
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
    finally:
        for w in (work, other):
            if w is not None:
                for h in ("a", "b"):
                    lab.run(h, ["kill", str(w.pid)], check=False)
