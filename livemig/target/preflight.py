"""The target's answers before anything is moved: this host's facts (Probe: CRIU, the
kernel, free room, PIDs, names and ports taken, files and mount sources missing, the
container's runtime and bundle) and whether
the source's CPU can be restored here (CpuinfoCheck)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .. import addresses, criu, host, proc, runtimes, service_address, units
from ..errors import Phase
from ..runtimes import oci, oci_networks, podman, podman_networks
from ..wire import protocol as p
from ..wire import streams
from .failures import AgentFailure, checked_name
from .workspace import Workspace


def checked_container(c: p.Container) -> p.Container:
    """c, if its runtime is one livemig drives and its name a plain one: both go into a
    root command's argv (the runtime as its program), so a message naming anything else is
    refused before any program runs."""
    if c.runtime not in runtimes.CONTAINER_RUNTIMES:
        raise AgentFailure(Phase.PREFLIGHT, f"unknown runtime {c.runtime!r}")
    checked_name(c.id, "container name")
    return c


async def probe(msg: p.Probe, ws: Workspace) -> p.HostFacts:
    c = msg.container and checked_container(msg.container)     # before anything runs (the agent checks it too)
    names = [checked_name(n, "container name") for n in [c.id, *msg.names]] if c else []   # for the runtime's argv
    facts = await host.probe(msg.pids, str(ws.work))
    if msg.locked_files:
        facts = dataclasses.replace(facts, locks_taken=[f for f in msg.locked_files if host.locked_here(f)])
    if msg.files:
        facts = dataclasses.replace(facts, files_missing=[f for f in msg.files if not os.path.exists(f)])
    if msg.sized_files:
        facts = dataclasses.replace(facts, file_sizes=host.file_sizes(msg.sized_files))
    if msg.ports:
        facts = dataclasses.replace(facts, ports_taken=addresses.taken(msg.ports))
    if msg.move_addresses:
        facts = dataclasses.replace(facts, subnet_devices={a: await service_address.on_subnet(a)
                                                           for a in map(service_address.parse, msg.move_addresses)})
    if msg.unit:
        facts = dataclasses.replace(facts, unit_state=await units.state(msg.unit))
    if msg.mount_sources:
        facts = dataclasses.replace(facts, mount_sources_missing=[f for f in msg.mount_sources
                                                                  if not os.path.exists(f)])
    if c is None:
        return facts
    taken = [n for n in names if await runtimes.known(dataclasses.replace(c, id=n))]
    if c.runtime == "podman":
        info = await podman.facts()
        image = await proc.run(["podman", "image", "exists", c.image], check=False) if info else None
        networks = await podman_networks.defined(c.networks)
        ws.podman_parents = {n.name: n.interface for n in networks}
        return dataclasses.replace(facts, runtime_version=info.get("podman", ""),
                                   container_exists=c.id in taken, names_taken=taken,
                                   image_present=bool(image and image.returncode == 0),
                                   runtime_facts=info, podman_networks=networks)
    if c.runtime not in oci.RUNTIMES:
        raise AgentFailure(Phase.PREFLIGHT, f"unknown runtime {c.runtime!r}")
    where = Path(c.bundle)
    if not where.exists():
        state = "absent"
    elif msg.bundle_marker and (where / checked_name(msg.bundle_marker, "marker")).exists():
        state = "shared"
    else:
        state = "exists"
    return dataclasses.replace(facts, runtime_version=await oci.version(c.runtime),
                               container_exists=c.id in taken, names_taken=taken,
                               bundle=state, parents_missing=oci_networks.parents_missing(c))


async def cpuinfo_check(msg: p.CpuinfoCheck, ws: Workspace) -> p.CpuinfoResult:
    d = ws.dir("cpuinfo", create=True)
    async with ws.stream(msg.stream) as (reader, _):
        await streams.receive_files(reader, d)
    res = await proc.run(criu.cpuinfo_check(str(d)), check=False)
    if res.returncode == 0:
        return p.CpuinfoResult(True)
    log = (d / "cpuinfo-check.log").read_text(errors="replace") if (d / "cpuinfo-check.log").exists() else ""
    why = "; ".join(criu.log_errors(log)) or res.stderr.decode(errors="replace").strip()
    return p.CpuinfoResult(False, why or "criu cpuinfo check failed")
