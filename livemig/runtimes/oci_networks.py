"""A runc or crun container's own network namespace, made again on the target. Both halves:
what the namespace holds (`own_network`, on the source), the judgement (`judged`, on the
source), and the target's side (`parents_missing`, `at_restore`).

A container in a network namespace of its own has what was put there as it started (by hand
after `runc create`, by a hook, by a tool of the operator's). Its runtime's checkpoint does not
carry it alike:

- **runc** restores the namespace empty: its checkpoint tells CRIU to leave the namespace's
  contents out (CRIU's empty-ns, for the network always: "runc doesn't manage network
  devices"), so a copy would come up with no link, loopback down. The bundle's hooks (prestart,
  createRuntime), which runc runs at the restore as at the start, make it again where they
  made it first. Where it has none, livemig makes the links again as the namespace is made
  (CRIU's setup-namespaces action, before any socket is restored): each macvlan and ipvlan
  link on the target's interface of its parent's name, with its MAC, MTU and addresses;
  loopback up; its routes.
- **crun** leaves it to CRIU, which dumps the namespace and makes it again, a macvlan link
  only on a parent it is told (`external macvlan[NAME]:PARENT`): livemig tells it.

Either way the container's address and MAC are the same on the target. Where both hosts'
parents are on one link (one L2 segment), peers reach it there, and with --tcp-established
its connections go on (tests/test_oci_network.py, PostgreSQL's clients among them:
tests/test_database.py). What livemig cannot make again (a veth, whose other end is on this
host; a link CRIU does not dump) is refused before anything is touched. While both copies
exist, the one that does not run is kept quiet (quiet.py).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from pathlib import Path

from .. import host, proc
from ..errors import LivemigError, Phase
from ..wire import protocol as p
from . import quiet

MADE_AGAIN = {"runc": ("macvlan", "ipvlan"), "crun": ("macvlan",)}     # by livemig (runc), by CRIU (crun)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")            # an interface's name, as the kernel allows
_MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}\Z")
_WORD = re.compile(r"[A-Za-z0-9_.:/-]{1,64}\Z")          # a word of a route
_MODES = {"macvlan": ("private", "vepa", "bridge", "passthru", "source"), "ipvlan": ("l2", "l3", "l3s")}
_NETWORK_HOOKS = ("prestart", "createRuntime")


# --- the source: what the namespace holds -------------------------------------------------------
async def own_network(pid: int, bundle: Path) -> p.OwnNetwork | None:
    """The network namespace of the container whose init is pid, where it is not the host's."""
    if host.same_netns(pid):
        return None
    in_it = quiet.in_network(pid, "ip", "-j")
    ours = {link["ifindex"]: link["ifname"] for link in await _ip(["ip", "-j", "link", "show"])}
    links = []
    for link in await _ip([*in_it, "-d", "address", "show"]):
        if link.get("link_type") == "loopback":
            continue
        info = link.get("linkinfo") or {}
        # a parent in another namespace is named by its index there (link_netnsid): this
        # host's, where the container was put on one of its interfaces
        parent = ours.get(link.get("link_index", -1), "") if "link_netnsid" in link else ""
        links.append(p.NetLink(link["ifname"], info.get("info_kind", "") or link.get("link_type", ""), parent,
                               str((info.get("info_data") or {}).get("mode", "")), link.get("address", ""),
                               int(link.get("mtu", 0)),
                               [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                                if a.get("scope") == "global"]))
    routes = []
    for family in ("-4", "-6"):
        for r in await _ip([*in_it, family, "route", "show"]):
            if r.get("protocol") == "kernel" or r.get("type", "unicast") != "unicast":
                continue      # (its addresses make those again)
            routes.append([r["dst"], *(["via", r["gateway"]] if r.get("gateway") else []), "dev", r["dev"],
                           *(["onlink"] if "onlink" in r.get("flags", []) else [])])
    return p.OwnNetwork(links, routes, hooks=_has_hooks(bundle))


async def _ip(argv: list[str]) -> list[dict]:
    res = await proc.run(argv, phase=Phase.PREFLIGHT)
    try:
        return json.loads(res.stdout or b"[]")
    except ValueError:
        raise LivemigError(f"`{' '.join(argv)}` printed what is not JSON", phase=Phase.PREFLIGHT) from None


def _has_hooks(bundle: Path) -> bool:
    try:
        with open(bundle / "config.json") as f:
            hooks = json.load(f).get("hooks") or {}
    except (OSError, ValueError):    # no readable config: none of its hooks will run either
        return False
    return any(hooks.get(h) for h in _NETWORK_HOOKS)


def judged(container: p.Container, parents_missing: list[str]) -> list[tuple[bool, str, str, bool]]:
    """(ok, what, what to do, whether the target is where to do it) for each link of the
    container's own network namespace."""
    net, runtime = container.own_network, container.runtime
    if net is None or runtime not in MADE_AGAIN:
        return []
    if net.hooks and runtime == "runc":
        said = f"container {container.id}'s network is made by its bundle's hooks, which runc runs at the restore too"
        return [(True, said, "", False)]
    return [_judged(container.id, runtime, link, parents_missing) for link in net.links]


