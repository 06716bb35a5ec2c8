"""The IP addresses a workload's sockets are bound to, and the ones a host has.

A tree that shares its host's network namespace keeps its sockets across a move only if
the target has their addresses: CRIU's restore binds each socket where it was bound, and
fails (EADDRNOTAVAIL) on a host without the address, after the workload was frozen and
dumped. A socket bound to the wildcard address or to loopback binds anywhere. One set to
bind to an address no interface has (IP_FREEBIND, IP_TRANSPARENT) is told apart (Bound's
freebind): CRIU binds every IPv6 socket with IP_FREEBIND set, so such a one binds
anywhere too; but it binds an IPv4 one before it sets the option again (criu/sk-inet.c,
4.2.1), so that one binds only where the target has the address or lets any be bound
(net.ipv4.ip_nonlocal_bind). Preflight compares them (preflight.compare), before anything
is touched.

A tree in a network namespace of its own (a container with its own address) brings its
addresses with it, and is left to its runtime. Read from /proc, no tool needed.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import NamedTuple

from . import proc
from .wire.protocol import Port

_LISTEN, _UDP_ANY = "0A", "07"          # TCP_LISTEN; an unconnected UDP socket (TCP_CLOSE)
_ESTABLISHED = "01"                      # TCP_ESTABLISHED
_SOCKET = re.compile(r"socket:\[(\d+)\]")


def _inodes(pids: list[int]) -> dict[int, tuple[int, int]]:
    """The tree's sockets: inode -> (PID, fd) of one process that holds it."""
    found: dict[int, tuple[int, int]] = {}
    for pid, fd, names in proc.fds(pids):
        if m := _SOCKET.fullmatch(names):
            found.setdefault(int(m.group(1)), (pid, fd))
    return found


_PIDFD_GETFD = 438      # the syscall's number, the same on every architecture (asm-generic)
_TCP_REPAIR = 19
_SOCKOPTS_ANYWHERE = ((socket.SOL_IP, 15), (socket.SOL_IP, 19),            # IP_FREEBIND, IP_TRANSPARENT
                      (socket.IPPROTO_IPV6, 78), (socket.IPPROTO_IPV6, 75))  # IPV6_FREEBIND, IPV6_TRANSPARENT


def binds_anywhere(pid: int, fd: int) -> bool:
    """Is pid's socket fd set to bind to addresses no interface has (IP_FREEBIND or
    IP_TRANSPARENT, or their IPv6 twins)? Read from a copy of the descriptor (pidfd_getfd:
    Linux 5.6); where none can be taken, False: the address is then checked like any other."""
    try:
        copy = _getfd(pid, fd)
    except OSError:     # gone, closed meanwhile, or no pidfd_getfd: the docstring's False
        return False
    with socket.socket(fileno=copy) as sock:
        for level, option in _SOCKOPTS_ANYWHERE:
            try:
                if sock.getsockopt(level, option):
                    return True
            except OSError:     # an IPv6 option on an IPv4 socket: not set, then
                pass
    return False


