"""A tree's Unix stream sockets and where their other ends are, as the kernel says (sock_diag).

CRIU dumps a connected stream socket only with its peer: one whose other end is held outside
the tree fails the dump ("Can't dump half of stream unix connection"), after the freeze. The
preflight asks here first. The commonest such peer is journald's: a service's stdout and
stderr are a stream to /run/systemd/journal/stdout (units.py carries those across); any
other is refused before the freeze.

/proc/net/unix names each socket but not its peer: the netlink sock_diag interface
(linux/unix_diag.h) says both, for every Unix socket of this network namespace in one dump.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from . import proc

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_UDIAG_SHOW_NAME, _UDIAG_SHOW_PEER = 0x1, 0x4
_UNIX_DIAG_NAME, _UNIX_DIAG_PEER = 0, 2
_STREAMS = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
_NLMSG = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBHIIIII")     # unix_diag_req
_MSG = struct.Struct("=BBBBIII")          # unix_diag_msg
_ATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class UnixSocket:
    inode: int
    peer: int            # the inode of its other end (0: none, as a listener's)
    name: str            # the address it is bound to ("" unbound; "@..." abstract)


def every_socket() -> dict[int, UnixSocket]:
    """Every Unix stream or seqpacket socket of this network namespace, by inode."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        req = _REQUEST.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, _UDIAG_SHOW_NAME | _UDIAG_SHOW_PEER,
                            0xFFFFFFFF, 0xFFFFFFFF)
        nl.sendto(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP,
                              1, 0) + req, (0, 0))
        found: dict[int, UnixSocket] = {}
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, off)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, off + _NLMSG.size)[0]
                    raise OSError(err, f"sock_diag: {os.strerror(err)}")
                _read_one(data[off + _NLMSG.size:off + length], found)
                off += (length + 3) & ~3


def _read_one(msg: bytes, found: dict[int, UnixSocket]) -> None:
    _, kind, _, _, inode, _, _ = _MSG.unpack_from(msg, 0)
    if kind not in _STREAMS:
        return
    peer, name, off = 0, "", _MSG.size
    while off + _ATTR.size <= len(msg):
        length, attr = _ATTR.unpack_from(msg, off)
        if length < _ATTR.size:
            break
        value = msg[off + _ATTR.size:off + length]
        if attr == _UNIX_DIAG_PEER:
            peer = struct.unpack("=I", value[:4])[0]
        elif attr == _UNIX_DIAG_NAME:
            name = "@" + value[1:].decode(errors="replace") if value[:1] == b"\0" else \
                value.rstrip(b"\0").decode(errors="replace")
        off += (length + 3) & ~3
    found[inode] = UnixSocket(inode, peer, name)


def held(pids: list[int]) -> set[int]:
    """The inodes of every socket the processes hold as file descriptors."""
    return {int(name[8:-1]) for _, _, name in proc.fds(pids) if name.startswith("socket:[")}


def outward(pids: list[int]) -> list[tuple[UnixSocket, UnixSocket]]:
    """The tree's connected stream sockets whose other end is held by none of its processes:
    each with its peer (whose name says what it is connected to)."""
    mine = held(pids)
    if not mine:
        return []
    every = every_socket()
    out = []
    for inode in sorted(mine):
        sk = every.get(inode)
        if sk is None or not sk.peer or sk.peer in mine:
            continue
        out.append((sk, every.get(sk.peer) or UnixSocket(sk.peer, 0, "")))
    return out


def bound_paths(pids: list[int]) -> list[str]:
    """The filesystem paths the tree's Unix stream sockets are bound to (not abstract names):
    a restore binds each again, making its file where there is none."""
    mine = held(pids)
    if not mine:
        return []
    return sorted({sk.name for inode, sk in every_socket().items() if inode in mine and sk.name.startswith("/")})
