"""A podman container in a network namespace of its own keeps its clients' connections (issue
30): it is on a macvlan network that a and b define alike, on the link the three lab hosts
share, with an address of its own; a client on c holds one connection to that address and
asks over it every 20 ms, while the container moves a -> b -> a with --tcp-established. podman
gives the copy the address (and MAC) it had, CRIU repairs the connection there, and the client
never loses it: every answer the next integer, none lost, none given twice. A move whose restore
fails rolls back, the connection with it; one whose rollback cannot restore it here either ends
unresolved, and `livemig recover` brings it back, connected; and a Ctrl-C while it is frozen, or
the move killed before or after its commit mark, leaves one copy running with the connection. A container whose address no other host can hold
(podman's default bridge, NAT'd by its host), or whose network the target lacks, is refused
before anything is touched, in one line. Moved without --tcp-established, it is told of its
client's connection beforehand and moves (podman's checkpoint cannot close the connection: it
keeps it, and the copy's restore closes it); the client connects again, to the copy."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from tests.held import end_if_held, go_on, wait_stopped
from tests.lab import WORKLOAD
from tests.test_podman import ENV, TOOL, running
from tests.test_stopcopy_faults import killed_at, recover, stopped_at

pytestmark = pytest.mark.lab

CLIENT = str(WORKLOAD).replace("memcounter.py", "held_client.py")
NET, ADDRESS, PORT = "livemig-link", "198.18.0.150", 7000
# on the link the lab's hosts share (eth0, 198.18.0.0/24): the hosts' own addresses are below .128
CREATE = [*ENV, "podman", "network", "create", "--ignore", "--driver", "macvlan", "--opt", "parent=eth0",
          "--subnet", "198.18.0.0/24", "--ip-range", "198.18.0.128/25", "--disable-dns", NET]


@pytest.fixture
def link(lab3):
    for h in ("a", "b"):
        lab3.run(h, CREATE)
    lab3.run("c", ["ip", "neigh", "flush", "to", ADDRESS], check=False)   # an earlier test's MAC
    names = []

    def start(name: str) -> str:
        names.append(name)
        lab3.run("a", ["python3", TOOL, "held", "--name", name, "--network", NET, "--ip", ADDRESS,
                       "--port", str(PORT)])
        return name
    yield start
    for h in ("a", "b"):
        for name in names:
            lab3.run(h, [*ENV, "podman", "rm", "--force", name], check=False)
        lab3.run(h, [*ENV, "podman", "network", "rm", "--force", NET], check=False)


def _client(lab, stop: str, within: float = 10) -> subprocess.Popen:
    lab.run("c", ["rm", "-f", stop])
    for _ in range(50):      # until the container listens
        client = lab.popen("c", ["python3", CLIENT, "--address", ADDRESS, "--port", str(PORT), "--until", stop,
                                 "--answer-within", str(within)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if client.stdout.readline() == b"connected\n":
            return client
        client.wait(timeout=30)
    raise AssertionError("the container never took the client's connection")


HUSH = f"table netdev livemig-hush-{ADDRESS.replace('.', '-')}"


def hushed(lab, host: str) -> list[str]:
    """What keeps a copy at ADDRESS off the link from host's side (runtimes/quiet.py: hush)."""
    return [t for t in lab.text(host, ["nft", "list", "tables", "netdev"], check=False).splitlines() if t == HUSH]


def _heard(lab, client: subprocess.Popen, stop: str) -> list[int]:
    lab.run("c", ["touch", stop])
    heard = json.loads(client.stdout.readline())
    client.wait(timeout=30)
    numbers = [n for _, _, n in heard["answers"]]
    assert heard["error"] == "", heard["error"]                         # the connection never broke
    assert numbers == list(range(1, len(numbers) + 1)), numbers          # none lost, none twice
    return numbers


def closed_and_told(lab, name: str) -> None:
    """A container on a, its client on c connected, moved to b WITHOUT --tcp-established: the
    dry run (on stderr) and the move (its report's warnings) each say once that its connection
    will be closed and how to keep it; the move goes through; the client's connection ends (reset, or unanswered: a peer whose
    next retransmission comes late learns nothing sooner), and a client connecting afresh
    is answered by the copy, at the same address."""
    stop = f"/tmp/closed-told-{name}"
    client = _client(lab, stop, within=3)
    try:
        said = [lab.run("a", [*ENV, "livemig", "move", *flags, name, "b"], check=False, timeout=600)
                for flags in (["--dry-run"], ["--json"])]
        lab.run("c", ["touch", stop])
        ended = json.loads(client.stdout.readline())
    finally:
        client.kill()
    dry, moved = said
    assert dry.returncode == 0 and moved.returncode == 0, (dry.stderr.decode(), moved.stderr.decode())
    report = json.loads(moved.stdout)
    told = [line for line in dry.stderr.decode().splitlines() if "established TCP connection" in line]
    assert report["outcome"] == "moved"
    for lines in (told, [w for w in report["warnings"] if "established TCP connection" in w]):
        assert len(lines) == 1 and "1 established TCP connection" in lines[0] and "--tcp-established" in lines[0], \
            (dry.stderr.decode(), report["warnings"])
    assert ended["error"] != "" and ended["answers"], ended       # it had answers, then its connection went
    fresh = _client(lab, stop + "-fresh")
    assert _heard(lab, fresh, stop + "-fresh")


