"""Files only the source has (issue 35): CRIU's restore opens a tree's files by their path, so
one the target lacked failed the move after the freeze and the dump (exit code 6, rolled
back). The preflight asks the target for each; those it lacks are carried while the tree is
frozen, up to --carry-files-max together (carried.py), and more refuse the move before
anything is frozen, naming them. A move undone takes what it carried away again."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.held import end_if_held, go_on, wait_stopped

pytestmark = pytest.mark.lab

LOG = "/var/log/livemig-test-only-on-a/app.log"
# a line a tick, appended: the log is what the tree's state is made of here
WRITER = ("import sys, time\nf = open(sys.argv[1], 'a')\ni = 0\n"
          "while True:\n    f.write(f'{i}\\n'); f.flush(); i += 1; time.sleep(0.02)\n")


@pytest.fixture
def writer(lab):
    for h in ("a", "b"):
        lab.run(h, ["rm", "-rf", "/var/log/livemig-test-only-on-a"])
    lab.run("a", ["mkdir", "-p", "/var/log/livemig-test-only-on-a"])
    # a PID of its own, free on b too (a tree restores onto its own PIDs): the next one after 4820
    start = (f"echo 4820 > /proc/sys/kernel/ns_last_pid; setsid python3 -c \"$0\" {LOG} < /dev/null > /dev/null "
             "2>&1 & echo $!")
    out = lab.text("a", ["sh", "-c", start, WRITER])
    pid = int(out.strip())
    lab.run("a", ["sh", "-c", f"while [ ! -s {LOG} ]; do sleep 0.05; done"])
    yield pid
    for h in ("a", "b"):
        lab.run(h, ["kill", str(pid)], check=False)
        lab.run(h, ["rm", "-rf", "/var/log/livemig-test-only-on-a"], check=False)


def _counted(lab, host: str) -> list[int]:
    return [int(x) for x in lab.text(host, ["cat", LOG]).split()]


def test_a_tree_s_log_only_the_source_has_is_carried_and_written_on_where_it_stopped(lab, writer):
    res = lab.run("a", ["livemig", "move", "--json", "--pid", str(writer), "b"], check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["carried_files"] == [LOG], report["carried_files"]     # its directory made on the way
    assert report["carried_bytes"] > 0
    lab.run("b", ["sh", "-c", f"n=$(wc -l < {LOG}); sleep 0.3; [ $(wc -l < {LOG}) -gt $n ]"])   # it writes on, on b
    lines = _counted(lab, "b")
    assert lines == list(range(len(lines))), lines[-20:]     # every line once, in order: none lost, none twice
    assert lab.run("a", ["kill", "-0", str(writer)], check=False).returncode != 0
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


def test_more_than_may_be_carried_is_refused_before_the_freeze_naming_it(lab, writer):
    res = lab.run("a", ["livemig", "move", "--json", "--carry-files-max", "16", "--pid", str(writer), "b"],
                  check=False, timeout=300)
    failed = json.loads(res.stdout)
    assert res.returncode == 3 and failed["failed_phase"] == "preflight", failed
    # (a move's report: its error says the hint too, as the line on stderr does)
    assert LOG in failed["error"] and "lacks" in failed["error"] and "--carry-files-max" in failed["error"], failed
    # nothing was frozen: it writes on here; nothing of the move is left on either host
    lab.run("a", ["sh", "-c", f"n=$(wc -l < {LOG}); sleep 0.3; [ $(wc -l < {LOG}) -gt $n ]"])
    assert lab.run("b", ["test", "-e", LOG], check=False).returncode == 1
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


def test_a_move_undone_takes_what_it_carried_away_again(lab, writer):
    # held once the copy is restored on b, its files placed there, the source's not given up
    mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=restored", "livemig", "move", "--mode", "stopcopy",
                            "--pid", str(writer), "b"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    try:
        stopped = wait_stopped(lab, mover, "restored")
        assert lab.run("b", ["test", "-s", LOG], check=False).returncode == 0     # placed
        lab.run("a", ["kill", "-INT", *stopped])
        go_on(lab, mover, stopped)
        _, err = mover.communicate(timeout=300)
    finally:
        end_if_held(lab, mover)
    assert mover.returncode == 130, err.decode()
    assert lab.run("b", ["test", "-e", "/var/log/livemig-test-only-on-a"], check=False).returncode == 1
    lab.run("a", ["sh", "-c", f"n=$(wc -l < {LOG}); sleep 0.3; [ $(wc -l < {LOG}) -gt $n ]"])    # on a, on
    lines = _counted(lab, "a")
    assert lines == list(range(len(lines)))
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


SIZED = "/var/lib/livemig-test-sized/data.bin"
READER = "import sys, time\nf = open(sys.argv[1], 'rb')\nwhile True:\n    time.sleep(0.05)\n"


def test_a_file_the_target_has_at_another_size_is_refused_before_the_freeze_naming_it(lab):
    # CRIU's restore checks the size of each file it opens again: it failed after the freeze
    for h, size in (("a", 100), ("b", 50)):
        lab.run(h, ["sh", "-c", f"mkdir -p {SIZED.rsplit('/', 1)[0]} && head -c {size} /dev/zero > {SIZED}"])
    start = (f"echo 4830 > /proc/sys/kernel/ns_last_pid; setsid python3 -c \"$0\" {SIZED} < /dev/null > /dev/null "
             "2>&1 & echo $!")
    pid = int(lab.text("a", ["sh", "-c", start, READER]).strip())
    try:
        lab.run("a", ["sh", "-c", f"until ls -l /proc/{pid}/fd | grep -q {SIZED}; do sleep 0.05; done"], timeout=30)
        res = lab.run("a", ["livemig", "move", "--json", "--pid", str(pid), "b"], check=False, timeout=300)
        failed = json.loads(res.stdout)
        assert res.returncode == 3 and failed["failed_phase"] == "preflight", failed
        assert f"{SIZED}: 100 bytes here, 50 there" in failed["error"], failed["error"]
        assert lab.run("a", ["kill", "-0", str(pid)], check=False).returncode == 0      # never frozen for it
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
        # the same file on both: it moves
        lab.run("b", ["sh", "-c", f"head -c 100 /dev/zero > {SIZED}"])
        res = lab.run("a", ["livemig", "move", "--json", "--pid", str(pid), "b"], check=False, timeout=300)
        assert res.returncode == 0, res.stderr.decode()
        assert lab.run("b", ["kill", "-0", str(pid)], check=False).returncode == 0
    finally:
        for h in ("a", "b"):
            lab.run(h, ["kill", "-KILL", str(pid)], check=False)
            lab.run(h, ["rm", "-rf", SIZED.rsplit("/", 1)[0]], check=False)
