"""A podman container's own network: can its address, and the connections on it, be the same
on the target? Both halves: what each host defines (`defined`, run on either), and the
judgement, made on the source (`judged`).

A container in a network namespace of its own (podman's default) has its addresses from its
networks. podman's checkpoint keeps them, and its restore gives them back where the target
defines the same network, so that CRIU's TCP repair finds the connections' address there.
Whether peers then reach it there depends on the network's kind:

- **macvlan and ipvlan**: the container is on its parent interface's link, as a host of its
  own. Where both hosts' parents are on one link (one L2 segment), its address answers on the
  target as it did here, and its connections go on (tests/test_podman_network.py). The target
  must define the network alike (driver, subnets) on an interface it has.
- **bridge** (podman's default network among them): the address is on a bridge podman made on
  this host, behind this host's NAT; peers reach it through this host alone. A copy on the
  target gets the same address on another host's bridge, which nobody outside reaches the same
  way: its connections cannot be kept, and `--tcp-established` is refused before anything is
  touched, saying so.
"""

from __future__ import annotations

import json
import os

from .. import proc
from ..wire import protocol as p

SHARED_LINK = ("macvlan", "ipvlan")      # drivers that put the container on its parent's link


def attached(found: dict) -> dict[str, str]:
    """The networks the container (`podman inspect`'s object) is on: name -> its address there."""
    nets = (found.get("NetworkSettings") or {}).get("Networks") or {}
    return {name: (n or {}).get("IPAddress", "") for name, n in sorted(nets.items())}


async def defined(networks: dict[str, str]) -> list[p.PodmanNetwork]:
    """Those of a container's networks (name -> its address there: attached()) that this host's
    podman defines, as it defines them."""
    if not networks:
        return []
    res = await proc.run(["podman", "network", "ls", "--format", "json"], check=False)
    try:
        every = json.loads(res.stdout) if res.returncode == 0 else []
    except ValueError:      # nothing readable: as if it defined none (the rows then say so)
        every = []
    out = []
    for n in every:
        if n.get("name") in networks:
            iface = n.get("network_interface", "")
            out.append(p.PodmanNetwork(
                n["name"], n.get("driver", ""), sorted(s.get("subnet", "") for s in n.get("subnets") or []), iface,
                # a bridge podman makes as its first container starts; a parent must be here
                interface_here=n.get("driver") not in SHARED_LINK or os.path.exists(f"/sys/class/net/{iface}"),
                address=networks[n["name"]]))
    return out


def judged(container: str, here: list[p.PodmanNetwork], there: list[p.PodmanNetwork],
           keeps_connections: bool) -> list[tuple[bool, str, str, bool]]:
    """(ok, what, what to do, whether the target is where to do it) for each network of the
    container's, where its connections are to be kept (--tcp-established); none otherwise
    (podman gives the copy an address of the target's, and its connections are not asked for)."""
    if not keeps_connections:
        return []
    theirs = {n.name: n for n in there}
    return [_judged(container, n, theirs.get(n.name)) for n in here]


def _judged(container: str, n: p.PodmanNetwork, t: p.PodmanNetwork | None) -> tuple[bool, str, str, bool]:
    said = f"{n.driver} on {n.interface}, {', '.join(n.subnets)}"
    if n.driver not in SHARED_LINK:
        what = (f"container {container} has {n.address or 'its address'} on podman network {n.name} ({said}): "
                "peers reach it through this host alone, so no other host can keep its connections")
        return False, what, ("put it on a macvlan or ipvlan network both hosts define alike, on one link; or "
                             "move it without --tcp-established once its connections are closed"), False
    if t is None:
        subnets = " ".join(f"--subnet {s}" for s in n.subnets)
        create = f"podman network create -d {n.driver} -o parent={n.interface} {subnets} {n.name}"
        return False, f"the target has no podman network {n.name} ({said}), where {n.address} belongs", \
            f"define it there alike: {create}", True
    if (t.driver, t.subnets) != (n.driver, n.subnets):
        what = (f"podman network {n.name} is {t.driver}, {', '.join(t.subnets)} on the target, "
                f"{n.driver}, {', '.join(n.subnets)} here")
        return False, what, "define it alike on both hosts", True
    if not t.interface_here:
        return False, f"the target has no interface {t.interface}, podman network {n.name}'s parent", \
            "create the network there on the interface on this one's link", True
    return True, (f"{n.name} ({said}) on both hosts: {n.address} stays the container's, its connections "
                  "with it, where both parents are on one link"), "", True
