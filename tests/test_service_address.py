"""The service address moves with the workload, and its clients keep their connections
(issue 30): a service on a, bound to an address of its own, and a client on c that holds one
connection to that address and asks over it every 20 ms; the service moves a -> b -> a -> b
with --move-address and --tcp-established, in three modes. The client's connection never
breaks, every answer it got is the one after the last (nothing lost, nothing given twice),
and the address is on one host at a time. A move rolled back puts the address back where it
was. Bad input is refused in the preflight, in one line, nothing touched. What the client
sends while the service is frozen reaches the copy that runs next, which answers it then."""

from __future__ import annotations

import itertools
import json
import subprocess

import pytest

from tests import services as sv
from tests.held import asked_while_held, end_if_held, go_on, wait_stopped
from tests.lab import WORKLOAD

pytestmark = pytest.mark.lab

ADDRESS, MOVED, REDIS_PORT = sv.ADDRESS, sv.MOVED, sv.REDIS_PORT
CLIENT = str(WORKLOAD).replace("memcounter.py", "held_client.py")


def _has(lab, host: str, address: str) -> bool:
    return f" {address}/" in lab.text(host, ["ip", "-o", "address", "show"])


def _client(lab, port: int, stop: str) -> subprocess.Popen:
    lab.run("c", ["rm", "-f", stop])
    client = lab.popen("c", ["python3", CLIENT, "--address", ADDRESS, "--port", str(port), "--until", stop],
                       stdout=subprocess.PIPE)
    assert client.stdout.readline() == b"connected\n"
    return client


def _heard(lab, client: subprocess.Popen, stop: str) -> dict:
    lab.run("c", ["touch", stop])
    heard = json.loads(client.stdout.readline())
    client.wait(timeout=30)
    numbers = [n for _, _, n in heard["answers"]]
    assert heard["error"] == "", heard["error"]                         # the connection never broke
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers   # none lost, none twice
    return heard


@pytest.fixture
def service(lab3):
    lab3.run("a", ["ip", "address", "add", MOVED, "dev", "eth0"])
    # where the test before left it, c may still send to: it learns afresh (nothing announced this)
    lab3.run("c", ["ip", "neigh", "flush", "to", ADDRESS], check=False)
    works = []

    def start(pid: int, port: int):
        works.append(lab3.start_workload("a", mib=32, dirty_mibps=2, pid=pid, port=port, bind=ADDRESS))
        return works[-1]
    yield start
    for h in ("a", "b", "c"):
        for w in works:
            lab3.run(h, ["kill", "-KILL", str(w.pid)], check=False)
        lab3.run(h, ["ip", "address", "del", MOVED, "dev", "eth0"], check=False)


def test_a_client_keeps_its_connection_while_the_service_and_its_address_move_in_every_mode(lab3, service):
    lab = lab3
    work = service(4831, 7931)
    client = _client(lab, work.port, "/tmp/held-client-stop")
    try:
        for src, dst, mode in (("a", "b", "auto"), ("b", "a", "postcopy"), ("a", "b", "stopcopy")):
            res = lab.run(src, ["livemig", "move", "--json", "--mode", mode, "--tcp-established",
                                "--move-address", MOVED, "--pid", str(work.pid), dst], check=False, timeout=600)
            assert res.returncode == 0, res.stderr.decode()
            report = json.loads(res.stdout)
            assert report["moved_addresses"] == [f"{MOVED}: eth0 on {src} to eth0 on {dst}"], report
            assert _has(lab, dst, ADDRESS) and not _has(lab, src, ADDRESS)
            assert work.query(dst, "verify")["bad_pages"] == 0
            assert lab.run(src, ["kill", "-0", str(work.pid)], check=False).returncode != 0    # one copy only
        heard = _heard(lab, client, "/tmp/held-client-stop")
    finally:
        client.kill()
    # it answered from each host in turn, over the one connection
    assert [h for h, _ in itertools.groupby(host for _, host, _ in heard["answers"])] == ["a", "b", "a", "b"]
    assert lab.leftovers(("a", "b")) == {"a": ([], []), "b": ([], [])}


