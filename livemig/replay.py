"""What the workload's clients send while it is frozen, taken on the source and given to the
copy that runs next: both halves, and the form the packets cross in.

A client whose request reaches a frozen workload gets no answer and no acknowledgement: the
source's copy is quiet (CRIU's network lock, runtimes/quiet.py), the target's not yet
restored or not yet told to run. Its TCP sends the request again only as its back-off allows:
about 0.2 s after, then 0.6 s, 1.4 s, 3 s. So a client that asked at the freeze waited, until
now, for the first retransmission after the resume, not for the resume: a downtime of 0.7 s
cost it 1.4 s (bench.clients, PostgreSQL's pgbench). Here the source keeps a copy of every TCP
segment that comes for the workload from just before the freeze (take), and the copy that runs
next is given them as it resumes (give): the target's at its Resume, the source's own after a
rollback. Its kernel takes what it lacks and answers at once; what it had already (a segment
that came before the freeze, a retransmission of one) it drops as any duplicate, and says so to
the peer. Nothing the client was told changes: no acknowledgement left the frozen copy.

- **Taken** by a packet socket in the workload's network namespace (its own, or the host's
  with the addresses that move with it: service_address.py), whose kernel filter keeps only
  TCP that comes in, not on loopback, for the workload's addresses. Its packets wait in the
  socket's buffer: nothing reads them while the workload is frozen, so taking costs the
  downtime nothing.
- **Given** through a raw socket in the copy's namespace: each segment is sent to its own
  destination, an address of that namespace, and so comes in by loopback, as from its client
  (its checksum made again: one taken as it came in over a veth may hold only a partial sum).
- **Crossing** in the target's Resume (wire/protocol.py), as base64, at most
  SIZES.replay_bytes of them: more is left to the client's retransmissions.

Only TCP: a datagram taken here could also have reached the source's socket before its lock,
and given again would come twice.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import netns
from .options import SIZES

_SO_ATTACH_FILTER = 26
_SO_RCVBUFFORCE = 33
_ETH_P_ALL, _ETH_P_IP, _ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
_PACKET_OUTGOING = 4
_LOOPBACK_INDEX = 1        # lo: index 1 in every network namespace
_TCP = 6
# classic BPF (linux/filter.h): opcodes, and the loads of what the kernel knows of a packet
_LD_W_ABS, _LD_B_ABS, _JEQ_K, _JA, _RET_K = 0x20, 0x30, 0x15, 0x05, 0x06
_AD_PROTOCOL, _AD_PKTTYPE, _AD_IFINDEX = -0x1000 + 0, -0x1000 + 4, -0x1000 + 8


@dataclass
class Taken:
    """The segments a frozen workload's clients sent, in the order they came, and how many
    more there were than SIZES.replay_bytes let cross."""
    packets: list[bytes] = field(default_factory=list)
    left: int = 0


def keep_only(addresses: Iterable[str]) -> bytes:
    """The kernel filter (struct sock_filter[]) that keeps TCP coming in, not on loopback, to
    one of addresses (every one, where none is given: a namespace of the workload's own)."""
    ips = [ipaddress.ip_interface(a).ip for a in addresses]
    v4, v6 = [a for a in ips if a.version == 4], [a for a in ips if a.version == 6]
    whole = not v4 and not v6
    # (code, jt, jf, k): a jump's target (jt, jf; k for ja) a label, resolved below
    prog: list[tuple[int, str | int, str | int, str | int]] = []
    labels: dict[str, int] = {}

    def at(name: str) -> None:
        labels[name] = len(prog)

    prog += [(_LD_W_ABS, 0, 0, _AD_PKTTYPE & 0xFFFFFFFF), (_JEQ_K, "drop", 0, _PACKET_OUTGOING),
             (_LD_W_ABS, 0, 0, _AD_IFINDEX & 0xFFFFFFFF), (_JEQ_K, "drop", 0, _LOOPBACK_INDEX),
             (_LD_W_ABS, 0, 0, _AD_PROTOCOL & 0xFFFFFFFF), (_JEQ_K, "v4", 0, _ETH_P_IP),
             (_JEQ_K, "v6", "drop", _ETH_P_IPV6)]
    at("v4")
    prog += [(_LD_B_ABS, 0, 0, 9), (_JEQ_K, 0, "drop", _TCP)]
    if not whole:
        prog.append((_LD_W_ABS, 0, 0, 16))
        prog += [(_JEQ_K, "keep", 0, int(a)) for a in v4]
        prog.append((_JA, 0, 0, "drop"))
    else:
        prog.append((_JA, 0, 0, "keep"))
    at("v6")
    prog += [(_LD_B_ABS, 0, 0, 6), (_JEQ_K, 0, "drop", _TCP)]
    for n, a in enumerate(v6 if not whole else []):
        words = struct.unpack("!4I", a.packed)
        for i, w in enumerate(words):
            prog += [(_LD_W_ABS, 0, 0, 24 + 4 * i), (_JEQ_K, 0, f"next{n}", w)]
        prog.append((_JA, 0, 0, "keep"))
        at(f"next{n}")
    prog.append((_JA, 0, 0, "keep" if whole else "drop"))
    at("drop")
    prog.append((_RET_K, 0, 0, 0))
    at("keep")
    prog.append((_RET_K, 0, 0, 0xFFFFFFFF))

    def rel(i: int, to: str | int) -> int:
        return to if isinstance(to, int) else labels[to] - i - 1

    return b"".join(struct.pack("=HBBI", code, rel(i, jt), rel(i, jf), rel(i, k) if code == _JA else int(k))
                    for i, (code, jt, jf, k) in enumerate(prog))


class Taking:
    """The source's half: a packet socket in pid's network namespace, open from before the
    freeze, whose buffer holds what the workload's clients send until take() reads it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.taken = False

    @classmethod
    async def open(cls, pid: int, addresses: Iterable[str]) -> Taking:
        """Raises OSError where no packet socket can be had (no CAP_NET_RAW, no such pid)."""
        prog = keep_only(addresses)

        def made() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK,
                                 socket.htons(_ETH_P_ALL))
            try:
                buf = ctypes.create_string_buffer(prog)
                fprog = struct.pack("@HP", len(prog) // 8, ctypes.addressof(buf))
                sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
                # what came before the filter held (the namespace's every packet): not theirs
                with contextlib.suppress(BlockingIOError):
                    while True:
                        sock.recv(1 << 16)
                # room for what comes while frozen: each packet costs its buffer, not its bytes
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, SIZES.replay_socket_buffer)
            except BaseException:
                sock.close()
                raise
            return sock

        return cls(await netns.run_in(pid, made))

    def take(self) -> Taken:
        """What came since open(), up to SIZES.replay_bytes; nothing on a second call. The
        socket stays open until close(), which is slow (the kernel waits for a grace period as
        it lets go of a packet socket: 18 ms here), so that it costs the downtime nothing."""
        taken, size = Taken(), 0
        if self.taken:
            return taken
        self.taken = True
        seen: set[bytes | None] = set()
        while True:
            try:
                packet = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            key = _identity(packet)
            if key is not None and key in seen:
                continue        # a retransmission of one taken: given, it would only be dropped
            seen.add(key)
            if size + len(packet) > SIZES.replay_bytes:
                taken.left += 1
                continue
            taken.packets.append(packet)
            size += len(packet)
        return taken

    def close(self) -> None:
        self.sock.close()


def packed(packets: list[bytes]) -> list[str]:
    """As they cross, in a JSON message."""
    return [base64.b64encode(p).decode() for p in packets]


def unpacked(texts: list[str]) -> list[bytes]:
    """What packed() made; a text that is not base64 is no packet (ValueError)."""
    return [base64.b64decode(t, validate=True) for t in texts]


async def give(pid: int, packets: list[bytes]) -> int:
    """The target's half (and the source's after a rollback): packets given to the copy whose
    root is pid, in its network namespace, as from their senders; how many went. A packet that
    is not a whole TCP segment over IP, or not to an address of that namespace, is skipped: it
    came from the wire, and is checked here."""
    segments = [s for s in (_segment(p) for p in packets) if s is not None]
    if not segments:
        return 0

    def send_each() -> int:
        sent = 0
        socks: dict[int, socket.socket] = {}
        local: dict[str, bool] = {}
        try:
            for family, dest, packet in segments:
                if dest not in local:
                    local[dest] = _local(family, dest)
                if not local[dest]:
                    continue        # not the copy's: given, it would leave on the link as from its sender
                if family not in socks:
                    socks[family] = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
                # one that cannot go (its address gone meanwhile) is left to the client's retransmission
                with contextlib.suppress(OSError):
                    socks[family].sendto(packet, (dest, 0))
                    sent += 1
        finally:
            for s in socks.values():
                s.close()
        return sent

    return await netns.run_in(pid, send_each)


def _local(family: int, address: str) -> bool:
    """Is address one of this network namespace's own?"""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def _segment(packet: bytes) -> tuple[int, str, bytes] | None:
    """(family, destination, the packet with its TCP checksum made again), or None."""
    if len(packet) < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        head, total = (packet[0] & 15) * 4, struct.unpack("!H", packet[2:4])[0]
        if packet[9] != _TCP or head < 20 or not head + 20 <= total <= len(packet):
            return None
        src, dst = packet[12:16], packet[16:20]
        family = socket.AF_INET
    elif version == 6 and len(packet) >= 60:
        head, total = 40, 40 + struct.unpack("!H", packet[4:6])[0]
        if packet[6] != _TCP or not head + 20 <= total <= len(packet):
            return None
        src, dst = packet[8:24], packet[24:40]
        family = socket.AF_INET6
    else:
        return None
    seg = bytearray(packet[head:total])
    seg[16:18] = b"\0\0"
    pseudo = src + dst + (struct.pack("!xBH", _TCP, len(seg)) if version == 4 else struct.pack("!IxxxB", len(seg), _TCP))
    seg[16:18] = struct.pack("!H", _checksum(pseudo + seg))
    return family, socket.inet_ntop(family, dst), bytes(packet[:head]) + bytes(seg)


def _identity(packet: bytes) -> bytes | None:
    """What two sends of one segment share: its addresses, ports, sequence and
    acknowledgement numbers, flags and length (not its timestamps, IP id or checksum)."""
    if len(packet) >= 40 and packet[0] >> 4 == 4:
        head = (packet[0] & 15) * 4
        return packet[12:20] + packet[head:head + 14] + packet[2:4]
    if len(packet) >= 60 and packet[0] >> 4 == 6:
        return packet[8:40] + packet[40:54] + packet[4:6]
    return None


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
