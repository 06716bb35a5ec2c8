"""A container's own network, kept quiet while two copies of it exist: both halves, the
source's (close, then speak again on a rollback) and the target's (quiet from within its
restore, speak at its Resume).

A container in a network namespace of its own, on a macvlan or ipvlan link, is on the link as
a host of its own, at its address and MAC. While a move has two copies of it (the source's,
frozen or paused; the target's, restored and stopped), each copy's kernel would answer for
it: acknowledge a peer's packet for a process that is stopped (data the other copy then never
sees), answer ARP with the MAC both copies have (and so take the switch's entry for it), and,
as a copy is deleted, reset its connections (seen in the lab: test_podman_network.py's move
killed before its commit). So the copy that does not run sends and takes nothing but on
loopback: peers send again, and reach whichever copy runs, which tells the link where it is
(a gratuitous ARP, an unsolicited neighbour advertisement) as it speaks.

- **The target's copy** is closed from within its restore, before CRIU lets its connections
  out of repair: by CRIU's post-restore action (podman's, crun's: at_post_restore), or as its
  namespace is made (runc's: oci_networks.py makes its links then).
- **The source's copy** (runc and crun leave it paused, its namespace alive) is closed once
  paused, before its dump (close), and speaks again if the move rolls back, or when `livemig
  recover` resumes it (runtimes/held.py).

Before its restore the target's copy is hushed too (hush), from the host's side: its link
comes up during its runtime's restore (podman's network backend makes it before CRIU restores
anything; crun's CRIU, before the post-restore action closes it), and a peer's retransmission
that reached it then was answered with a reset, no socket being restored yet (seen in the lab:
docs/modes.md). A table on the egress of the link's parent (nftables, netdev family) drops every
IP packet from the copy's addresses until its Resume (unhush), or until it goes.

A copy that goes (the source's at the commit, a target's never run) has its links deleted
first (unlink): its namespace would outlive it for minutes, and its MAC with it. None of this
ever touches the host's own network namespace, which a container may share.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
from pathlib import Path

from .. import host, netns, proc, service_address
from ..errors import CommandFailed, LivemigError, Phase
from ..wire import protocol as p

TABLE = "livemig-quiet"
HUSH = "livemig-hush"     # + the address: a copy kept off the link from the host (hush)
# inet: every IPv4 and IPv6 packet but loopback's (ND among them); arp: ARP both ways
RULES = f"""table inet {TABLE} {{
  chain in {{ type filter hook input priority -300 ; policy drop ; iif "lo" accept ; }}
  chain out {{ type filter hook output priority -300 ; policy drop ; oif "lo" accept ; }}
}}
table arp {TABLE} {{
  chain in {{ type filter hook input priority -300 ; policy drop ; }}
  chain out {{ type filter hook output priority -300 ; policy drop ; }}
}}
"""


def tools(names: tuple[str, ...] = ("nsenter", "nft", "ip")) -> dict[str, str]:
    """The programs a quiet copy needs here (nsenter, nft, ip) -> their paths. Raises where one
    is missing."""
    found = {name: shutil.which(name) for name in names}
    if missing := [name for name, path in found.items() if path is None]:
        raise LivemigError(f"this host lacks {' and '.join(missing)}, which keep a container's own network quiet "
                           "while two copies of it exist", phase=Phase.RESTORE)
    return {name: str(path) for name, path in found.items()}


def rules_file(work: Path) -> Path:
    path = work / "quiet.nft"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(RULES)
    return path


def script(work: Path, name: str, action: str, body: str) -> str:
    """The CRIU configuration line for an action script (in work, root's alone) that runs body
    at action alone, with $NET the restored copy's network namespace; what it says on stderr
    goes to its name + .err there (failed(), for the restore's error)."""
    path = work / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, "w") as f:
        f.write(f"#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = {action} ] || exit 0\nset -e\n"
                f"exec 2>>{path}.err\nNET=/proc/\"$CRTOOLS_INIT_PID\"/ns/net\n{body}")
    return f"action-script {path}\n"


def at_post_restore(work: Path) -> str:
    """The CRIU configuration line that makes the copy quiet within its restore: at
    post-restore, which CRIU runs before it unlocks the network and lets the connections out
    of repair. Raises where this host lacks what it runs."""
    t = tools()
    return script(work, "quiet-at-restore", "post-restore",
                  f"exec {t['nsenter']} --net=\"$NET\" {t['nft']} -f {rules_file(work)}\n")


def failed(work: Path) -> str:
    """What a script of script()'s in work said last on stderr, as it failed; "" if nothing."""
    for err in sorted(work.glob("*.err")):
        lines = err.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1]
    return ""


def in_network(pid: int, *argv: str) -> list[str]:
    """argv run in pid's network namespace (and in this host's mounts: /sys stays this host's)."""
    return ["nsenter", f"--net=/proc/{pid}/ns/net", *argv]


async def close(pid: int) -> None:
    """pid's network namespace quiet (the source's copy, paused)."""
    await proc.run(in_network(pid, "nft", "-f", "-"), input=RULES.encode(),
                   phase=Phase.FINAL_DUMP)


