"""A trial restore before the freeze (issue 35, livemig/trial.py): the tree's images without its
pages, restored on the target in namespaces of their own, stopped, and thrown away. What CRIU's
restore trips on there, which the preflight cannot name (a directory, a watched path or a FIFO
the tree holds open that only the source has), refuses the move with CRIU's reason before
anything is frozen for it; without the trial the same move fails only after the freeze. A trial
that passes leaves nothing on the target, its freeze is reported apart from the downtime, and
--dry-run always takes it."""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from tests.test_move import assert_moved_intact

pytestmark = pytest.mark.lab

ONLY_A = "/tmp/livemig-trial-only-on-a"     # (tmpfs: CRIU finds a watched path there by its handle)
ON_OVERLAY = "/var/tmp/livemig-trial-only-on-a"   # (the root's overlay: it cannot)
# what the tree holds open, by kind: a directory, an inotify watch on one, a FIFO
HOLDER = """import ctypes, os, sys, time
os.makedirs(sys.argv[2] + "/sub", exist_ok=True)
if sys.argv[1] == "dir":
    fd = os.open(sys.argv[2] + "/sub", os.O_RDONLY | os.O_DIRECTORY)
elif sys.argv[1] == "inotify":
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    assert libc.inotify_add_watch(fd, (sys.argv[2] + "/sub").encode(), 0x100) > 0
else:
    os.mkfifo(sys.argv[2] + "/fifo")
    fd = os.open(sys.argv[2] + "/fifo", os.O_RDWR)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""
CAUGHT = {"dir": "Can't open file tmp/livemig-trial-only-on-a/sub",
          "inotify": "Unable to open /tmp/livemig-trial-only-on-a/sub",
          "fifo": "Can't open fake fifo"}


@pytest.fixture
def holder(lab, request):
    """A tree holding open, by request.param's kind, what only a has (in ONLY_A, or the directory
    given third); its PID (free on b)."""
    kind, pid, where = (*request.param, ONLY_A)[:3]
    for h in ("a", "b"):
        lab.run(h, ["rm", "-rf", where])
    start = (f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid; setsid python3 -c \"$0\" {kind} {where} "
             f"< /dev/null > {where}.out 2>&1 & echo $!")
    got = int(lab.text("a", ["sh", "-c", start, HOLDER]).strip())
    assert got == pid, got
    lab.run("a", ["sh", "-c", f"until grep -q ready {where}.out; do sleep 0.05; done"], timeout=30)
    yield kind, pid
    lab.run("a", ["kill", str(pid)], check=False)
    for h in ("a", "b"):
        lab.run(h, ["rm", "-rf", where, f"{where}.out"], check=False)


def trial_leftovers(lab, host: str = "b") -> tuple[list[str], list[str]]:
    """The trial's network namespaces and cgroups still on host: none, once it is over."""
    netns = [x for x in lab.text(host, ["ip", "netns", "list"], check=False).split() if "livemig-trial" in x]
    cgroups = lab.text(host, ["find", "/sys/fs/cgroup", "-maxdepth", "2", "-name", "livemig-trial*"],
                       check=False).split()
    return netns, cgroups


def untouched(lab, pid: int) -> None:
    """Still on a, never left stopped; not on b; nothing of the move or the trial left anywhere."""
    state = lab.text("a", ["sh", "-c", f"cut -d' ' -f3 /proc/{pid}/stat"]).strip()
    assert state in ("S", "R"), state
    assert lab.run("b", ["kill", "-0", str(pid)], check=False).returncode != 0
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
    assert trial_leftovers(lab) == ([], [])


@pytest.mark.parametrize("holder", [("dir", 5101), ("inotify", 5102), ("fifo", 5103)], indirect=True,
                         ids=["directory", "inotify watch", "fifo"])
def test_what_only_the_source_holds_open_fails_the_trial_before_anything_is_frozen_for_the_move(lab, holder):
    kind, pid = holder
    for extra in (["--trial"], ["--dry-run"]):      # a dry run always tries
        res = lab.run("a", ["livemig", "move", "--json", *extra, "--pid", str(pid), "b"], check=False, timeout=300)
        failed = json.loads(res.stdout)
        assert res.returncode == 3 and failed["failed_phase"] == "trial restore", (extra, failed)
        assert failed.get("host", failed.get("target")) == "b" and CAUGHT[kind] in failed["error"], failed["error"]
        assert "--trial" not in extra or failed["trial"].startswith("failed: "), failed
        untouched(lab, pid)