@pytest.mark.parametrize("mode", ["stopcopy", "postcopy"])
def test_a_question_asked_while_the_service_is_frozen_is_answered_as_its_copy_resumes(lab3, service, mode):
    """Asked while the move is held after b's restore (tests/held.py), the address already off
    a and on b, not yet announced: the question reaches a, which keeps it (replay.py: its packet
    socket takes what comes for the moved address alone), and b's copy is given it as it
    resumes. Its TCP would send it again 1.7 and 3.4 s after; it is answered at the resume."""
    lab, hold = lab3, 2.0
    work = service(4851 if mode == "stopcopy" else 4861, 7951)
    report, waited = asked_while_held(lab, ["livemig", "move", "--json", "--mode", mode, "--tcp-established",
                                            "--move-address", MOVED, "--pid", str(work.pid), "b"],
                                      ADDRESS, work.port, hold)
    assert report["outcome"] == "moved" and report["packets_replayed"] >= 1, report
    assert hold < waited < hold + 0.8, (waited, report["downtime_parts"])
    assert work.query("b", "verify")["bad_pages"] == 0
    assert lab.leftovers(("a", "b")) == {"a": ([], []), "b": ([], [])}


@pytest.mark.parametrize("flags, point", [([], "restored"), (["--no-fill"], "transfer")],
                         ids=["fill-restored", "image-files-transfer"])
def test_a_question_asked_while_the_service_is_frozen_is_answered_as_it_runs_here_again_after_a_ctrl_c(
        lab3, service, flags, point):
    """As above, but the move is interrupted where it was held: it rolls back, and the source's
    copy, which runs again, is given the question (replay.py) before its TCP would send it
    again. Two ways back: a fill interrupted in its commit (postcopy.settle), and stop-and-copy
    into image files interrupted while frozen (failures.rollback)."""
    lab, hold = lab3, 2.0
    work = service(4871 if flags else 4881, 7961)
    report, waited = asked_while_held(lab, ["livemig", "move", "--json", "--mode", "stopcopy", *flags,
                                            "--tcp-established", "--move-address", MOVED, "--pid", str(work.pid), "b"],
                                      ADDRESS, work.port, hold, interrupted=True, point=point)
    assert report["outcome"] == "rolled back" and report["packets_replayed"] >= 1, (report["warnings"], waited)
    assert hold < waited < hold + 0.8, waited
    assert _has(lab, "a", ADDRESS) and not _has(lab, "b", ADDRESS)
    assert work.query("a")["host"] == "a"
    assert lab.leftovers(("a", "b")) == {"a": ([], []), "b": ([], [])}


