"""The process comes out of a move as it went in, in every mode of the namespaced lab: what
plain CRIU carries from host to host, livemig carries too, and what plain CRIU cannot carry
is refused before anything is touched.

The workload (tests/workloads/states.py) is a tree in the states a move could lose: a child
it stopped, a stopped child with threads, a running child, a zombie, signals pending on the
root (on the process and on its thread), and a socket set to bind anywhere (IP_FREEBIND). It
says how it sees itself, from its own /proc, on whichever host it runs.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import Client
from tests.held import end_if_held, go_on, wait_stopped
from tests.lab import LabError
from tests.waiting import eventually

pytestmark = pytest.mark.lab

STATES = "/opt/livemig/tests/workloads/states.py"
CONTAINER_TOOL = "/opt/livemig/tests/workloads/container.py"
SHDPND, SIGPND = 1 << 9, 1 << 11       # SIGUSR1 pending on the process, SIGUSR2 on its thread
FREE_V4, FREE_V6 = "198.19.99.99", "fd00:198:19::99"     # addresses no lab host has
LOCKED = "/tmp/states.lock"

MODES = {"stopcopy": ("--mode", "stopcopy"), "stopcopy into image files": ("--mode", "stopcopy", "--no-fill"),
         "postcopy": ("--mode", "postcopy"), "precopy by write-protection": ("--mode", "precopy")}


@contextlib.contextmanager
def states_tree(lab, pid: int, port: int, *freebind: str, flags: tuple[str, ...] = ()) -> Iterator[None]:
    """states.py's tree on a, as PID pid, listening at each of freebind with IP_FREEBIND too
    (flags: more of states.py's own); killed on both hosts once the test is done with it."""
    with lab_tree(lab, STATES, pid, port, *(a for address in freebind for a in ("--freebind", address)), *flags):
        yield


@contextlib.contextmanager
def lab_tree(lab, workload: str, pid: int, port: int, *args: str) -> Iterator[None]:
    """A lab tree (a workload with memcounter's command line: states.py, kinds.py) on a, as
    PID pid (args: the workload's own); killed on both hosts once the test is done with it."""
    try:
        got = int(lab.text("a", ["python3", workload, "run", "--daemon", "--pid", str(pid), "--port", str(port),
                                 *args]))
        if got != pid:
            raise LabError(f"the tree started as PID {got}, not {pid}: that PID was taken on a")
        yield
    finally:
        for h in ("a", "b"):
            lab.run(h, ["pkill", "-KILL", "-f", f"{Path(workload).name} run .*--port {port}( |$)"], check=False)


def seen(lab, host: str, port: int, workload: str = STATES) -> dict:
    """How the tree sees itself, on host."""
    return json.loads(lab.text(host, ["python3", workload, "query", "--port", str(port), "--wait", "10"]))


def assert_as_it_went_in(now: dict, before: dict) -> None:
    """The tree as it saw itself before, and now: the same, but for its counter's progress
    and whether its running tasks were caught running or sleeping."""
    assert now["counter"] > before["counter"]                              # it runs on, from where it was
    assert now["root"]["state"] in "RS" and now["running"]["state"] in "RS"
    assert now["root"]["sigpnd"] & SIGPND and now["root"]["shdpnd"] & SHDPND     # still pending
    assert now["stopped"]["state"] == "T"                                  # stopped as it was
    assert now["threads"]["threads"] == ["T", "T", "T"]                    # its three threads too
    assert now["zombie"]["state"] == "Z"                                   # never reaped, still there
    assert now["memory_ok"]
    for kind in ("root", "stopped", "threads", "running", "zombie"):
        same = ("pid", "sigpnd", "shdpnd") if kind in ("root", "running") else ("pid", "state", "threads",
                                                                                   "sigpnd", "shdpnd")
        assert {k: now[kind][k] for k in same} == {k: before[kind][k] for k in same}, kind   # no signal left behind


def move(lab, src: str, pid: int, dst: str, *flags: str) -> subprocess.CompletedProcess:
    return lab.run(src, ["livemig", "move", "--pid", str(pid), "--json", *flags, dst], check=False, timeout=600)


def listening(lab, host: str) -> str:
    return lab.text(host, ["ss", "-Hltn"])


@pytest.mark.parametrize("i, flags", list(enumerate(MODES.values())), ids=list(MODES))
def test_a_tree_comes_out_of_every_mode_as_it_went_in(lab, i, flags):
    pid, port = 5010 + 20 * i, 7610 + 10 * i
    with states_tree(lab, pid, port, FREE_V6):
        before = seen(lab, "a", port)
        assert before["stopped"]["state"] == "T" and before["zombie"]["state"] == "Z"
        for src, dst in (("a", "b"), ("b", "a")):
            res = move(lab, src, pid, dst, *flags)
            assert res.returncode == 0, res.stderr.decode()
            assert json.loads(res.stdout)["outcome"] == "moved"
            now = seen(lab, dst, port)
            assert_as_it_went_in(now, before)
            # the IPv6 socket set to bind anywhere is not refused, and listens there as it did
            assert f"[{FREE_V6}]:{port + 1}" in listening(lab, dst)
            assert lab.run(src, ["kill", "-0", str(pid)], check=False).returncode != 0    # one copy only
            before = now
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


def test_an_ipv4_socket_set_to_bind_anywhere_moves_where_criu_can_bind_it(lab):
    # CRIU binds an IPv4 socket before it sets IP_FREEBIND again: on a target without the
    # address it binds only if the host lets any address be bound (net.ipv4.ip_nonlocal_bind)
    pid, port = 5110, 7710
    with states_tree(lab, pid, port, FREE_V4):
        try:
            before = seen(lab, "a", port)
            res = move(lab, "a", pid, "b")
            assert res.returncode == 3
            assert f"{FREE_V4}:{port + 1} set to bind anywhere (IP_FREEBIND)" in res.stderr.decode()
            assert "net.ipv4.ip_nonlocal_bind=1" in res.stderr.decode()
            assert seen(lab, "a", port)["counter"] > before["counter"] and lab.leftovers() == {"a": ([], []), "b": ([], [])}
            lab.run("b", ["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"])
            res = move(lab, "a", pid, "b")
            assert res.returncode == 0, res.stderr.decode()
            assert_as_it_went_in(seen(lab, "b", port), before)
            assert f"{FREE_V4}:{port + 1}" in listening(lab, "b")
        finally:
            lab.run("b", ["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=0"], check=False)


def test_a_post_copy_rolled_back_leaves_the_workload_s_own_stops_stopped(lab):
    # A lazy dump leaves the source's tree stopped by livemig until the verdict: rolled back,
    # it continues the tasks it stopped, and only those. Its connection too talks again:
    # CRIU lets go of its network lock only before it serves lazy pages, and a rollback
    # cuts that short (the lock, and the sockets' repair mode, are undone by livemig)
    pid, port = 5150, 7750
    with states_tree(lab, pid, port, flags=("--connected",)):
        mover = None
        try:
            before = seen(lab, "a", port)
            assert before["connected"] is True
            mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=restored", "livemig", "move", "--pid", str(pid),
                                    "--mode", "postcopy", "--tcp-established", "--json", "b"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            stopped = wait_stopped(lab, mover, "restored")
            lab.run("a", ["kill", "-INT", *stopped])
            go_on(lab, mover, stopped)
            out, err = mover.communicate(timeout=300)
            assert mover.returncode == 130, err.decode()
            assert b"rolled back, the workload runs on the source" in err
            assert not [w for w in json.loads(out)["warnings"] if "connections" in w]
            time.sleep(0.3)
            now = seen(lab, "a", port)
            assert_as_it_went_in(now, before)
            assert now["connected"] is True
            assert "CRIU-" not in lab.text("a", ["nft", "list", "tables"])
            assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
        finally:
            end_if_held(lab, mover)


def test_a_traced_task_and_a_shell_job_are_refused_before_anything_is_touched(lab):
    pid, port = 5170, 7770
    with states_tree(lab, pid, port):
        child = seen(lab, "a", port)["running"]["pid"]
        # a tracer of its own, as a debugger would be (PTRACE_SEIZE: the task runs on)
        program = ("import ctypes, time; libc = ctypes.CDLL(None); "
                   f"assert libc.ptrace(0x4206, {child}, 0, 0) == 0; print(1, flush=True); time.sleep(1000)")
        tracer = lab.popen("a", ["python3", "-c", program], stdout=subprocess.PIPE)
        try:
            assert tracer.stdout is not None and tracer.stdout.readline().strip() == b"1"
            res = move(lab, "a", pid, "b")
            assert res.returncode == 3
            assert f"PID {child} is traced by PID" in res.stderr.decode() and b"detach the tracer" in res.stderr
            # and a shell job, whose terminal cannot follow it (the agent restores with none)
            res = move(lab, "a", pid, "b", "--shell-job")
            assert res.returncode == 3 and b"--shell-job cannot move a tree to another host" in res.stderr
            assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
        finally:
            tracer.kill()
            tracer.wait()
            lab.run("a", ["pkill", "-KILL", "-f", "ptrace\\(0x4206"], check=False)


@pytest.mark.parametrize("runtime", ["runc", "podman"])
def test_a_container_with_a_stopped_task_is_refused_where_criu_cannot_dump_it(lab, runtime):
    # Under a cgroup v1 freezer (the lab's), CRIU's attach to a stopped task in the frozen
    # container waits for ever; plain `runc checkpoint` hangs too. Refused, in one line
    name = f"stopped-{runtime}"
    if runtime == "podman":
        lab.run("a", ["python3", CONTAINER_TOOL, "busy", "--name", name, "--stopped-child"])
    else:
        lab.run("a", ["python3", CONTAINER_TOOL, "start", "--runtime", runtime, "--name", name,
                      "--bundle", f"/var/lib/ctr/{name}", "--stopped-child"])
    try:
        res = lab.run("a", ["livemig", "move", "--mode", "postcopy", name, "b"], check=False, timeout=120)
        assert res.returncode == 3
        assert b"is stopped (SIGSTOP or job control)" in res.stderr and b"cgroup v1 freezer" in res.stderr
        assert len(res.stderr.decode().strip().splitlines()) == 1
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
        states = lab.text("a", ["ps", "-eo", "stat=,args="])
        assert any(line.startswith("T") and "sleep 100000" in line for line in states.splitlines())
    finally:
        if runtime == "podman":
            lab.run("a", ["env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1", "podman", "rm", "--force", "--time", "0",
                          name], check=False)
        else:
            lab.run("a", [runtime, "delete", "--force", name], check=False)
            lab.run("a", ["rm", "-rf", f"/var/lib/ctr/{name}"], check=False)


PREFORK = "/opt/livemig/tests/workloads/prefork.py"


@contextlib.contextmanager
def prefork_tree(lab, pid: int, port: int, mib: int, children: int) -> Iterator[dict]:
    """prefork.py's tree on a, as PID pid, once each child has read its memory: how it sees
    itself. Killed on both hosts once the test is done with it."""
    try:
        lab.run("a", ["python3", PREFORK, "run", "--daemon", "--pid", str(pid), "--port", str(port), "--mib",
                      str(mib), "--children", str(children)])
        yield prefork_read_again(lab, "a", port, {"reads": 0, "children": range(children)}, within=120)
    finally:
        for h in ("a", "b"):
            lab.run(h, ["pkill", "-KILL", "-f", f"prefork.py run .*--port {port} "], check=False)


def prefork_read_again(lab, host: str, port: int, tree: dict, within: float = 60) -> dict:
    """How the tree sees itself on host once each child may have read its memory again since tree."""
    ask = ["python3", PREFORK, "query", "--port", str(port), "--wait", "10"]
    return eventually(lambda: json.loads(lab.text(host, ask)),
                      lambda t: t["reads"] >= tree["reads"] + len(tree["children"]) and t["children_ok"],
                      within=within)


INTO = {"stopcopy": "target memory", "stopcopy into image files": "image files", "postcopy": "post-copy",
        "precopy by write-protection": "target memory"}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_pre_fork_tree_keeps_its_sharing_in_every_mode(lab, mode):
    # A parent and four children that only read its 64 MiB: every page is shared by five.
    # CRIU's restore keeps that for the pages it reads from image files (the parent's go in
    # before it forks the children, which compare theirs): the lazy modes put what the tree
    # shares there (pages/cow.py), and place only the rest
    pid, port = 5200, 7790
    with prefork_tree(lab, pid, port, mib=64, children=4) as tree:
        pids = [tree["root"], *tree["children"]]
        before = lab.pss_bytes("a", pids)
        with Client(lab, port) as client:        # asks on both hosts, all along
            res = move(lab, "a", pid, "b", *MODES[mode])
            client.until_answered_by("b")
        assert res.returncode == 0, res.stderr.decode()
        assert not client.errors and client.taken_back() == [] and client.answers[-1].host == "b", client.said()
        report = json.loads(res.stdout)
        assert report["pages_into"] == INTO[mode]
        if mode != "stopcopy into image files":         # lazy: kept by livemig, not by CRIU alone
            # (a report whose image_files_bytes holds every page says CRIU's lazy dump left none lazy)
            assert report["shared_kept_bytes"] >= 5 * (64 << 20), report
            crossed = report["shared_sent_bytes"]
            # pre-copy by hashes sent them before the freeze: the target holds them
            assert crossed < 8 << 20 if report["precopy_tracking"] else crossed >= 64 << 20
        assert lab.pss_bytes("b", pids) <= before * 1.05          # shared as it was
        moved = prefork_read_again(lab, "b", port, tree)
        assert moved["memory_ok"] and moved["children"] == tree["children"]
        if mode == "postcopy":
            assert any("crosses before the target's copy runs" in w for w in report["warnings"])
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


def test_a_pre_fork_tree_whose_shared_pages_the_target_cannot_take_is_rolled_back_intact(lab):
    # The images cross; then the list of what each child takes from its parent's image is
    # spoilt on b (cow.SHARED, as a disk that lost it would): the restore fails before CRIU
    # runs, the move rolls back, and the tree runs on a as it was, its sharing and all
    pid, port = 5380, 7930
    with prefork_tree(lab, pid, port, mib=16, children=2) as tree:
        pids = [tree["root"], *tree["children"]]
        before = lab.pss_bytes("a", pids)
        mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=restore", "livemig", "move", "--pid", str(pid),
                                "--json", "--mode", "postcopy", "b"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with Client(lab, port) as client:        # asks on both hosts, all along
                stopped = wait_stopped(lab, mover, "restore")
                lab.run("b", ["sh", "-c", "for f in /var/lib/livemig/*/final/cow-shared.json; do echo '{' > $f; done"])
                go_on(lab, mover, stopped)
                out, err = mover.communicate(timeout=300)
                client.until_answered_by("a")
        finally:
            end_if_held(lab, mover)
        assert not client.errors and client.taken_back() == [] and {a.host for a in client.answers} == {"a"}, \
            client.said()
        report = json.loads(out)
        assert mover.returncode == 6 and report["outcome"] == "rolled back", err.decode()
        assert report["failed_phase"] == "restore" and "cow-shared.json" in report["error"]
        after = prefork_read_again(lab, "a", port, tree)
        assert after["memory_ok"] and after["children"] == tree["children"]
        assert lab.pss_bytes("a", pids) <= before * 1.05
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


@pytest.mark.parametrize("i, flags", list(enumerate([(), ("--mode", "postcopy"), ("--mode", "stopcopy", "--no-fill")])),
                         ids=["auto", "postcopy", "stopcopy into image files"])
def test_a_loopback_connection_and_a_file_lock_move_when_asked(lab, i, flags):
    # Both ends of the connection are in the tree: CRIU's TCP repair carries it (loopback is
    # on every host). The lock's file is one each host has. The restore must ask CRIU for
    # what the dump took (--tcp-established, --file-locks), or the connection comes back
    # closed and the lock not held, the move saying it moved
    pid, port = 5250 + 20 * i, 7810 + 10 * i
    # each host's own file: one both share (the lab's checkout) would stay locked by the
    # source's copy, which lives until the target's is restored, and the restore would wait for it
    for h in ("a", "b"):
        lab.run(h, ["touch", LOCKED])
    with states_tree(lab, pid, port, flags=("--connected", "--locked", LOCKED)):
        before = seen(lab, "a", port)
        assert before["connected"] is True and before["locks"] == 1
        res = move(lab, "a", pid, "b", *flags)             # a lock, and nobody asked for it
        assert res.returncode == 3 and b"holds 1 file lock" in res.stderr and b"--file-locks" in res.stderr
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
        res = move(lab, "a", pid, "b", *flags, "--tcp-established", "--file-locks")
        assert res.returncode == 0, res.stderr.decode()
        now = seen(lab, "b", port)
        assert now["connected"] is True and now["locks"] == 1
        assert_as_it_went_in(now, before)
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
        assert "CRIU-" not in lab.text("a", ["nft", "list", "tables"])      # the dump's network lock, lifted


def test_a_lock_on_a_file_both_hosts_share_is_refused_before_anything_is_touched(lab):
    # The lab's hosts share the checkout's files, as hosts share NFS: the source's copy would
    # hold the lock until the target's is restored, and that restore would wait for it for ever
    pid, port = 5330, 7890
    with states_tree(lab, pid, port, flags=("--locked", STATES)):
        before = seen(lab, "a", port)
        res = move(lab, "a", pid, "b", "--file-locks")
        assert res.returncode == 3, res.stderr.decode()
        assert f"holds a lock on {STATES}, which is locked on the target too".encode() in res.stderr
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
        assert_as_it_went_in(seen(lab, "a", port), before)