def _getfd(pid: int, fd: int) -> int:
    """A copy of pid's descriptor fd, in this process (pidfd_getfd: Linux 5.6); OSError if
    none can be taken."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if copy < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return copy


def in_repair(pids: list[int]) -> int:
    """How many of the processes' TCP sockets a dump left in repair mode (CRIU puts each
    established one there, when asked to carry it): none, and the dump locked no connection."""
    return sum(1 for _ in _repairing(pids))


def repair_off(pids: list[int]) -> int:
    """Every TCP socket of the processes that a lazy dump left in repair mode (CRIU takes them
    out only before serving pages: process.unlock_network) taken out, as CRIU's own unlock
    does (TCP_REPAIR off, which probes the peer's window); how many."""
    done = 0
    for sock in _repairing(pids):
        try:
            sock.setsockopt(socket.SOL_TCP, _TCP_REPAIR, 0)
        except OSError:     # closed meanwhile: nothing left to unlock
            continue
        done += 1
    return done


def _repairing(pids: list[int]) -> Iterator[socket.socket]:
    """Copies (pidfd_getfd) of the processes' TCP sockets in repair mode, each closed once
    the caller is done with it."""
    for pid, fd, name in proc.fds(pids):
        if not name.startswith("socket:"):
            continue
        try:
            sock = socket.socket(fileno=_getfd(pid, fd))
        except OSError:     # closed, or its process gone, meanwhile: not one to unlock
            continue
        with sock:
            try:
                repairing = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM \
                    and sock.getsockopt(socket.SOL_TCP, _TCP_REPAIR)
            except OSError:     # not a TCP socket after all: not one to unlock
                continue
            if repairing:
                yield sock


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp's address: 32-bit words, each in the host's byte order (little-endian here)."""
    raw = bytes.fromhex(hex_ip)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def _rows(text: str, inodes: Container[int], states: tuple[str, ...]) -> list[list[str]]:
    """The fields of a /proc/net/{tcp,udp}[6] table's sockets that are among inodes, in one of states."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 10 and f[3] in states and int(f[9]) in inodes:
            out.append(f)
    return out


def _endpoint(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """A table's "address:port" (an IPv4 address mapped into IPv6 told as IPv4)."""
    ip_hex, port_hex = field.split(":")
    ip = _address(ip_hex)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip, int(port_hex, 16)


class Bound(NamedTuple):
    """A socket of the tree bound to an address that only some hosts have."""
    ip: str
    port: int
    freebind: bool = False      # set to bind to addresses no interface has (binds_anywhere)


def parse_table(text: str, inodes: Container[int], states: tuple[str, ...],
                anywhere: Callable[[int], bool] = lambda inode: False) -> set[Bound]:
    """The sockets in a /proc/net/{tcp,udp}[6] table that are among inodes, in one of
    states, and bound to an address that only some hosts have; anywhere(inode) says
    whether one is set to bind to any address."""
    return {b for f in _rows(text, inodes, states) if (b := _bound(f, anywhere)) is not None}


def _bound(row: list[str], anywhere: Callable[[int], bool]) -> Bound | None:
    """A table's row as a Bound, None where its address binds on any host."""
    ip, port = _endpoint(row[1])
    return None if ip.is_unspecified or ip.is_loopback else Bound(str(ip), port, anywhere(int(row[9])))


def parse_connections(text: str, inodes: Container[int]) -> set[tuple[str, int, str, int]]:
    """(address, port, peer's address, peer's port) of the established TCP connections in a
    /proc/net/tcp[6] table that are among inodes."""
    out = set()
    for f in _rows(text, inodes, (_ESTABLISHED,)):
        (ip, port), (peer, peer_port) = _endpoint(f[1]), _endpoint(f[2])
        out.add((str(ip), port, str(peer), peer_port))
    return out


def connected(pids: list[int]) -> list[tuple[str, int, str, int]]:
    """The tree's established TCP connections, as parse_connections tells them, in its own
    network namespace's tables (a container's too): a move without --tcp-established
    closes them in the copy (criu.connections_closed)."""
    inodes = _inodes(pids) if pids else {}
    if not inodes:
        return []
    out: set[tuple[str, int, str, int]] = set()
    for table in ("tcp", "tcp6"):
        try:
            out |= parse_connections(Path(f"/proc/{pids[0]}/net/{table}").read_text(), inodes)
        except OSError:     # a table this kernel lacks (no IPv6), or the tree's root gone: none there
            pass
    return sorted(out)


_BOUND_TABLES = (("tcp", (_LISTEN,)), ("tcp6", (_LISTEN,)), ("udp", (_UDP_ANY,)), ("udp6", (_UDP_ANY,)))


def own_network(pids: list[int]) -> bool:
    """Is the tree in a network namespace of its own (not this host's)?"""
    try:
        return bool(pids) and os.stat(f"/proc/{pids[0]}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    except OSError:     # its root is gone: the dump will say so; nothing of its own to tell
        return False


def _bound_rows(pids: list[int]) -> Iterator[tuple[str, list[str], dict[int, tuple[int, int]]]]:
    """(table, its row, the tree's sockets) of every socket the tree listens on (TCP) or
    receives on (UDP), in this host's network namespace; none for a tree in one of its own,
    which its runtime brings along with its addresses and ports."""
    if not pids or own_network(pids):
        return
    inodes = _inodes(pids)
    for table, states in _BOUND_TABLES if inodes else ():
        try:
            text = Path(f"/proc/{pids[0]}/net/{table}").read_text()
        except OSError:     # a table this kernel lacks (no IPv6): no socket of that kind
            continue
        for row in _rows(text, inodes, states):
            yield table, row, inodes


def held(pids: list[int]) -> list[Bound]:
    """Every socket the tree listens on (TCP) or receives on (UDP) at an address of this
    host's own, or one no host need have (freebind); none for a tree in a network namespace
    of its own."""
    out: set[Bound] = set()
    for _, row, inodes in _bound_rows(pids):
        if (b := _bound(row, lambda inode: binds_anywhere(*inodes[inode]))) is not None:   # noqa: B023 (called at once)
            out.add(b)
    return sorted(out)


def ports(pids: list[int]) -> list[Port]:
    """Every port the tree holds, at any address: CRIU's restore binds each again, and fails
    (EADDRINUSE) where another socket holds it, after the freeze and the dump."""
    return sorted({Port(table.rstrip("6"), str(ip), port)
                   for table, row, _ in _bound_rows(pids) for ip, port in [_endpoint(row[1])]},
                  key=lambda p: (p.port, p.proto, p.ip))


def taken(wanted: list[Port]) -> list[str]:
    """Of wanted, those this host would not let the restore bind, each said with what holds
    it: bound here the way CRIU binds it (SO_REUSEADDR set, as criu/sk-inet.c sets it on every
    socket it restores), and let go at once. One whose address this host lacks is left to the
    addresses' own check (binds_here)."""
    out = []
    for want in wanted:
        family = socket.AF_INET6 if ":" in want.ip else socket.AF_INET
        kind = socket.SOCK_STREAM if want.proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(family, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((want.ip, want.port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    out.append(f"{want.port}/{want.proto} on {want.ip}{_holder(want)}")
    return out


def _holder(want: Port) -> str:
    """What holds want's port here, said as ' held by NAME (PID N)'; "" where none is found."""
    inodes = set()
    for table, states in _BOUND_TABLES:
        if table.startswith(want.proto):
            try:
                text = Path(f"/proc/net/{table}").read_text()
            except OSError:     # a table this kernel lacks: no holder there
                continue
            inodes |= {int(f[9]) for f in _rows(text, _Any(), states) if _endpoint(f[1])[1] == want.port}
    held = _inodes(sorted(int(d) for d in os.listdir("/proc") if d.isdigit())) if inodes else {}
    for pid, _ in (held[i] for i in sorted(inodes) if i in held):
        try:
            return f" held by {Path(f'/proc/{pid}/comm').read_text().strip()} (PID {pid})"
        except OSError:     # it exited meanwhile: its PID alone says who
            return f" held by PID {pid}"
    return ""


class _Any:
    """Contains every inode: _rows over a whole table."""
    def __contains__(self, _: object) -> bool:
        return True


def parse_fib_trie(text: str) -> set[str]:
    """The host's own IPv4 addresses: the entries /proc/net/fib_trie marks "/32 host LOCAL"."""
    out, last = set(), None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("|--", "+--")):
            last = s.split()[1]
        elif s == "/32 host LOCAL" and last is not None:
            out.add(last)
    return out


def parse_if_inet6(text: str) -> set[str]:
    return {str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))) for line in text.splitlines() if line.strip()}


def nonlocal_bind() -> bool:
    """Does this host let IPv4 sockets bind to addresses it does not have
    (net.ipv4.ip_nonlocal_bind)?"""
    try:
        return Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() == "1"
    except OSError:     # no such setting here: binding follows the addresses alone
        return False


def binds_here(bound: Bound, local: list[str], nonlocal_ok: bool) -> bool:
    """Will CRIU's restore bind this socket on a host with these addresses (local) and
    net.ipv4.ip_nonlocal_bind (nonlocal_ok)? See the module's docstring."""
    if bound.ip in local:
        return True
    return bound.freebind and (":" in bound.ip or nonlocal_ok)


def local() -> list[str]:
    """Every address this host's network namespace has."""
    out: set[str] = set()
    for path, parse in (("/proc/net/fib_trie", parse_fib_trie), ("/proc/net/if_inet6", parse_if_inet6)):
        try:
            out |= parse(Path(path).read_text())
        except OSError:     # a table this kernel lacks (no IPv6): no address of that kind
            pass
    return sorted(out)