def test_a_move_rolled_back_puts_the_address_back_and_the_client_goes_on_over_its_connection(lab3, service):
    lab = lab3
    work = service(4841, 7941)
    client, mover, squatter = _client(lab, work.port, "/tmp/held-client-stop-2"), None, None
    try:
        mover = lab.popen("a", ["env", "LIVEMIG_TEST_STOP_AT=restore", "livemig", "move", "--json",
                                "--mode", "stopcopy", "--tcp-established", "--move-address", MOVED,
                                "--pid", str(work.pid), "b"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stopped = wait_stopped(lab, mover, "restore")
        assert not _has(lab, "a", ADDRESS)        # frozen: off a, and not yet on b
        squatter = lab.start_workload("b", mib=1, pid=work.pid, port=work.port + 50)   # b's restore fails
        go_on(lab, mover, stopped)
        out, err = mover.communicate(timeout=300)
        assert mover.returncode == 6 and json.loads(out)["outcome"] == "rolled back", err.decode()
        assert _has(lab, "a", ADDRESS) and not _has(lab, "b", ADDRESS)
        assert work.query("a")["host"] == "a"
        heard = _heard(lab, client, "/tmp/held-client-stop-2")
        assert {host for _, host, _ in heard["answers"]} == {"a"}
    finally:
        end_if_held(lab, mover)
        client.kill()
        if squatter is not None:
            lab.run("b", ["kill", "-KILL", str(squatter.pid)], check=False)


def test_bad_addresses_are_refused_in_the_preflight_in_one_line_touching_nothing(lab3, service):
    lab = lab3
    work = service(4851, 7951)
    lab.run("a", ["ip", "address", "add", "198.19.5.5/24", "dev", "eth0"])      # a subnet b is not on
    lab.run("b", ["ip", "address", "add", "198.18.0.101/24", "dev", "eth0"])
    lab.run("a", ["ip", "address", "add", "198.18.0.101/24", "dev", "eth0"])
    try:
        for address, code, said in (
                ("198.18.0.200/24", 3, "this host does not have 198.18.0.200"),
                ("198.18.0.101/24", 3, "the target already has 198.18.0.101"),
                ("198.19.5.5/24", 3, "the target has no interface on 198.19.5.0/24"),
                ("198.18.0.100", 2, "give the prefix too"),
                ("web1/24", 2, "not an IP address")):
            res = lab.run("a", ["livemig", "move", "--move-address", address, "--pid", str(work.pid), "b"],
                          check=False)
            lines = [line for line in res.stderr.decode().splitlines() if line.startswith("livemig")]
            assert res.returncode == code and len(lines) == 1 and said in lines[0], (address, res.stderr)
            assert _has(lab, "a", ADDRESS) and not _has(lab, "b", ADDRESS)
            assert work.query("a")["host"] == "a"
        assert lab.leftovers(("a", "b")) == {"a": ([], []), "b": ([], [])}
    finally:
        lab.run("a", ["ip", "address", "del", "198.19.5.5/24", "dev", "eth0"], check=False)
        for h in ("a", "b"):
            lab.run(h, ["ip", "address", "del", "198.18.0.101/24", "dev", "eth0"], check=False)


REDIS = ["--bind", ADDRESS, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no", "--protected-mode", "no"]


def _redis_moves(lab, what: list[str], stop: str, moved: str = MOVED) -> dict:
    """Redis (what: its PID or container) moved a -> b -> a with its address (moved), its
    client on c INCRementing one key over one connection all along."""
    address = moved.split("/")[0]
    lab.run("c", ["rm", "-f", stop])
    client = lab.popen("c", ["python3", CLIENT, "--redis", "--address", address, "--port", str(REDIS_PORT),
                             "--until", stop], stdout=subprocess.PIPE)
    try:
        assert client.stdout.readline() == b"connected\n"
        for src, dst, mode in (("a", "b", "auto"), ("b", "a", "postcopy")):
            res = lab.run(src, ["livemig", "move", "--json", "--mode", mode, "--tcp-established",
                                "--move-address", moved, *what, dst], check=False, timeout=600)
            assert res.returncode == 0, res.stderr.decode()
            assert _has(lab, dst, address) and not _has(lab, src, address)
        return _heard(lab, client, stop)         # every INCR's answer the one before plus one
    finally:
        client.kill()


def test_redis_s_client_keeps_its_connection_and_every_increment_as_a_tree_and_in_a_container(lab3, service):
    lab = lab3                  # (service: the address on a)
    pid = sv.redis_tree(lab, ADDRESS)      # a bare tree
    try:
        heard = _redis_moves(lab, ["--pid", str(pid)], "/tmp/redis-client-stop")
        assert heard["answers"][0][2] == 1 and len(heard["answers"]) > 10
    finally:
        for h in ("a", "b"):
            lab.run(h, ["kill", "-KILL", str(pid)], check=False)
    # in a runc container on the host's network
    bundle = "/var/lib/ctr/redis1"
    lab.run("a", ["python3", str(WORKLOAD).replace("memcounter.py", "container.py"), "redis", "--name", "redis1",
                  "--bundle", bundle, "--", *REDIS])
    try:
        lab.run("a", ["sh", "-c", f"until redis-cli -h {ADDRESS} -p {REDIS_PORT} ping; do sleep 0.05; done"],
                timeout=60)
        heard = _redis_moves(lab, ["redis1"], "/tmp/redis-client-stop-2")
        assert heard["answers"][0][2] == 1 and len(heard["answers"]) > 10
        assert lab.leftovers(("a", "b")) == {"a": ([], []), "b": ([], [])}
    finally:
        for h in ("a", "b"):
            lab.run(h, ["runc", "delete", "--force", "redis1"], check=False)
            lab.run(h, ["rm", "-rf", bundle], check=False)


def test_an_ipv6_service_address_moves_and_redis_s_client_keeps_its_connection(lab3):
    # the hosts' IPv6 addresses on their link, the service's on a: announced by an unsolicited
    # neighbour advertisement where it goes
    lab, moved = lab3, "fd00:198:18::100/64"
    for i, h in enumerate(("a", "b", "c"), 1):
        lab.run(h, ["ip", "address", "add", f"fd00:198:18::{i}/64", "dev", "eth0", "nodad"])
    lab.run("a", ["ip", "address", "add", moved, "dev", "eth0", "nodad"])
    pid = sv.redis_tree(lab, moved.split("/")[0])
    try:
        heard = _redis_moves(lab, ["--pid", str(pid)], "/tmp/redis-client-stop-6", moved)
        assert heard["answers"][0][2] == 1 and len(heard["answers"]) > 10
    finally:
        for i, h in enumerate(("a", "b", "c"), 1):
            lab.run(h, ["kill", "-KILL", str(pid)], check=False)
            lab.run(h, ["ip", "address", "del", moved, "dev", "eth0"], check=False)
            lab.run(h, ["ip", "address", "del", f"fd00:198:18::{i}/64", "dev", "eth0"], check=False)
