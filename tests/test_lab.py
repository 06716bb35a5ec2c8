"""The lab itself: hosts come up, reach each other over ssh by name, and go away without a trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import CONTAINER_TOOL, WORKLOAD, Lab, by_hand, cgroups, netns

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[1]


def lab_cli(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.lab", *args], cwd=REPO, input=input,
                          capture_output=True, timeout=900, check=False)


def machine_snapshot() -> dict:
    """What a lab could leave behind on the machine, as the machine sees it."""
    mounts = [l.split()[1] for l in Path("/proc/self/mounts").read_text().splitlines()]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    cgs = sorted(str(p) for h in cgroups.hierarchies() for p in Path(h.mountpoint, h.own_path).glob("livemig-lab-*"))
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    return {"mounts": sorted(m for m in mounts if "livemig-lab" in m),
            "links": sorted(l.split(":")[1].strip() for l in links.splitlines()),
            "cgroups": cgs,
            "procs": sorted(l for l in procs.splitlines() if "hostinit.py" in l or "lab-init" in l),
            "pipe_max": Path("/proc/sys/fs/pipe-max-size").read_text()}


def test_cli_up_exec_down_leaves_nothing_behind():
    lab_cli("down")
    before = machine_snapshot()

    up = lab_cli("up")
    assert up.returncode == 0, up.stderr.decode()
    data = json.loads(up.stdout)
    assert [(h["name"], h["address"]) for h in data["hosts"]] == [("a", "198.18.0.1"), ("b", "198.18.0.2")]
    again = lab_cli("up")  # idempotent: the same hosts, not new ones
    assert json.loads(again.stdout)["hosts"] == data["hosts"]

    hop = lab_cli("exec", "a", "--", "ssh", "b", "hostname")
    assert (hop.returncode, hop.stdout) == (0, b"b\n"), hop.stderr.decode()
    # exit codes and stdin pass through
    assert lab_cli("exec", "b", "--", "sh", "-c", "exit 7").returncode == 7
    assert lab_cli("exec", "a", "--", "cat", input=b"through").stdout == b"through"
    # the hosts are not the machine: their own hostname, PIDs and network
    assert lab_cli("exec", "b", "--", "cat", "/proc/1/comm").stdout.strip() in (b"lab-init", b"python3")
    assert b"198.18.0.2/24" in lab_cli("exec", "b", "--", "ip", "-o", "addr").stdout
    assert lab_cli("exec", "nosuch", "--", "true").returncode != 0

    down = lab_cli("down")
    assert down.returncode == 0, down.stderr.decode()
    assert machine_snapshot() == before


def test_three_hosts_share_a_bridge_and_all_reach_each_other():
    Lab.down()
    lab = Lab.up(3)
    try:
        assert lab.state.link == "bridge"
        for src in "abc":
            for dst in "abc":
                if src != dst:
                    assert lab.text(src, ["ssh", dst, "hostname"]).strip() == dst
        # the bridge lives in a namespace of its own, not on the machine
        assert "br0" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    finally:
        assert Lab.down() == []


SYSTEMD_UNIT = """[Unit]
Description=memcounter, a unit of the systemd lab's self-test
[Service]
ExecStart=/usr/bin/python3 /opt/livemig/tests/workloads/memcounter.py run --mib 8 --port 7790
Restart=always
"""


def test_systemd_hosts_boot_run_a_unit_and_leave_nothing_behind():
    """--init systemd (issue 35): hosts whose PID 1 is systemd, booted to "running" (no unit
    failed), sshd their ssh.service; a unit runs in its own cgroup, which systemd nests in the
    host's; down takes those too, and the console copiers."""
    Lab.down()
    before = machine_snapshot()
    lab = Lab.up(2, init="systemd")
    try:
        assert lab.init == "systemd" and lab.state.public()["init"] == "systemd"
        for h in "ab":
            assert lab.text(h, ["cat", "/proc/1/comm"]).strip() == "systemd"
            assert lab.text(h, ["systemctl", "is-system-running"]).strip() == "running"
        assert lab.text("a", ["ssh", "b", "systemctl", "is-active", "ssh"]).strip() == "active"

        lab.run("a", ["sh", "-c", "cat > /etc/systemd/system/memc.service && systemctl daemon-reload"],
                input=SYSTEMD_UNIT.encode())
        lab.run("a", ["systemctl", "start", "memc"])
        pid = int(lab.text("a", ["systemctl", "show", "-p", "MainPID", "--value", "memc"]))
        answer = json.loads(lab.text("a", ["python3", WORKLOAD, "query", "get", "--port", "7790", "--wait", "10"]))
        assert (answer["pid"], answer["host"]) == (pid, "a")
        assert lab.text("a", ["cat", f"/proc/{pid}/cgroup"]).splitlines()[-1] == "0::/system.slice/memc.service"
        unified = next(h for h in cgroups.hierarchies() if h.fstype == "cgroup2")
        assert (cgroups.host_dir(unified, "a") / "system.slice/memc.service").is_dir()
    finally:
        assert Lab.down() == []
    assert machine_snapshot() == before
    assert not [h.console_pid for h in lab.hosts if Path(f"/proc/{h.console_pid}").exists()]


