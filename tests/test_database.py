"""A real database moves with every transaction it committed (issue 30): PostgreSQL, Debian's,
in a runc container on the host's network, its files on the storage both hosts share
(/srv/shared, as a SAN or NFS would be), bound to a service address of its own that moves with
it (--move-address). pgbench on c commits transactions against that address before each move;
afterwards every one of them is there, once (pgbench's history holds exactly one row per
transaction it counted), pgbench's own invariant holds (the accounts', tellers', branches' and
history's sums agree) and PostgreSQL's own checker (pg_amcheck) finds nothing.

Its clients stay connected through the moves where its network namespace is its own too:
the lab's root lacks CAP_SYS_RESOURCE, without which CRIU cannot dump a task of another user
(prlimit: EPERM), and PostgreSQL will not run as root. So it runs as user postgres in a user
namespace where that is the host's root (services.as_postgres). From inside that namespace, in
the host's network, CRIU's restore may not repair TCP connections (TCP_REPAIR): a move that
would need it is refused in the preflight, saying why. In a network namespace made with its
user namespace it may, and pgbench's 8 clients keep their connections through the moves, the
service address on a link of the container's own (oci_networks.py). Where
vm.unprivileged_userfaultfd is 0, CRIU's restore cannot open a userfaultfd in that namespace
either, and auto moves it in stop-and-copy into image files. A bare tree in the host's IPC
namespace is refused too: CRIU moves its System V segment only with the namespace it lives in."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests import services as sv

pytestmark = pytest.mark.lab

CLIENTS = 8
HELD = f"ss -Htn state established '( sport = :{sv.PG_PORT} )' | grep -q ."    # a client is connected


@pytest.fixture
def database(lab3):
    """An initialised database on the shared storage, the service address on a; its server
    is the test's to start. Yields the PostgreSQL programs' directory."""
    sv.take_address(lab3)
    try:
        yield sv.init_postgres(lab3)
    finally:
        sv.clear(lab3)


def _committed(lab, pg: str, transactions: int) -> int:
    """pgbench's 8 clients on c commit transactions each; how many it counted. (-n: no
    vacuum first, which would empty pgbench_history, the record of every transaction.)"""
    res = lab.run("c", sv.pgbench(pg, "-n", "-c", str(CLIENTS), "-j", "2", "-t", str(transactions)), check=False,
                  timeout=600)
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0 and re.search(r"number of failed transactions: 0\b", out), out + res.stderr.decode()
    return int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))


def _holds_every_transaction(lab, pg: str, done: int) -> None:
    """Every transaction a client was told committed is there, once: one history row each;
    pgbench's invariant holds, and PostgreSQL's checker finds nothing."""
    sums = sv.sql(lab, pg, "select (select count(*) from pgbench_history), (select sum(delta) from pgbench_history), "
                           "(select sum(abalance) from pgbench_accounts), "
                           "(select sum(bbalance) from pgbench_branches), "
                           "(select sum(tbalance) from pgbench_tellers)").split("|")
    assert int(sums[0]) == done and len(set(sums[1:])) == 1, sums
    check = lab.run("c", [f"{pg}/pg_amcheck", "-h", sv.ADDRESS, "-p", str(sv.PG_PORT), "-U", "postgres",
                          "--install-missing", "--heapallindexed", "postgres"], check=False, timeout=300)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def _refused(lab, src: str, argv: list[str], said: str) -> None:
    res = lab.run(src, ["livemig", "move", *argv], check=False)
    lines = [line for line in res.stderr.decode().splitlines() if line.startswith("livemig")]
    assert res.returncode == 3 and len(lines) == 1 and said in lines[0], res.stderr.decode()
    assert lab.leftovers(("a", "b")) == {"a": ([], []), "b": ([], [])}


def test_postgresql_in_a_container_moves_there_and_back_with_every_committed_transaction(lab3, database):
    lab, pg = lab3, database
    what = sv.postgres_container(lab, pg)
    lab.run("c", sv.pgbench(pg, "-i", "-s", "4", "-q"), timeout=300)
    done = _committed(lab, pg, 200)
    # what its user namespace rules out, refused before anything is touched
    _refused(lab, "a", ["--mode", "postcopy", "--move-address", sv.MOVED, *what, "b"],
             "vm.unprivileged_userfaultfd is 0")
    client = lab.popen("c", [f"{pg}/psql", "-h", sv.ADDRESS, "-U", "postgres", "-c", "select pg_sleep(60)", "postgres"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lab.run("a", ["sh", "-c", f"until {HELD}; do sleep 0.1; done"], timeout=30)
        _refused(lab, "a", ["--tcp-established", "--move-address", sv.MOVED, *what, "b"], "TCP repair is not allowed")
    finally:
        client.kill()
        client.wait()
    lab.run("a", ["sh", "-c", f"while {HELD}; do sleep 0.1; done"], timeout=60)
    # a -> b and back, each time with what was committed before, and more committed between
    for src, dst in (("a", "b"), ("b", "a")):
        res = lab.run(src, ["livemig", "move", "--json", "--move-address", sv.MOVED, *what, dst], check=False,
                      timeout=600)
        assert res.returncode == 0, res.stderr.decode()
        report = json.loads(res.stdout)
        assert (report["mode"], report["pages_into"]) == ("stopcopy", "image files"), report
        assert any("user namespace of its own" in w for w in report["warnings"]), report["warnings"]
        assert lab.run(src, ["runc", "state", what[0]], check=False).returncode != 0     # one copy only
        _holds_every_transaction(lab, pg, done)
        done += _committed(lab, pg, 100)
    _holds_every_transaction(lab, pg, done)
    assert lab.leftovers(("a", "b")) == {"a": ([], []), "b": ([], [])}


def _connections(lab) -> set[str]:
    """The clients' connections to the service address, by their local address and port on c."""
    out = lab.text("c", ["ss", "-Htn", "state", "established", "dst", sv.ADDRESS])
    return {line.split()[2] for line in out.splitlines()}


