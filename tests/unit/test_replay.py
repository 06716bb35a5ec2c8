"""replay.py's logic: the kernel filter that keeps what a frozen workload's clients send (run
here by a small interpreter of the classic BPF it is made of), the segments given again with
their checksums made whole, a retransmission known as the segment it repeats, and the form
they cross in. The lab proves the whole (tests/test_oci_network.py, tests/test_database.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import socket
import struct

import pytest

from livemig import replay

OUTGOING, HOST = 4, 0


def _run(prog: bytes, packet: bytes, protocol: int, pkttype: int = HOST, ifindex: int = 2) -> int:
    """What the kernel's filter returns for packet: 0 drops it."""
    code = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    ancillary = {0xFFFFF000: protocol, 0xFFFFF004: pkttype, 0xFFFFF008: ifindex}
    a, pc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == 0x20:          # ld [k], 4 bytes, or what the kernel knows
            a = ancillary[k] if k in ancillary else struct.unpack("!I", packet[k:k + 4])[0]
        elif op == 0x30:        # ldb [k]
            a = packet[k]
        elif op == 0x15:        # jeq #k
            pc += jt if a == k else jf
        elif op == 0x05:        # ja
            pc += k
        elif op == 0x06:        # ret #k
            return k
        else:
            raise AssertionError(f"opcode {op:#x}")


def _v4(src: str, dst: str, proto: int = 6, payload: bytes = b"next\n", seq: int = 1000, ident: int = 1,
        tsval: int = 7) -> bytes:
    options = struct.pack("!BBBBII", 1, 1, 8, 10, tsval, 0)      # NOP NOP timestamps
    tcp = struct.pack("!HHIIBBHHH", 40000, 7000, seq, 55, (5 + 3) << 4, 0x18, 512, 0xBEEF, 0) + options + payload
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ident, 0x4000, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    return head + tcp


def _v6(src: str, dst: str, payload: bytes = b"next\n") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 7000, 1, 55, 5 << 4, 0x18, 512, 0xBEEF, 0) + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + tcp


def test_the_filter_keeps_tcp_coming_in_to_a_moved_address_alone():
    prog = replay.keep_only(["198.18.0.100/24", "2001:db8::64/64"])
    kept = _v4("198.18.0.3", "198.18.0.100")
    assert _run(prog, kept, 0x0800) != 0
    assert _run(prog, _v6("2001:db8::3", "2001:db8::64"), 0x86DD) != 0
    for packet, protocol, pkttype, ifindex in [
        (_v4("198.18.0.3", "198.18.0.7"), 0x0800, HOST, 2),               # another address of this host
        (_v4("198.18.0.3", "198.18.0.100", proto=17), 0x0800, HOST, 2),   # a datagram
        (kept, 0x0800, OUTGOING, 2),                                      # going out
        (kept, 0x0800, HOST, 1),                                          # on loopback
        (kept, 0x0806, HOST, 2),                                          # not IP
        (_v6("2001:db8::3", "2001:db8::65"), 0x86DD, HOST, 2),            # differs in its last word
    ]:
        assert _run(prog, packet, protocol, pkttype, ifindex) == 0, (packet, protocol, pkttype, ifindex)


def test_in_a_namespace_of_the_workload_s_own_every_tcp_coming_in_is_kept():
    prog = replay.keep_only([])
    assert _run(prog, _v4("198.18.0.3", "198.18.0.150"), 0x0800) != 0
    assert _run(prog, _v6("2001:db8::3", "2001:db8::99"), 0x86DD) != 0
    assert _run(prog, _v4("198.18.0.3", "198.18.0.150", proto=17), 0x0800) == 0
    assert _run(prog, _v4("198.18.0.3", "198.18.0.150"), 0x0800, ifindex=1) == 0


def _sum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@pytest.mark.parametrize("packet", [_v4("198.18.0.3", "198.18.0.100", payload=b"odd"),
                                    _v6("2001:db8::3", "2001:db8::64")])
def test_a_segment_is_given_with_a_whole_checksum_to_its_own_destination(packet):
    family, dest, given = replay._segment(packet + b"\0\0")     # (what the link padded it with is not TCP's)
    if family == socket.AF_INET:
        head, src, dst = 20, given[12:16], given[16:20]
        pseudo = src + dst + struct.pack("!xBH", 6, len(given) - head)
    else:
        head, src, dst = 40, given[8:24], given[24:40]
        pseudo = src + dst + struct.pack("!IxxxB", len(given) - head, 6)
    assert dest == str(ipaddress.ip_address(dst))
    assert len(given) == len(packet) and given[:head] == packet[:head]
    assert _sum(pseudo + given[head:]) == 0xFFFF      # the receiver's check: all ones


def test_what_is_not_a_whole_tcp_segment_is_not_given():
    whole = _v4("198.18.0.3", "198.18.0.100")
    for broken in (whole[:30], _v4("198.18.0.3", "198.18.0.100", proto=17), b"\x60" + whole[1:], b""):
        assert replay._segment(broken) is None


def test_a_retransmission_is_known_as_the_segment_it_repeats():
    first = replay._identity(_v4("198.18.0.3", "198.18.0.100", ident=1, tsval=7))
    assert first == replay._identity(_v4("198.18.0.3", "198.18.0.100", ident=9, tsval=300))
    assert first != replay._identity(_v4("198.18.0.3", "198.18.0.100", seq=1005))


def test_packets_cross_as_they_were_and_what_is_not_base64_is_refused():
    packets = [_v4("198.18.0.3", "198.18.0.100"), _v6("2001:db8::3", "2001:db8::64")]
    assert replay.unpacked(replay.packed(packets)) == packets
    with pytest.raises(ValueError):
        replay.unpacked(["not base64!"])


def test_what_came_is_taken_once_in_order_its_retransmissions_dropped_and_past_the_room_left(monkeypatch):
    """take() on a socket holding what came (a datagram socket stands for the packet socket):
    each segment once, in order, up to SIZES.replay_bytes (the rest counted, not taken), and
    nothing on a second call."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.setblocking(False)
    first, second = _v4("198.18.0.3", "198.18.0.100", seq=1000), _v4("198.18.0.3", "198.18.0.100", seq=1005)
    late = _v4("198.18.0.3", "198.18.0.100", seq=1010)
    for packet in (first, _v4("198.18.0.3", "198.18.0.100", seq=1000, ident=2, tsval=99), second, late):
        ours.send(packet)
    monkeypatch.setattr(replay, "SIZES", dataclasses.replace(replay.SIZES, replay_bytes=len(first) + len(second)))
    taking = replay.Taking(theirs)
    try:
        taken = taking.take()
        assert (taken.packets, taken.left) == ([first, second], 1)
        ours.send(late)
        assert taking.take() == replay.Taken()
    finally:
        taking.close()
        ours.close()


def test_a_segment_for_an_address_not_of_the_copy_s_namespace_is_not_given():
    """Given, it would leave on the link as from its sender: it is skipped, and nothing is sent."""
    assert asyncio.run(replay.give(os.getpid(), [_v4("198.18.0.3", "198.18.200.9")])) == 0