def test_podman_container_moves_between_systemd_hosts(sd_lab):
    """podman works in systemd hosts (its cgroups its own: systemd_host.CONTAINERS_CONF) and
    CRIU restores there (the v1 cpuset cgroups it makes get cpus and mems: cgroups.create):
    a plain `podman run` container (no unit's) moves a -> b and answers the next number."""
    first = int(sd_lab.text("a", ["python3", CONTAINER_TOOL, "serve", "--name", "web1"]))
    cid = sd_lab.text("a", ["podman", "container", "inspect", "--format", "{{.Id}}", "web1"]).strip()
    res = sd_lab.run("a", ["livemig", "move", "--json", "web1", "b"], check=False, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout)["outcome"] == "moved"
    assert int(sd_lab.text("b", ["python3", CONTAINER_TOOL, "ask", "--name", "web1"])) == first + 1
    # nothing of web1 is left on a: no container, no cgroup (in any hierarchy), no image, no criu
    assert sd_lab.text("a", ["podman", "ps", "--all", "--quiet"]).strip() == ""
    assert not [d for h in cgroups.hierarchies() for d in cgroups.host_dir(h, "a").rglob(f"*{cid}*")]
    assert sd_lab.leftovers() == {"a": ([], []), "b": ([], [])}
    sd_lab.run("b", ["podman", "rm", "--force", "web1"])


def test_host_keys_are_verified_never_skipped(lab):
    """ssh refuses a host whose key is not the one known: the lab pre-trusts, it never disables checks."""
    lab.run("a", ["cp", "/root/.ssh/known_hosts", "/tmp/known_hosts.orig"])
    try:
        lab.run("a", ["sed", "-i", "/^b,/d", "/root/.ssh/known_hosts"])
        res = lab.run("a", ["ssh", "b", "true"], check=False)
        assert res.returncode == 255
        assert b"Host key verification failed" in res.stderr
    finally:
        lab.run("a", ["cp", "/tmp/known_hosts.orig", "/root/.ssh/known_hosts"])
    assert lab.text("a", ["ssh", "b", "hostname"]).strip() == "b"


def test_hosts_have_what_livemig_needs(lab):
    version = lab.text("a", ["criu", "--version"])
    major, minor = (int(x) for x in version.split()[1].split(".")[:2])
    assert (major, minor) >= (4, 2)
    assert "Looks good" in lab.text("b", ["criu", "check"]) + lab.run("b", ["criu", "check"]).stderr.decode()
    for tool in (["runc", "--version"], ["crun", "--version"], ["podman", "--version"], ["livemig", "--version"]):
        lab.run("b", tool)
    lab.run("a", ["python3", "-c", "import asyncssh, zstandard, uvloop, livemig"])
    # the checkout is mounted read-only: a host cannot change the code under test
    assert lab.run("a", ["touch", "/opt/livemig/x"], check=False).returncode != 0
    assert int(Path("/proc/sys/fs/pipe-max-size").read_text()) >= netns.PIPE_MAX


def test_criu_dump_copy_restore_by_hand_keeps_the_workload_state(lab):
    """The lab is sound: real CRIU moves a real process a -> b over ssh and it goes on counting."""
    work = lab.start_workload("a", mib=128, dirty_mibps=4, pid=4243)
    before = work.query("a")
    assert before["host"] == "a"
    moved = by_hand.migrate(lab, work.pid, "a", "b")
    after = work.query("b", wait=10)
    assert after["host"] == "b" and after["pid"] == work.pid
    assert after["counter"] > before["counter"]
    assert after["dirtied_pages"] >= before["dirtied_pages"]
    check = work.query("b", "verify")
    assert (check["bad_pages"], check["pages"]) == (0, 128 * 256)
    # one copy only: the source's is gone, its images too
    assert lab.run("a", ["kill", "-0", str(work.pid)], check=False).returncode != 0
    assert lab.text("a", ["ls", "/img"]).strip() == "" and lab.text("b", ["ls", "/img"]).strip() == ""
    assert set(moved.steps) == {"dump", "pack", "copy", "unpack", "restore"}
    lab.run("b", ["kill", str(work.pid)])


def test_memory_checksum_survives_a_move(lab):
    """With nothing dirtying memory, its digest on b equals the one taken on a."""
    work = lab.start_workload("a", mib=32, pid=4244, port=7778)
    digest = work.query("a", "sum")["sha256"]
    by_hand.migrate(lab, work.pid, "a", "b", name="sum")
    assert work.query("b", "sum", wait=10)["sha256"] == digest
    lab.run("b", ["kill", str(work.pid)])