@pytest.fixture
def own_database(lab3):
    """As database, but for the service address: the container's, in its own network namespace."""
    lab3.run("c", ["ip", "neigh", "flush", "to", sv.ADDRESS], check=False)    # an earlier test's MAC
    try:
        yield sv.init_postgres(lab3)
    finally:
        sv.clear(lab3)


def test_postgresql_in_a_network_of_its_own_keeps_its_8_clients_through_moves_there_and_back(lab3, own_database):
    """PostgreSQL in a runc container whose user and network namespaces are its own, the
    service address on a macvlan link in it: pgbench's 8 clients on c keep committing over
    their connections while it moves a -> b -> a with --tcp-established (CRIU repairs each
    connection on the target; livemig makes the container's link again there, its MAC and
    address with it: oci_networks.py). No client loses its connection or fails a transaction,
    and every transaction pgbench counted is there, once."""
    lab, pg = lab3, own_database
    what = sv.postgres_container(lab, pg, own_network=True)
    lab.run("c", sv.pgbench(pg, "-i", "-s", "4", "-q"), timeout=300)
    # long enough for both moves, whatever this machine's pace: asserted below, not assumed
    bench = lab.popen("c", sv.pgbench(pg, "-n", "-c", str(CLIENTS), "-j", "2", "-T", "60"),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        sv.all_connected(lab, CLIENTS)
        connections = _connections(lab)
        for src, dst in (("a", "b"), ("b", "a")):
            res = lab.run(src, ["livemig", "move", "--json", "--tcp-established", *what, dst], check=False,
                          timeout=600)
            assert res.returncode == 0, res.stderr.decode()
            assert json.loads(res.stdout)["outcome"] == "moved"
            assert lab.run(src, ["runc", "state", what[0]], check=False).returncode != 0     # one copy only
            assert _connections(lab) == connections      # every client's connection, the same ones
        assert bench.poll() is None, "pgbench ended before both moves did: the premise of this test failed"
        out, err = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
    said = out.decode(errors="replace")
    assert bench.returncode == 0 and re.search(r"number of failed transactions: 0\b", said), said + err.decode()
    done = int(re.search(r"number of transactions actually processed: (\d+)", said).group(1))
    _holds_every_transaction(lab, pg, done)
    assert lab.leftovers(("a", "b")) == {"a": ([], []), "b": ([], [])}


def test_postgresql_as_a_tree_in_the_host_s_ipc_namespace_is_refused_in_the_preflight(lab3, database):
    # its System V segment cannot move without its IPC namespace: refused, nothing touched
    lab, pg = lab3, database
    pid = sv.postgres_tree(lab, pg)
    res = lab.run("a", ["livemig", "move", "--tcp-established", "--move-address", sv.MOVED, "--pid", str(pid), "b"],
                  check=False)
    lines = [line for line in res.stderr.decode().splitlines() if line.startswith("livemig")]
    assert res.returncode == 3 and len(lines) == 1, res.stderr.decode()
    assert "System V shared memory" in lines[0] and "unshare --ipc" in lines[0]
    assert sv.sql(lab, pg, "select 1") == "1" and lab.leftovers(("a", "b")) == {"a": ([], []), "b": ([], [])}