async def speak(pid: int) -> str:
    """pid's network as it was, and the link told where its addresses are (the copy runs
    now); what could not be done, else "". A namespace not quiet is left as it is, and this
    host's own (a container that shares it) is never looked at. Both tables go in one nft
    call that deletes what is there (destroy), while its addresses are read beside it: each
    program started here costs tens of milliseconds, all of them in the downtime."""
    if host.same_netns(pid):
        return ""
    try:
        async with asyncio.TaskGroup() as tg:
            opening, reading = tg.create_task(_open(pid)), tg.create_task(_addresses(pid))
    except BaseExceptionGroup as group:
        failed = group.exceptions[0]
        if isinstance(failed, CommandFailed):   # no nsenter, nft or ip here: nothing of ours was made quiet by them
            return f"its network could not be looked at: {failed}"
        raise failed from None
    said, addresses = opening.result(), reading.result()
    try:
        def announce_each() -> None:
            for address, device, mac in addresses:
                # (its MAC as the namespace has it: /sys is livemig's own namespace's)
                service_address.announce(address, device, mac)
        await netns.run_in(pid, announce_each)
    except (OSError, LivemigError) as e:       # it runs, and peers learn its place as it talks
        said.append(f"its addresses were not announced: {e}")
    return "; ".join(said)


_DESTROY = "".join(f"destroy table {family} {TABLE}\n" for family in ("inet", "arp"))


async def _open(pid: int) -> list[str]:
    """pid's quiet tables gone, if there: what could not be done. An nft older than destroy
    (1.0.8) lists the tables, and deletes those there one by one."""
    res = await proc.run(in_network(pid, "nft", "-f", "-"), input=_DESTROY.encode(), check=False)
    if res.returncode == 0:
        return []
    listed = await proc.run(in_network(pid, "nft", "list", "tables"), check=False)
    said = []
    for family in ("inet", "arp"):
        if f"table {family} {TABLE}" not in listed.text:
            continue
        res = await proc.run(in_network(pid, "nft", "delete", "table", family, TABLE), check=False)
        if res.returncode != 0:
            said.append(f"its network stays closed ({family}): {proc.why(res.stderr)}")
    return said


async def unlink(pid: int) -> None:
    """The links of pid's network namespace (but loopback) deleted: its copy is about to go.
    Killed, it would leave its namespace behind for minutes, held by its connections' sockets
    as they try to say goodbye (which the quiet namespace drops), and with it its links' MAC on
    their parent: the next copy to come here with it could not bring its link up (EADDRINUSE).
    Never this host's own namespace (a container that shares it)."""
    if host.same_netns(pid):
        return
    for link in await _links(pid):
        if link.get("ifname") != "lo":
            # (gone already, or with its namespace: nothing left to free)
            await proc.run(in_network(pid, "ip", "link", "delete", link["ifname"]),
                           check=False)


async def _links(pid: int) -> list[dict]:
    res = await proc.run(in_network(pid, "ip", "-j", "address", "show"), check=False)
    try:
        return json.loads(res.stdout) if res.returncode == 0 else []
    except ValueError:      # nothing readable: as if it had none
        return []


async def _addresses(pid: int) -> list[tuple[str, str, str]]:
    """(ADDRESS/PREFIX, device, its MAC) of every global address in pid's network namespace."""
    return [(f"{a['local']}/{a['prefixlen']}", link["ifname"], link.get("address", ""))
            for link in await _links(pid) if link.get("ifname") != "lo"
            for a in link.get("addr_info", []) if a.get("scope") == "global"]


def hushes_of(c: p.Container, parents: dict[str, str]) -> list[tuple[str, str]]:
    """(parent interface, ADDRESS/PREFIX) of each address the container c has on a link of a
    parent's, where its link comes up before its restore closes it: its podman networks'
    (parents: podman network -> its interface here), crun's own network's links. Not runc's:
    oci_networks.py closes its namespace before it makes its links."""
    if c.own_network is not None:
        return [(link.parent, a) for link in c.own_network.links if link.parent for a in link.addresses
                ] if c.runtime == "crun" else []
    return [(parents[net], a) for net, a in c.networks.items() if parents.get(net) and a]


async def hush(parent: str, address: str) -> str:
    """Nothing from address leaves this host by parent until unhush(): the hush's name (an
    nftables table of the netdev family, whose egress hook sees what parent's macvlan and
    ipvlan children send; one per address, named for it on every host: one an agent killed
    outright left behind is replaced, then taken off, by the next copy at that address)."""
    ip = ipaddress.ip_interface(address).ip
    name = f"{HUSH}-{str(ip).replace('.', '-').replace(':', '-')}"
    rules = (f"table netdev {name} {{\n  chain out {{ type filter hook egress device \"{parent}\" priority -300 ; "
             f"policy accept ; {'ip6' if ip.version == 6 else 'ip'} saddr {ip} drop ; }}\n}}\n")
    # (one left by an agent killed outright replaced: added, then deleted, whatever nft this is)
    again = f"add table netdev {name}\ndelete table netdev {name}\n"
    await proc.run(["nft", "-f", "-"], input=(again + rules).encode(), phase=Phase.RESTORE)
    return name


def unhush_argv(hushed: str) -> list[str]:
    return ["nft", "delete", "table", "netdev", hushed]


async def unhush(hushes: list[str]) -> None:
    """What hush() put on goes (gone already: nothing to take off)."""
    for hushed in hushes:
        await proc.run(unhush_argv(hushed), check=False)