def _move(lab, src: str, dst: str, name: str, *flags: str, env: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return lab.run(src, [*ENV, *env, "livemig", "move", "--json", *flags, name, dst], check=False, timeout=600)


def faulted(lab, point: str, how: str, name: str, ends_on: str, held: Callable[[], None]) -> None:
    """name's move a -> b with --tcp-established, faulted at point: killed there (-KILL; held()
    looks at the copies left, then `livemig recover` settles it, ending on ends_on), or
    interrupted (-INT: rolled back, exit code 130)."""
    if how == "-KILL":
        killed_at(lab, point, "--tcp-established", name)
        held()
        settled = recover(lab)
        assert settled["outcome"] == ("rolled back" if ends_on == "a" else "moved"), settled
        return
    mover, stopped = stopped_at(lab, point, "--tcp-established", name)
    lab.run("a", ["kill", how, *stopped])
    go_on(lab, mover, stopped)
    mover.wait(timeout=120)
    assert mover.returncode == 130, mover.stderr.read().decode()


def test_a_podman_container_on_a_shared_link_keeps_its_client_s_connection_there_and_back(lab3, link):
    lab, name = lab3, link("held1")
    client = _client(lab, "/tmp/podman-net-stop")
    try:
        asked = []
        for src, dst in (("a", "b"), ("b", "a")):
            res = _move(lab, src, dst, name, "--tcp-established")
            assert res.returncode == 0, res.stderr.decode()
            report = json.loads(res.stdout)
            assert (report["runtime"], report["outcome"]) == ("podman", "moved")
            assert running(lab, dst, name) and running(lab, src, name) is None     # one copy only
            ip = lab.text(dst, [*ENV, "podman", "inspect", name, "--format",
                                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"]).strip()
            assert ip == ADDRESS             # the copy has the address the connection is on
            asked.append(len(lab.text("c", ["ss", "-Htn", "state", "established", "dst", ADDRESS]).splitlines()))
        numbers = _heard(lab, client, "/tmp/podman-net-stop")
    finally:
        client.kill()
    assert asked == [1, 1]          # the one connection, all along
    assert len(numbers) > 20
    assert hushed(lab, "a") == hushed(lab, "b") == []       # each copy back on the link as it ran


def test_a_podman_move_whose_restore_fails_rolls_back_with_its_client_s_connection(lab3, link):
    """b's podman cannot start a task (pids.max 0 for its containers): the restore fails for
    real, after the freeze; the rollback restores the container here with its connection."""
    lab, name = lab3, link("held2")
    client = _client(lab, "/tmp/podman-net-stop-2")
    limit = "/sys/fs/cgroup/pids/libpod_parent"
    lab.run("b", ["sh", "-c", f"mkdir -p {limit} && echo 0 > {limit}/pids.max"])
    try:
        res = _move(lab, "a", "b", name, "--tcp-established")
        assert res.returncode == 6, res.stderr.decode()
        assert json.loads(res.stdout)["outcome"] == "rolled back"
        assert running(lab, "a", name) and running(lab, "b", name) is None
        numbers = _heard(lab, client, "/tmp/podman-net-stop-2")
    finally:
        lab.run("b", ["sh", "-c", f"echo max > {limit}/pids.max"])
        client.kill()
    assert len(numbers) > 5
    assert hushed(lab, "b") == []       # its copy never ran there: nothing of it stays


def test_a_podman_container_whose_connections_no_other_host_can_keep_is_refused_untouched(lab3, link):
    lab, name = lab3, link("held3")
    # podman's default network: a bridge behind a's NAT
    lab.run("a", ["python3", TOOL, "serve", "--name", "nat1"])
    try:
        res = _move(lab, "a", "b", "nat1", "--tcp-established")
        err = res.stderr.decode()
        assert res.returncode == 3 and "podman network podman (bridge" in err and "this host alone" in err, err
        assert len(err.strip().splitlines()) <= 2        # "connecting to b..." and the one line
        assert running(lab, "a", "nat1")
        # the target lacks the container's network
        lab.run("b", [*ENV, "podman", "network", "rm", NET])
        res = _move(lab, "a", "b", name, "--tcp-established")
        err = res.stderr.decode()
        assert res.returncode == 3 and f"the target has no podman network {NET}" in err, err
        assert f"podman network create -d macvlan -o parent=eth0 --subnet 198.18.0.0/24 {NET}" in err, err
        assert running(lab, "a", name) and running(lab, "b", name) is None
    finally:
        lab.run("a", [*ENV, "podman", "rm", "--force", "nat1"], check=False)


def test_a_rollback_that_cannot_restore_here_ends_unresolved_and_recover_brings_it_back_connected(lab3, link):
    """Neither host's podman can start a task once the container is frozen (pids.max 0 for
    its containers): b's restore fails, then the rollback's here. The move ends unresolved
    (exit code 7), saying both, its record kept; once a can start tasks again, `livemig
    recover` restores the container here from the checkpoint podman kept, its client's
    connection with it."""
    lab, name = lab3, link("held4")
    client = _client(lab, "/tmp/podman-net-stop-4", within=120)     # it waits for the operator's recover
    limit, mover = "/sys/fs/cgroup/pids/libpod_parent", None
    try:
        mover = lab.popen("a", [*ENV, "LIVEMIG_TEST_STOP_AT=restore", "livemig", "move", "--json",
                                "--tcp-established", name, "b"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stopped = wait_stopped(lab, mover, "restore")
        for h in ("a", "b"):
            lab.run(h, ["sh", "-c", f"mkdir -p {limit} && echo 0 > {limit}/pids.max"])
        go_on(lab, mover, stopped)
        out, err = mover.communicate(timeout=300)
        assert mover.returncode == 7, err.decode()
        said = err.decode()
        assert "restore on b" in said and "rolling back, the workload could not run here again" in said, said
        assert json.loads(out)["outcome"] == "unresolved"
        assert not running(lab, "a", name) and running(lab, "b", name) is None
        lab.run("a", ["sh", "-c", f"echo max > {limit}/pids.max"])
        settled = recover(lab)
        assert settled["outcome"] == "rolled back", settled
        assert running(lab, "a", name) and running(lab, "b", name) is None
        numbers = _heard(lab, client, "/tmp/podman-net-stop-4")
    finally:
        end_if_held(lab, mover)
        for h in ("a", "b"):
            lab.run(h, ["sh", "-c", f"echo max > {limit}/pids.max"], check=False)
        client.kill()
    assert len(numbers) > 5


@pytest.mark.parametrize("point, how, ends_on", [
    ("transfer", "-INT", "a"),       # Ctrl-C while frozen: rolled back here
    ("restored", "-KILL", "a"),      # killed before its commit: recover rolls it back here
    ("marked", "-KILL", "b"),        # killed once its commit was marked: recover resumes the target's
])
def test_a_fault_in_a_podman_move_leaves_one_copy_and_its_client_s_connection(lab3, link, point, how, ends_on):
    """Wherever the move ends after a fault, the one copy that runs is the container with its
    client's connection: through the source's checkpoint again, or the target's copy resumed."""
    lab, name = lab3, link(f"held-{point}")
    client = _client(lab, f"/tmp/podman-net-stop-{point}", within=120)     # a kill waits for recover
    def held() -> None:     # b's copy, restored and never resumed, is quiet on the link (runtimes/quiet.py)
        pid = lab.text("b", [*ENV, "podman", "inspect", "--format", "{{.State.Pid}}", name]).strip()
        lab.run("b", ["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "list", "table", "inet", "livemig-quiet"])
        assert hushed(lab, "b") == [HUSH]      # and off it from b's side, since before its restore
    try:
        faulted(lab, point, how, name, ends_on, held)
        assert running(lab, ends_on, name) and running(lab, "b" if ends_on == "a" else "a", name) is None
        numbers = _heard(lab, client, f"/tmp/podman-net-stop-{point}")
    finally:
        client.kill()
    assert len(numbers) > 5
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
    assert hushed(lab, "a") == hushed(lab, "b") == []


def test_a_podman_container_moved_without_its_connections_says_so_and_its_clients_connect_again(lab3, link):
    """podman's checkpoint has no --tcp-close: it takes them as they are (podman.flags), which
    a connection open as it froze once failed after the freeze; the copy's restore closes them."""
    lab, name = lab3, link("held-closing")
    closed_and_told(lab, name)
    assert running(lab, "b", name) and running(lab, "a", name) is None
