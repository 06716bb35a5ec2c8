"""livemig move CTR in the namespaced lab: real runc and crun containers whose in-memory count
must go on, on the target, from where it was, registered with the target's runtime."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

pytestmark = pytest.mark.lab

TOOL = "/opt/livemig/tests/workloads/container.py"


class Counter:
    """A busybox container counting in memory (tests/workloads/container.py)."""

    def __init__(self, lab, host: str, runtime: str, name: str, busy: bool = False):
        self.lab, self.runtime, self.name = lab, runtime, name
        self.bundle = f"/var/lib/ctr/{name}"
        lab.run(host, ["python3", TOOL, "start", "--runtime", runtime, "--name", name, "--bundle", self.bundle,
                       *(["--busy"] if busy else [])])

    def count(self, host: str) -> int:
        return int(self.lab.text(host, ["python3", TOOL, "count", "--bundle", self.bundle]))

    def written(self, host: str) -> str:
        """/count as it is, even empty (caught between its truncation and its write)."""
        return self.lab.text(host, ["cat", f"{self.bundle}/rootfs/count"])

    def status(self, host: str) -> str | None:
        res = self.lab.run(host, [self.runtime, "state", self.name], check=False)
        return json.loads(res.stdout)["status"] if res.returncode == 0 else None

    def remove(self, host: str) -> None:
        self.lab.run(host, [self.runtime, "delete", "--force", self.name], check=False)
        self.lab.run(host, ["rm", "-rf", self.bundle])


def move(lab, src: str, dst: str, *args: str):
    return lab.run(src, ["livemig", "move", "--json", *args, dst], check=False, timeout=600)


def leftovers(lab) -> dict:
    return lab.leftovers()


def assert_moved(lab, ctr: Counter, src: str, dst: str, before: int, t_before: float, res,
                 renamed: str | None = None) -> dict:
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["outcome"] == "moved" and report["runtime"] == ctr.runtime and report["workload"] == ctr.name
    time.sleep(0.5)
    after = ctr.count(dst)
    # it went on from where it was (a fresh start would count from 1), and at its pace
    assert before < after <= before + 10 * (time.monotonic() - t_before) + 20, (before, after)
    assert ctr.status(src) is None                                       # gone here
    if renamed:
        assert ctr.status(dst) is None
        ctr.name = renamed
    assert ctr.status(dst) == "running"                                  # registered there
    assert lab.run(src, ["test", "-e", ctr.bundle], check=False).returncode != 0   # the bundle moved
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    return report


def test_runc_container_moves_and_keeps_counting(lab):
    ctr = Counter(lab, "a", "runc", "web1")
    time.sleep(1)
    before, t = ctr.count("a"), time.monotonic()
    report = assert_moved(lab, ctr, "a", "b", before, t, move(lab, "a", "b", "web1"))
    # no soft-dirty here: auto pre-copies by write-protection, runc's lazy dump filling the copy
    assert report["mode"] == "precopy" and "write-protection" in report["mode_reason"]
    assert report["precopy_tracking"] == "write-protect" and not any("page hashes" in w for w in report["warnings"])
    assert report["rounds"][0]["kind"] == "hashes" and report["rounds"][0]["pages_written"] > 0
    # (what the final dump names or sends is not asserted: a shell's few pages may all lie in
    # mappings CRIU restores whole, and then there are none; test_move.py's 256 MiB one is)
    assert report["bundle_bytes_wire"] > 0
    # and back again, with lazy pages this time: runc serves them, the target fetches them
    before, t = ctr.count("b"), time.monotonic()
    report = assert_moved(lab, ctr, "b", "a", before, t, move(lab, "b", "a", "--mode", "postcopy", "web1"))
    assert report["mode"] == "postcopy" and report["postcopy_pages"] > 0
    # and over once more, stop-and-copy: runc's lazy dump, every page into b's memory, then the fill
    before, t = ctr.count("a"), time.monotonic()
    report = assert_moved(lab, ctr, "a", "b", before, t, move(lab, "a", "b", "--mode", "stopcopy", "web1"))
    assert (report["mode"], report["pages_into"]) == ("stopcopy", "target memory")
    # (its few pages go in within milliseconds, or there are none to fill: the shell's memory
    # may lie in mappings CRIU restores whole; test_move.py's 256 MiB fill is timed)
    assert report["postcopy_pages_on_demand"] <= 16, report
    ctr.remove("b")


def test_crun_container_moves_renamed_with_stop_and_copy_and_says_why_not_lazy(lab):
    ctr = Counter(lab, "a", "crun", "db1")
    time.sleep(1)
    refused = move(lab, "a", "b", "--mode", "postcopy", "db1")
    assert refused.returncode == 3 and "crun" in refused.stderr.decode()
    assert ctr.status("a") == "running" and ctr.status("b") is None
    before, t = ctr.count("a"), time.monotonic()
    report = assert_moved(lab, ctr, "a", "b", before, t,
                          move(lab, "a", "b", "--runtime", "crun", "--name", "db1-b", "db1"), renamed="db1-b")
    assert report["mode"] == "stopcopy" and report["rounds"][0]["bytes_wire"] > 0
    ctr.remove("b")


def test_container_refusals_change_nothing(lab):
    ctr = Counter(lab, "a", "runc", "api1")
    # the target already has a bundle at that path that is not this one
    lab.run("b", ["mkdir", "-p", ctr.bundle])
    res = move(lab, "a", "b", "api1")
    assert res.returncode == 3 and "bundle" in res.stderr.decode() and len(res.stderr.decode().splitlines()) == 1
    lab.run("b", ["rmdir", ctr.bundle])
    # a container that does not exist, and one that is not running
    res = move(lab, "a", "b", "nosuch")
    assert res.returncode == 3 and "no container 'nosuch'" in res.stderr.decode()
    lab.run("a", ["runc", "pause", "api1"])
    res = move(lab, "a", "b", "api1")
    assert res.returncode == 3 and "paused" in res.stderr.decode()
    lab.run("a", ["runc", "resume", "api1"])
    # usage: a container name and --pid are one too many
    res = move(lab, "a", "b", "--pid", "1", "api1")
    assert res.returncode == 2
    assert ctr.status("a") == "running" and ctr.status("b") is None
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    ctr.remove("a")


def test_runc_restore_failure_rolls_back_to_the_source(lab):
    ctr = Counter(lab, "a", "runc", "api2")
    # a real restore failure: the cgroup the container will restore into, on the target,
    # admits no new task (runc keeps an existing cgroup; CRIU cannot fork into it)
    lab.run("b", ["sh", "-c", "mkdir -p /sys/fs/cgroup/pids/api2 && echo 0 > /sys/fs/cgroup/pids/api2/pids.max"])
    time.sleep(0.5)
    before = ctr.count("a")
    res = move(lab, "a", "b", "api2")
    assert res.returncode == 6, res.stderr.decode()
    assert res.stderr.decode().startswith("livemig: restore on b: ")
    report = json.loads(res.stdout)
    assert report["outcome"] == "rolled back" and report["failed_phase"] == "restore"
    time.sleep(0.5)
    assert ctr.status("a") == "running" and ctr.count("a") > before      # it goes on, here
    assert ctr.status("b") is None
    assert lab.run("b", ["test", "-e", ctr.bundle], check=False).returncode != 0   # the copy went
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    lab.run("b", ["rmdir", "/sys/fs/cgroup/pids/api2"], check=False)   # runc delete may have
    ctr.remove("a")



# Watches host a's TCP listening sockets every few milliseconds; connects at once to every
# one that was not there when it started, as a local user or a host-network container could,
# and prints each: the port, whether it got in (and holds on to what it got). It ends when its
# stdin does.
PORT_RACER = r"""
import json, select, socket, sys, time
def listening():
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
known, held = listening(), []
print("watching", flush=True)
while not (select.select([sys.stdin], [], [], 0.005)[0] and not sys.stdin.buffer.read1(1)):
    for port in sorted(listening() - known):
        known.add(port)
        got = {"port": port, "connected": False}
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            got["connected"] = True
        except OSError as e:
            got["error"] = str(e)
        print(json.dumps(got), flush=True)
