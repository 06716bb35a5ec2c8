"""A file only the source has (issue 35): CRIU's restore opens a tree's files by their path,
so one the target lacks failed the move after the freeze and the dump (exit code 6, rolled
back). The preflight asks the target for each and refuses the move, naming them, before
anything is frozen."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.lab

LOG = "/var/log/livemig-test-only-on-a.log"


def test_a_tree_whose_log_only_the_source_has_is_refused_before_the_freeze(lab):
    lab.run("b", ["rm", "-f", LOG])
    out = lab.text("a", ["sh", "-c", f"setsid sh -c 'exec sleep 600' >> {LOG} 2>&1 < /dev/null & echo $!"])
    pid = int(out.strip())
    try:
        res = lab.run("a", ["livemig", "move", "--json", "--pid", str(pid), "b"], check=False, timeout=300)
        failed = json.loads(res.stdout)
        assert res.returncode == 3 and failed["failed_phase"] == "preflight", failed
        assert LOG in failed["error"] and "lacks" in failed["error"], failed
        # nothing was frozen or dumped: it sleeps on, and neither host keeps anything of the move
        assert lab.text("a", ["ps", "-o", "stat=", "-p", str(pid)]).strip().startswith("S")
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
        # made on b (a log opened to append: CRIU checks no size), the plan passes
        lab.run("b", ["touch", LOG])
        res = lab.run("a", ["livemig", "move", "--json", "--dry-run", "--pid", str(pid), "b"], check=False)
        assert res.returncode == 0, res.stderr.decode()
    finally:
        lab.run("a", ["kill", str(pid)], check=False)
        for h in ("a", "b"):
            lab.run(h, ["rm", "-f", LOG], check=False)