def _judged(name: str, runtime: str, link: p.NetLink, parents_missing: list[str]) -> tuple[bool, str, str, bool]:
    kinds = MADE_AGAIN[runtime]
    if link.kind not in kinds:
        said = " and ".join(kinds)
        return False, (f"container {name}'s {link.name} is a {link.kind or 'link of no kind'} link, which {runtime}'s "
                       f"restore does not make again (livemig makes {said} links)"), \
            (f"put it on a {' or '.join(kinds)} link over an interface both hosts have on one link"
             + (", or give its bundle a hook that makes its network" if runtime == "runc" else "")), False
    if not link.parent:
        return False, f"container {name}'s {link.name} ({link.kind}) has its parent in no namespace of this host's", \
            "put it on a link over one of this host's interfaces", False
    if link.parent in parents_missing:
        return False, (f"the target has no interface {link.parent}, where container {name}'s {link.name} "
                       f"({link.kind}, {', '.join(link.addresses) or 'no address'}) is made again"), \
            f"give the target's interface on this {link.parent}'s link that name", True
    return True, (f"{link.name} ({link.kind} on {link.parent}, {', '.join(link.addresses) or 'no address'}) made "
                  f"again on the target's {link.parent}, its MAC and addresses with it, its connections too where "
                  "both are on one link"), "", True


# --- the target: its copy's namespace made again ------------------------------------------------
def parents_missing(c: p.Container) -> list[str]:
    """Of the container's own links' parents, the interfaces this host lacks."""
    net = c.own_network
    return sorted({link.parent for link in (net.links if net else []) if link.parent
                   and not os.path.exists(f"/sys/class/net/{_checked(_NAME, link.parent, 'interface')}")})


def at_restore(work: Path, c: p.Container) -> str:
    """The CRIU configuration that makes the container's own network again as CRIU restores it,
    quiet until its Resume; "" where it has none. Raises on a link this host cannot make."""
    net = c.own_network
    if net is None or not (net.links or c.runtime == "runc"):
        return ""
    if c.runtime == "crun" or net.hooks:
        made = "".join(f"external macvlan[{_checked(_NAME, link.name, 'interface')}]:"
                       f"{_checked(_NAME, link.parent, 'interface')}\n"
                       for link in net.links if c.runtime == "crun" and link.kind == "macvlan")
        return made + quiet.at_post_restore(work)
    t = quiet.tools(("nsenter", "nft", "ip") if net.links else ("nsenter", "ip"))
    at = f"{t['nsenter']} --net=\"$NET\" {t['ip']}"
    # quiet before it is on the link
    lines = [f"{t['nsenter']} --net=\"$NET\" {t['nft']} -f {quiet.rules_file(work)}"] if net.links else []
    for i, link in enumerate(net.links):
        lines += _made(link, f"lm$CRTOOLS_INIT_PID-{i}", t["ip"], at)
    lines.append(f"{at} link set lo up")
    for route in net.routes:
        lines.append(f"{at} route add {' '.join(shlex.quote(_checked(_WORD, w, 'route')) for w in route)}")
    return quiet.script(work, "network-at-restore", "setup-namespaces", "\n".join(lines) + "\n")


def _made(link: p.NetLink, temporary: str, ip: str, at: str) -> list[str]:
    """The commands that make link again in $NET: made here on its parent, under a temporary
    name (unique here), then moved there and named."""
    if link.kind not in MADE_AGAIN["runc"]:
        raise LivemigError(f"cannot make a {link.kind} link again", phase=Phase.RESTORE)
    name, parent = _checked(_NAME, link.name, "interface"), _checked(_NAME, link.parent, "interface")
    mode = link.mode if link.mode in _MODES[link.kind] else ""
    mac = f" address {_checked(_MAC, link.mac, 'MAC')}" if link.kind == "macvlan" and link.mac else ""
    mtu = f" mtu {int(link.mtu)}" if link.mtu else ""
    out = [f"{ip} link add link {parent} name {temporary}{mac}{mtu} type {link.kind}" + (f" mode {mode}" if mode else ""),
           f"{ip} link set {temporary} netns \"$CRTOOLS_INIT_PID\"",
           f"{at} link set {temporary} name {name}"]
    for a in link.addresses:
        try:
            iface = ipaddress.ip_interface(a)
        except ValueError:
            raise LivemigError(f"not an address: {a!r}", phase=Phase.RESTORE) from None
        out.append(f"{at} address add {iface.with_prefixlen} dev {name}" + (" nodad" if iface.version == 6 else ""))
    return [*out, f"{at} link set {name} up"]


def _checked(pattern: re.Pattern, value: str, what: str) -> str:
    if not pattern.match(value):
        raise LivemigError(f"not a{'n' if what[0] in 'aeiouAEIOU' else ''} {what}: {value!r}", phase=Phase.RESTORE)
    return value