"""


@pytest.mark.parametrize("mode", [("--mode", "postcopy"), ("--mode", "stopcopy", "--no-fill")],
                         ids=["lazy page server", "page server client"])
def test_runc_dumps_open_no_port_that_a_local_client_could_race_for(lab, mode):
    # runc knows page servers only as TCP addresses: a lazy dump's page server would listen
    # on every address (CRIU told lazy pages over RPC ignores the address), and a dump's
    # pages would go to a listener of ours, where a racing client could read the frozen
    # container's memory, or feed the target pages of its own. The cap makes the dump and
    # its pages last seconds, by construction, so a racer polling every 5 ms cannot miss a port.
    port = 7790 + len(mode)
    work = lab.start_container_workload("a", mib=64, port=port, container=f"race{len(mode)}")
    before = work.query("a")
    racer = lab.popen("a", ["python3", "-c", PORT_RACER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    try:
        assert racer.stdout is not None and racer.stdout.readline() == b"watching\n"
        res = move(lab, "a", "b", *mode, "--max-bandwidth", "4M", "--compression-level", "1", work.container)
    finally:
        seen, err = racer.communicate(timeout=30)      # its stdin closed: it ends
    assert res.returncode == 0, res.stderr.decode()
    assert seen == b"", (seen.decode(), err.decode())     # no port appeared on a while the container moved
    after = work.query("b", wait=10)
    assert after["host"] == "b" and after["counter"] > before["counter"]
    assert work.query("b", "verify")["bad_pages"] == 0
    lab.run("b", ["runc", "delete", "--force", work.container], check=False)
    lab.run("b", ["rm", "-rf", work.bundle])
    assert leftovers(lab) == {"a": ([], []), "b": ([], [])}


@pytest.mark.parametrize("runtime, how", [("runc", []), ("runc", ["--no-fill"]), ("crun", [])],
                         ids=["runc-lazy-fill", "runc-image-files", "crun"])
def test_a_container_never_runs_on_the_target_before_its_resume(lab, runtime, how):
    """Restored on b, the container stays stopped until the Resume, not even a moment's run
    before it is paused: held just after the restore (the source's copy paused, not given
    up), b's copy has not counted once past the source's last count, counting thousands a
    second as it does; then the move goes on, and it counts on, on b."""
    # here, not at the top: that module imports this one
    from tests.held import end_if_held, go_on, wait_stopped
    name = f"still-{runtime}{len(how)}"
    ctr = Counter(lab, "a", runtime, name, busy=True)
    mover = None
    try:
        time.sleep(0.5)
        mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=restored", "livemig", "move", "--json",
                                "--mode", "stopcopy", *how, name, "b"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stopped = wait_stopped(lab, mover, "restored")
        assert ctr.status("b") == "paused"
        frozen = ctr.written("a")        # its last count there, stopped since the final dump
        time.sleep(0.5)
        assert ctr.written("b") == frozen, (runtime, how, frozen, ctr.written("b"))
        go_on(lab, mover, stopped)
        out, err = mover.communicate(timeout=300)
        assert mover.returncode == 0, err.decode()
        assert json.loads(out)["outcome"] == "moved"
        time.sleep(0.5)
        assert ctr.status("b") == "running" and ctr.count("b") > int(frozen or 0)    # and on from there
        assert ctr.status("a") is None
        assert leftovers(lab) == {"a": ([], []), "b": ([], [])}
    finally:
        end_if_held(lab, mover)     # failed while held: nothing of it may stay
        for host in ("a", "b"):
            ctr.remove(host)
            lab.run(host, ["find", "/var/lib/livemig", "-mindepth", "1", "-maxdepth", "1", "!", "-name", "logs",
                           "-exec", "rm", "-rf", "{}", "+"], check=False)
