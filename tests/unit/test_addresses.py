"""The addresses a tree's sockets hold, read from /proc as the kernel writes it."""

import json
import os
import socket
from pathlib import Path

from livemig import addresses

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 11 1 0 100 0 0 10 0
   1: 010012C6:1B58 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12 1 0 100 0 0 10 0
   2: 00000000:1B59 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13 1 0 100 0 0 10 0
   3: 010012C6:1B5A 020012C6:D431 01 00000000:00000000 00:00000000 00000000     0        0 14 1 0 100 0 0 10 0
   4: 010012C6:1B5B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0 100 0 0 10 0
"""
TCP6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF0000010012C6:1B5C 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15 1 0 100 0 0 10 0
   1: 000000FD000000000000000001000000:0035 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 16 1 0 100 0 0 10 0
"""
FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 198.18.0.0/30 2 0 2
        |-- 198.18.0.0
           /30 link UNICAST
        |-- 198.18.0.1
           /32 host LOCAL
        |-- 198.18.0.3
           /32 link BROADCAST
Local:
  +-- 127.0.0.0/8 2 0 2
     |-- 127.0.0.1
        /32 host LOCAL
"""
IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000001 02 40 00 80     eth0
"""


def test_listening_sockets_of_the_tree_at_a_host_s_own_address_are_held():
    # 7000 at 198.18.0.1 is; loopback, the wildcard, a connection and someone else's socket are not
    assert addresses.parse_table(TCP, {11, 12, 13, 14}, ("0A",)) == {addresses.Bound("198.18.0.1", 7000)}
    # IPv6, an IPv4-mapped one included (a dual-stack socket bound to an IPv4 address)
    assert addresses.parse_table(TCP6, {15, 16}, ("0A",)) == {addresses.Bound("198.18.0.1", 7004),
                                                             addresses.Bound("fd00::1", 53)}


def test_a_host_s_addresses_are_its_local_ones():
    assert addresses.parse_fib_trie(FIB_TRIE) == {"198.18.0.1", "127.0.0.1"}
    assert addresses.parse_if_inet6(IF_INET6) == {"::1", "fd00::1"}


def test_this_process_s_sockets_as_the_kernel_lists_them():
    mine = [a for a in addresses.local() if a not in ("127.0.0.1", "::1") and ":" not in a]
    assert mine, "this host has an IPv4 address of its own"
    with socket.socket() as bound, socket.socket() as anywhere, socket.socket() as looped, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        bound.bind((mine[0], 0))
        bound.listen()
        anywhere.bind(("0.0.0.0", 0))
        anywhere.listen()
        looped.bind(("127.0.0.1", 0))
        looped.listen()
        udp.bind((mine[0], 0))
        held = addresses.held([os.getpid()])
        assert held == sorted({addresses.Bound(mine[0], bound.getsockname()[1]),
                               addresses.Bound(mine[0], udp.getsockname()[1])})


def test_the_tree_s_established_connections_whatever_their_address():
    # 14: 198.18.0.1:7002 from 198.18.0.2:54321; listening ones are not connections
    assert addresses.parse_connections(TCP, {11, 12, 13, 14, 99}) == {("198.18.0.1", 7002, "198.18.0.2", 54321)}
    assert addresses.parse_connections(TCP, {11, 12}) == set()


def test_this_process_s_connections_as_the_kernel_lists_them():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()):
            taken, _ = server.accept()
            with taken:
                here, there = taken.getsockname(), taken.getpeername()
                ends = addresses.connected([os.getpid()])
                # both ends are this process's: each is one connection of the tree
                assert (here[0], here[1], there[0], there[1]) in ends
                assert (there[0], there[1], here[0], here[1]) in ends and len(ends) == 2
    assert addresses.connected([os.getpid()]) == []


def test_a_socket_set_to_bind_to_any_address_is_told_apart():
    # IP_FREEBIND (and IP_TRANSPARENT) let a socket bind to an address no interface has:
    # CRIU sets it again before it binds, so it binds on any target
    with socket.socket() as free, socket.socket() as plain:
        free.setsockopt(socket.SOL_IP, 15, 1)      # IP_FREEBIND
        free.bind(("198.19.99.99", 0))
        free.listen()
        plain.bind(("0.0.0.0", 0))
        plain.listen()
        assert addresses.binds_anywhere(os.getpid(), free.fileno())
        assert not addresses.binds_anywhere(os.getpid(), plain.fileno())
        assert addresses.Bound("198.19.99.99", free.getsockname()[1], freebind=True) in addresses.held([os.getpid()])
    # a table's row whose socket binds anywhere says so
    assert addresses.parse_table(TCP, {11, 12, 13, 14}, ("0A",), lambda inode: inode == 12) == {
        addresses.Bound("198.18.0.1", 7000, freebind=True)}


def test_a_socket_a_lazy_dump_left_in_repair_mode_is_taken_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener, socket.create_connection(listener.getsockname()) as ours:
        theirs, _ = listener.accept()
        with theirs:
            assert addresses.in_repair([os.getpid()]) == 0
            ours.setsockopt(socket.SOL_TCP, 19, 1)        # TCP_REPAIR, as CRIU's dump leaves it
            assert addresses.in_repair([os.getpid()]) == 1
            assert ours.getsockopt(socket.SOL_TCP, 19) == 1      # counted, not taken out
            assert addresses.repair_off([os.getpid()]) == 1
            assert ours.getsockopt(socket.SOL_TCP, 19) == 0
            ours.sendall(b"x")
            assert theirs.recv(1) == b"x"                   # it talks again
            assert addresses.repair_off([os.getpid()]) == 0     # and nothing else is touched


def test_every_port_the_tree_holds_is_found_at_any_address_and_one_taken_here_is_said_with_its_holder():
    with socket.socket() as anywhere, socket.socket() as loopback, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as connected_only:
        anywhere.bind(("0.0.0.0", 0))
        anywhere.listen()
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        udp.bind(("127.0.0.1", 0))
        connected_only.bind(("127.0.0.1", 0))      # bound, never listening: no port CRIU binds as a listener
        held = addresses.ports([os.getpid()])
        mine = {(p.proto, p.ip, p.port) for p in held}
        assert {("tcp", "0.0.0.0", anywhere.getsockname()[1]), ("tcp", "127.0.0.1", loopback.getsockname()[1]),
                ("udp", "127.0.0.1", udp.getsockname()[1])} <= mine, mine
        assert not any(port == connected_only.getsockname()[1] for _, _, port in mine)
        # here, every one of them is taken: by this very process, which is named
        said = addresses.taken(held)
        assert len(said) == len(held), said
        assert all(f" held by {Path('/proc/self/comm').read_text().strip()} (PID {os.getpid()})" in s for s in said)
    # let go, they are free again (SO_REUSEADDR: nothing waits for TIME_WAIT)
    assert addresses.taken(held) == []


def test_a_bundle_s_bind_mounts_outside_it_are_the_sources_its_restore_needs(tmp_path):
    from livemig.runtimes import bundle
    (tmp_path / "config.json").write_text(json.dumps({"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
        {"destination": "/etc/x", "source": "/etc/x.conf", "options": ["bind", "ro"]},
        {"destination": "/inner", "type": "bind", "source": str(tmp_path / "rootfs/inner")},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid"]}]}))
    assert bundle.mount_sources(tmp_path) == ["/etc/x.conf", "/srv/data"]
    assert bundle.mount_sources(tmp_path / "nowhere") == []