@pytest.mark.parametrize("holder", [("inotify", 5105, ON_OVERLAY)], indirect=True, ids=["inotify on overlayfs"])
def test_what_criu_cannot_even_dump_fails_the_trial_s_dump_before_the_move_freezes_it(lab, holder):
    """A watch on overlayfs, which CRIU cannot name by a handle: its dump fails, and the move's
    final dump would, after the freeze."""
    _, pid = holder
    res = lab.run("a", ["livemig", "move", "--json", "--trial", "--pid", str(pid), "b"], check=False, timeout=300)
    failed = json.loads(res.stdout)
    assert res.returncode == 5 and failed["failed_phase"] == "trial restore", failed
    assert failed["error"].startswith("trial restore: CRIU cannot checkpoint the workload: fsnotify"), failed["error"]
    untouched(lab, pid)


@pytest.mark.parametrize("holder", [("dir", 5111)], indirect=True, ids=["directory"])
def test_without_the_trial_the_same_move_fails_only_after_the_freeze(lab, holder):
    """The premise: the preflight lets it through, and CRIU's restore fails it after the dump."""
    _, pid = holder
    res = lab.run("a", ["livemig", "move", "--json", "--mode", "stopcopy", "--pid", str(pid), "b"],
                  check=False, timeout=300)
    failed = json.loads(res.stdout)
    assert res.returncode == 6 and failed["failed_phase"] == "restore" and failed["outcome"] == "rolled back", failed
    assert CAUGHT["dir"] in json.dumps(failed), failed
    untouched(lab, pid)


def test_a_trial_that_passes_lets_the_move_go_on_its_freeze_reported_apart_from_the_downtime(lab):
    work = lab.start_workload("a", mib=256, dirty_mibps=8, pid=5121)
    before = work.query("a")
    res = lab.run("a", ["livemig", "move", "--json", "--trial", "--pid", str(work.pid), "b"], check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["trial"] == "passed", report["trial"]
    assert 0 < report["trial_freeze_seconds"] < report["total_seconds"], report
    assert report["trial_restore_seconds"] > 0
    assert_moved_intact(lab, work, before, report)
    assert trial_leftovers(lab) == ([], [])


LOG = f"{ONLY_A}/app.log"
SOCKET = "/run/livemig-test-trial.sock"
# appends a line a tick to a log only a has (carried), and listens on a Unix socket at a path
SERVER = """import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[2]); s.listen()
f = open(sys.argv[1], "a"); i = 0
while True:
    f.write(f"{i}\\n"); f.flush(); i += 1; time.sleep(0.02)
"""


def test_a_dry_run_tries_with_what_the_move_would_carry_and_leaves_nothing_of_it_on_the_target(lab):
    for h in ("a", "b"):
        lab.run(h, ["rm", "-rf", ONLY_A, SOCKET])
    lab.run("a", ["mkdir", "-p", ONLY_A])
    start = (f"echo 5130 > /proc/sys/kernel/ns_last_pid; setsid python3 -c \"$0\" {LOG} {SOCKET} "
             "< /dev/null > /dev/null 2>&1 & echo $!")
    pid = int(lab.text("a", ["sh", "-c", start, SERVER]).strip())
    try:
        lab.run("a", ["sh", "-c", f"until [ -s {LOG} ] && [ -S {SOCKET} ]; do sleep 0.05; done"], timeout=30)
        res = lab.run("a", ["livemig", "move", "--json", "--dry-run", "--pid", str(pid), "b"], check=False, timeout=300)
        assert res.returncode == 0, res.stderr.decode()
        plan = json.loads(res.stdout)
        assert plan["trial"] == "passed" and plan["trial_freeze_seconds"] > 0, plan
        # the log was placed for the trial and taken away, the socket the trial bound removed
        assert lab.run("b", ["test", "-e", ONLY_A], check=False).returncode == 1
        assert lab.run("b", ["test", "-e", SOCKET], check=False).returncode == 1
        untouched(lab, pid)
        res = lab.run("a", ["livemig", "move", "--json", "--trial", "--pid", str(pid), "b"], check=False, timeout=300)
        assert res.returncode == 0, res.stderr.decode()
        report = json.loads(res.stdout)
        assert report["trial"] == "passed" and report["carried_files"] == [LOG], report
        lab.run("b", ["sh", "-c", f"n=$(wc -l < {LOG}); sleep 0.3; [ $(wc -l < {LOG}) -gt $n ] && [ -S {SOCKET} ]"])
    finally:
        for h in ("a", "b"):
            lab.run(h, ["kill", str(pid)], check=False)
            lab.run(h, ["rm", "-rf", ONLY_A, SOCKET], check=False)
    assert trial_leftovers(lab) == ([], [])


CONTAINER_TOOL = "/opt/livemig/tests/workloads/container.py"


@contextlib.contextmanager
def container(lab, runtime: str, name: str):
    """A busybox container counting in memory under runtime on a, planned with a dry run to b:
    (its bundle, the plan); it goes, with its bundle, from both hosts after."""
    bundle = f"/var/lib/ctr/{name}"
    lab.run("a", ["python3", CONTAINER_TOOL, "start", "--runtime", runtime, "--name", name, "--bundle", bundle])
    try:
        res = lab.run("a", ["livemig", "move", "--json", "--dry-run", name, "b"], check=False, timeout=300)
        assert res.returncode == 0, res.stderr.decode()
        yield bundle, json.loads(res.stdout)
    finally:
        for h in ("a", "b"):
            lab.run(h, [runtime, "delete", "--force", name], check=False)
            lab.run(h, ["rm", "-rf", bundle], check=False)


def test_a_runc_container_is_tried_under_runc_and_nothing_of_the_trial_is_left(lab):
    """Its bundle goes first (as its pre-copy sends it), runc restores the trial's images under a
    name of the trial's, stopped, and deletes it; a dry run leaves not even the bundle on b."""
    with container(lab, "runc", "trialctr") as (bundle, plan):
        assert plan["trial"] == "passed" and plan["trial_freeze_seconds"] > 0, plan
        assert lab.text("b", ["runc", "list", "-q"], check=False).split() == []
        assert lab.run("b", ["test", "-e", bundle], check=False).returncode == 1
        assert json.loads(lab.text("a", ["runc", "state", "trialctr"]))["status"] == "running"
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])} and trial_leftovers(lab) == ([], [])
        before = int(lab.text("a", ["python3", CONTAINER_TOOL, "count", "--bundle", bundle]))
        res = lab.run("a", ["livemig", "move", "--json", "--trial", "trialctr", "b"], check=False, timeout=600)
        assert res.returncode == 0, res.stderr.decode()
        report = json.loads(res.stdout)
        assert report["trial"] == "passed" and report["outcome"] == "moved", report
        assert lab.text("b", ["runc", "list", "-q"]).split() == ["trialctr"]    # the move's, not the trial's
        time.sleep(0.5)
        assert int(lab.text("b", ["python3", CONTAINER_TOOL, "count", "--bundle", bundle])) > before
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])} and trial_leftovers(lab) == ([], [])


