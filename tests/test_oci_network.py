"""A runc or crun container in a network namespace of its own comes out of a move with its
network (issue 30): runc restores such a namespace empty (no link, loopback down), and crun's
CRIU makes a macvlan link again only where told its parent; livemig makes it again either way
(livemig/runtimes/oci_networks.py). The container here is the held-connection server on a
macvlan link over the link the lab's hosts share, with an address and MAC of its own, put in
its namespace between its runtime's create and start as an operator's tool would. A client on
c holds one connection to it and asks over it every 20 ms while it moves a -> b -> a with
--tcp-established: the client never loses it, every answer the next, and the copy has its
address, MAC and loopback. A move whose restore cannot make the link on the target (its MAC is
taken there) rolls back, the connection with it; so does a Ctrl-C while it is frozen, and the
move killed before its commit mark (then `livemig recover`, which opens the source's copy's
network again); killed after its mark, recover resumes the target's copy, the connection with
it, and the source's goes, its link with it. A container whose link livemig cannot make again
(a veth, its other end on this host) is refused before anything is touched. Moved without
--tcp-established, a container with its client connected is told of the connection once in the
dry run and once in the move's report, and moves; the client connects again, to the copy.
What the client sends while the container is frozen is given to the copy that runs next, which
answers it then, not at the client's next retransmission (livemig/replay.py)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.held import asked_while_held
from tests.test_podman import TOOL
from tests.test_podman_network import (
    ADDRESS,
    PORT,
    _client,
    _heard,
    closed_and_told,
    faulted,
)

pytestmark = pytest.mark.lab

MAC = "02:42:c6:12:00:96"


@pytest.fixture
def linked(lab3):
    lab3.run("c", ["ip", "neigh", "flush", "to", ADDRESS], check=False)   # an earlier test's MAC
    names: list[tuple[str, str]] = []

    def start(runtime: str, name: str, kind: str = "macvlan") -> str:
        names.append((runtime, name))
        lab3.run("a", ["python3", TOOL, "linked", "--runtime", runtime, "--name", name, "--bundle",
                       f"/var/lib/ctr/{name}", "--ip", f"{ADDRESS}/24", "--mac", MAC, "--port", str(PORT),
                       "--kind", kind])
        return name
    yield start
    for h in ("a", "b"):
        for runtime, name in names:
            lab3.run(h, [runtime, "delete", "--force", name], check=False)
            lab3.run(h, ["rm", "-rf", f"/var/lib/ctr/{name}"], check=False)


def status(lab, host: str, runtime: str, name: str) -> str | None:
    res = lab.run(host, [runtime, "state", name], check=False)
    return json.loads(res.stdout)["status"] if res.returncode == 0 else None


def its_links(lab, host: str, runtime: str, name: str) -> dict[str, dict]:
    """The container's network namespace's links on host, by name, as `ip -j address` says."""
    pid = json.loads(lab.text(host, [runtime, "state", name]))["pid"]
    out = lab.text(host, ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", "address", "show"])
    return {link["ifname"]: link for link in json.loads(out)}


def _move(lab, src: str, dst: str, name: str) -> subprocess.CompletedProcess:
    return lab.run(src, ["livemig", "move", "--json", "--tcp-established", name, dst], check=False, timeout=600)


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_a_container_in_its_own_network_keeps_it_and_its_client_s_connection_there_and_back(lab3, linked, runtime):
    lab, name = lab3, linked(runtime, f"{runtime}-linked")
    stop = f"/tmp/oci-net-stop-{runtime}"
    client = _client(lab, stop)
    try:
        asked = []
        for src, dst in (("a", "b"), ("b", "a")):
            res = _move(lab, src, dst, name)
            assert res.returncode == 0, res.stderr.decode()
            report = json.loads(res.stdout)
            assert (report["runtime"], report["outcome"]) == (runtime, "moved")
            assert status(lab, dst, runtime, name) == "running" and status(lab, src, runtime, name) is None
            links = its_links(lab, dst, runtime, name)
            assert links["eth0"]["address"] == MAC, links
            assert f"{ADDRESS}/24" in [f"{a['local']}/{a['prefixlen']}" for a in links["eth0"]["addr_info"]], links
            assert "UP" in links["lo"]["flags"], links        # (runc alone would leave it down)
            asked.append(len(lab.text("c", ["ss", "-Htn", "state", "established", "dst", ADDRESS]).splitlines()))
        numbers = _heard(lab, client, stop)
    finally:
        client.kill()
    assert asked == [1, 1]          # the one connection, all along
    assert len(numbers) > 20
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


HOLD = 2.0     # seconds a move is held after its restore (tests/held.py: asked_while_held)


@pytest.mark.parametrize("replay", [True, False], ids=["replay", "no-replay"])
def test_a_client_that_asks_while_the_container_is_frozen_is_answered_as_it_resumes(lab3, linked, replay):
    """The client asks once while the move is held after b restored the copy: a's copy frozen
    and quiet, b's stopped. Its TCP sends the question again 0.2, 0.4, 0.85, 1.7 and 3.4 s
    after (from its 200 ms floor, doubling), so the move goes on HOLD s after, far from any of
    those. Kept on a and given to b's copy as it resumed (replay.py), the question is answered
    then; with --no-replay, at the retransmission after (3.4 s): the premise, shown."""
    lab, name = lab3, linked("runc", f"runc-{'replay' if replay else 'no-replay'}")
    argv = ["livemig", "move", "--json", "--tcp-established", *([] if replay else ["--no-replay"]), name, "b"]
    report, waited = asked_while_held(lab, argv, ADDRESS, PORT, HOLD)
    assert report["outcome"] == "moved", report
    assert waited > HOLD        # it waited for the copy that runs
    if replay:
        assert report["packets_replayed"] >= 1 and waited < HOLD + 0.8, (waited, report["downtime_parts"])
    else:
        assert report["packets_replayed"] == 0 and waited > HOLD + 0.8, (waited, report["downtime_parts"])
    assert status(lab, "b", "runc", name) == "running" and status(lab, "a", "runc", name) is None
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_a_container_moved_without_its_connections_says_so_and_its_clients_connect_again(lab3, linked, runtime):
    lab, name = lab3, linked(runtime, f"{runtime}-closing")
    closed_and_told(lab, name)
    assert status(lab, "b", runtime, name) == "running" and status(lab, "a", runtime, name) is None


def test_a_move_whose_target_cannot_make_the_link_rolls_back_with_its_client_s_connection(lab3, linked):
    """b already has a link with the container's MAC on its eth0 (up, silent: no ARP, no IPv6
    address): the copy's link cannot come up there (EADDRINUSE), the restore fails after the
    freeze, and the move rolls back, the container here with its connection."""
    lab, name = lab3, linked("runc", "runc-clash")
    stop = "/tmp/oci-net-stop-clash"
    client = _client(lab, stop)
    for argv in (["link", "add", "link", "eth0", "name", "clash", "address", MAC, "type", "macvlan", "mode", "bridge"],
                 ["link", "set", "clash", "addrgenmode", "none", "arp", "off"], ["link", "set", "clash", "up"]):
        lab.run("b", ["ip", *argv])
    try:
        res = _move(lab, "a", "b", name)
        err = res.stderr.decode()
        assert res.returncode == 6 and "own network could not be made here" in err, err
        assert "Address already in use" in err, err
        assert json.loads(res.stdout)["outcome"] == "rolled back"
        assert status(lab, "a", "runc", name) == "running" and status(lab, "b", "runc", name) is None
        numbers = _heard(lab, client, stop)
    finally:
        lab.run("b", ["ip", "link", "delete", "clash"], check=False)
        client.kill()
    assert len(numbers) > 5
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


def test_a_container_whose_link_cannot_be_made_again_is_refused_untouched(lab3, linked):
    lab, name = lab3, linked("runc", "runc-veth", kind="veth")
    res = _move(lab, "a", "b", name)
    lines = [line for line in res.stderr.decode().splitlines() if line.startswith("livemig")]
    assert res.returncode == 3 and len(lines) == 1, res.stderr.decode()
    assert "eth0 is a veth link" in lines[0] and "livemig makes macvlan and ipvlan links" in lines[0], lines
    assert status(lab, "a", "runc", name) == "running" and status(lab, "b", "runc", name) is None
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}


@pytest.mark.parametrize("point, how, ends_on", [
    ("transfer", "-INT", "a"),       # Ctrl-C while frozen: rolled back here
    ("restored", "-KILL", "a"),      # killed before its commit: recover rolls it back here
    ("marked", "-KILL", "b"),        # killed once its commit was marked: recover resumes the target's
])
def test_a_fault_in_a_move_leaves_one_copy_with_its_network_and_its_client_s_connection(lab3, linked, point, how,
                                                                                     ends_on):
    lab, name = lab3, linked("runc", f"runc-{point}")
    stop = f"/tmp/oci-net-stop-{point}"
    client = _client(lab, stop, within=120)     # a kill waits for recover
    def held() -> None:     # both copies quiet on the link meanwhile (quiet.py): a's paused, b's restored
        for h in ("a", "b"):
            pid = json.loads(lab.text(h, ["runc", "state", name]))["pid"]
            lab.run(h, ["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "list", "table", "arp", "livemig-quiet"])
    try:
        faulted(lab, point, how, name, ends_on, held)
        other = "b" if ends_on == "a" else "a"
        assert status(lab, ends_on, "runc", name) == "running" and status(lab, other, "runc", name) is None
        pid = json.loads(lab.text(ends_on, ["runc", "state", name]))["pid"]
        tables = lab.text(ends_on, ["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "list", "tables"])
        assert "livemig-quiet" not in tables, tables       # it speaks again
        numbers = _heard(lab, client, stop)
    finally:
        client.kill()
    assert len(numbers) > 5
    assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
