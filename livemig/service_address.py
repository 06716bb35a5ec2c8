"""The service address that moves with the workload (--move-address ADDR/PREFIX), both halves.

A tree in its host's network keeps its sockets across a move only where the target has their
addresses (addresses.py), and its clients reach it there only if the address they use goes
with it. So the address moves: preflight finds it on the source (and on which interface),
an interface on its subnet on the target, and that the target does not hold it already.
After the freeze the source lets go of it (take_off); before the restore the target puts it
on (put_on, without duplicate address detection, which would hold an IPv6 address back for
a second), with a guard that keeps the target from resetting a peer whose packets come before
CRIU has restored the connection they belong to (guard). Once the copy runs, the target
announces it (announce: a gratuitous ARP, or an unsolicited neighbour advertisement for
IPv6), so that peers and switches send to its new place at once rather than when their
neighbour entries expire, and lifts the guard. A rollback takes it off the target and puts
it back on the source, announced there.

Addresses and interfaces are read from `ip -j address`; they change with `ip address`; the
guard is an nftables table of its own (`inet livemig-guard-<id>`) that drops the target's
own TCP resets from the address.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from pathlib import Path

from . import proc
from .errors import CommandFailed, LivemigError, UsageError


def parse(text: str) -> str:
    """An --move-address as given: ADDR/PREFIX, said back in its plain form; UsageError
    otherwise. The prefix is the address's on its subnet, the one the target's interface
    must be on (198.18.0.100/24)."""
    if "/" not in text:
        raise UsageError(f"{text}: give the prefix too (ADDR/PREFIX, as `ip address` shows it: 198.18.0.100/24)")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise UsageError(f"{text}: not an IP address with its prefix (ADDR/PREFIX)") from None
    if iface.ip.is_loopback or iface.ip.is_unspecified or iface.ip.is_multicast or iface.ip.is_link_local:
        raise UsageError(f"{text}: a loopback, wildcard, multicast or link-local address does not move "
                         "between hosts")
    return str(iface)


async def _links() -> list[dict]:
    res = await proc.run(["ip", "-j", "address", "show"])
    return json.loads(res.stdout or b"[]")


async def holding(address: str) -> str:
    """The interface here that has address itself ("" where none does); its prefix need
    not match: the address is held all the same."""
    ip = ipaddress.ip_interface(address).ip
    for link in await _links():
        if any(ipaddress.ip_address(a["local"]) == ip for a in link.get("addr_info", [])):
            return str(link["ifname"])
    return ""


async def on_subnet(address: str) -> str:
    """The interface here with an address on address's subnet (its prefix's), that the
    address can be put on ("" where none is)."""
    net = ipaddress.ip_interface(address).network
    for link in await _links():
        for a in link.get("addr_info", []):
            if ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network == net:
                return str(link["ifname"])
    return ""


async def put_on(address: str, device: str) -> None:
    # nodad: an IPv6 address stays tentative for a second otherwise, and CRIU's restore
    # cannot bind the workload's sockets to it meanwhile
    extra = ["nodad"] if ipaddress.ip_interface(address).version == 6 else []
    await proc.run(["ip", "address", "add", address, "dev", device, *extra])


async def take_off(address: str, device: str) -> None:
    await proc.run(["ip", "address", "del", address, "dev", device])


async def put_back(taken: dict[str, str], announce_only: bool = False) -> list[str]:
    """The service addresses taken off this host (ADDR/PREFIX -> interface) on it again, and
    announced: peers and switches send to it here again. What failed, as warnings."""
    said = []
    for address, device in taken.items():
        try:
            if not announce_only and not await holding(address):
                await put_on(address, device)
            announce(address, device)
        except (LivemigError, OSError) as e:
            said.append(f"cannot put {address} back on {device} here: {e}; `ip address add {address} dev "
                        f"{device}` does")
    return said


async def settle_in(put: dict[str, str], guarded: str) -> list[str]:
    """The copy runs: the addresses put on here for it (ADDR/PREFIX -> interface) announced,
    and the guard lifted (guarded: its tag, "" for none). What failed, as warnings: peers that
    missed an announcement learn the address's place when their neighbour entries expire."""
    said = []
    for address, device in put.items():
        try:
            announce(address, device)
        except OSError as e:
            said.append(f"cannot announce {address} on {device}: {e}")
    if guarded:
        await lift_guard(guarded)
    return said


async def let_go(put: dict[str, str], guarded: str) -> list[str]:
    """The copy goes: the addresses put on here for it taken off (the source puts them back on
    its own), and the guard lifted. What failed, as warnings."""
    if guarded:
        await lift_guard(guarded)
    said = []
    for address, device in put.items():
        try:
            await take_off(address, device)
        except LivemigError as e:
            said.append(f"cannot take {address} off {device}: {e}")
    return said


def _table(tag: str) -> str:
    return f"livemig-guard-{tag}"


async def guard(address: str, tag: str) -> None:
    """Until lift_guard: this host sends no TCP reset from address. A peer's packet that
    comes before CRIU has restored its connection would be answered with one, and the
    connection lost; dropped instead, it is sent again and finds the socket restored."""
    ip = ipaddress.ip_interface(address).ip
    family = "ip6" if ip.version == 6 else "ip"
    table = _table(tag)
    await proc.run(["nft", "add", "table", "inet", table])
    await proc.run(["nft", "add", "chain", "inet", table, "out",
                    "{ type filter hook output priority -300 ; }"])
    await proc.run(["nft", "add", "rule", "inet", table, "out", family, "saddr", str(ip),
                    "tcp", "flags", "&", "rst", "==", "rst", "drop"])


async def lift_guard(tag: str) -> None:
    """The guard goes, if there is one."""
    try:
        await proc.run(["nft", "delete", "table", "inet", _table(tag)], check=False)
    except CommandFailed:       # no nft here: there was no guard either
        pass


def announce(address: str, device: str, mac_said: str = "") -> None:
    """Tell the link where address is now: peers and switches update their entries at once.
    mac_said: device's MAC, where this thread is in another network namespace than /sys says."""
    iface = ipaddress.ip_interface(address)
    mac = bytes.fromhex((mac_said or Path(f"/sys/class/net/{device}/address").read_text()).strip().replace(":", ""))
    if iface.version == 4:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((device, 0))
            for frame in garp_frames(iface.ip.packed, mac):
                s.send(frame)
    else:
        index = socket.if_nametoindex(device)
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            s.bind((str(iface.ip), 0, 0, index))
            # the kernel fills in an ICMPv6 socket's checksum
            s.sendto(unsolicited_na(iface.ip.packed, mac), ("ff02::1", 0, 0, index))


def garp_frames(ip: bytes, mac: bytes) -> list[bytes]:
    """A gratuitous ARP for ip at mac, as a request and as a reply (RFC 5227's announcement is
    the request; some peers heed only the reply), broadcast."""
    head = b"\xff" * 6 + mac + b"\x08\x06"
    arp = struct.Struct("!HHBBH6s4s6s4s")
    return [head + arp.pack(1, 0x0800, 6, 4, op, mac, ip, b"\x00" * 6 if op == 1 else b"\xff" * 6, ip)
            for op in (1, 2)]


def unsolicited_na(ip: bytes, mac: bytes) -> bytes:
    """An unsolicited neighbour advertisement of ip at mac (RFC 4861 4.4): the Override flag
    set, Solicited not, with the target's link-layer address; its checksum left for the kernel."""
    return struct.pack("!BBHI16sBB6s", 136, 0, 0, 0x20000000, ip, 2, 1, mac)