def test_a_crun_container_is_not_tried_said_by_its_dry_run_and_refused_with_trial(lab):
    with container(lab, "crun", "trialcrun") as (_, plan):
        assert plan["trial"] == "not tried: crun has no lazy dump: a trial's images would hold every page", plan
        assert plan["trial_freeze_seconds"] is None
        res = lab.run("a", ["livemig", "move", "--json", "--trial", "trialcrun", "b"], check=False, timeout=300)
        failed = json.loads(res.stdout)
        assert res.returncode == 3 and failed["failed_phase"] == "trial restore", failed
        assert "--trial: crun has no lazy dump" in failed["error"], failed
        assert json.loads(lab.text("a", ["crun", "state", "trialcrun"]))["status"] == "running"
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


def test_much_shared_memory_is_tried_only_when_asked_and_its_pages_never_cross(lab):
    """CRIU's dump writes a tree's shared memory into the images while it is frozen, lazy or not:
    over 64 MiB a dry run does not try unless asked; asked, its pages are dropped before the
    images cross, and the move that follows still brings every page."""
    work = lab.start_workload("a", mib=128, pid=5141, port=7941, shared=True)
    res = lab.run("a", ["livemig", "move", "--json", "--dry-run", "--pid", str(work.pid), "b"], timeout=300)
    plan = json.loads(res.stdout)
    assert plan["trial"].startswith("not tried: CRIU's dump would write the workload's 128 MiB of shared memory"), plan
    assert plan["trial_freeze_seconds"] is None
    before = work.query("a")
    res = lab.run("a", ["livemig", "move", "--json", "--trial", "--pid", str(work.pid), "b"], check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["trial"] == "passed" and report["trial_freeze_seconds"] > 0, report
    assert_moved_intact(lab, work, before, report)
    assert trial_leftovers(lab) == ([], [])
