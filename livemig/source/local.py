"""This host's side of the preflight, and its work directory: shared by moves and clones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import criu, host, proc, runtimes, workdirs
from ..errors import Phase, UsageError
from ..runtimes import podman, podman_networks
from ..wire import protocol as p


def make_work_dir(image_root: str, work: Path) -> workdirs.Held | None:
    """This host's private image directory for one move or clone, under a private root,
    held while we live (None: it was made already). What moves killed outright left
    there goes first, once the root is known to be livemig's alone."""
    workdirs.check_root(image_root)
    workdirs.sweep(image_root)
    if work.exists():
        return None
    return workdirs.make(image_root, work)


async def local_facts(pids: list[int], work: Path, container: p.Container | None) -> p.HostFacts:
    """This host's facts for the preflight; with what podman says must match, for its containers."""
    local = await host.probe(pids, str(work))
    if container is not None and container.runtime == "podman":
        local = dataclasses.replace(local, runtime_facts=await podman.facts(),
                                    podman_networks=await podman_networks.defined(container.networks))
    return local


async def local_cpuinfo(work: Path) -> Path:
    """This CPU's features as CRIU records them, for the targets' cpuinfo check."""
    d = work / "cpuinfo"
    d.mkdir(mode=0o700)
    await proc.run(criu.cpuinfo_dump(str(d)), phase=Phase.PREFLIGHT)
    return d


def target_spec(w: runtimes.Workload, name: str | None, tcp_established: bool = False) -> p.Container | None:
    """The container as the target's runtime will know it: renamed if the user says so."""
    spec = w.target_spec()
    if name is None or (spec is not None and name == spec.id):
        return spec
    if spec is None:
        raise UsageError("--name names a container; a process tree has no name to change", phase=Phase.PREFLIGHT)
    if spec.runtime == "podman" and tcp_established:
        raise UsageError("--name with --tcp-established: podman restores a container's connections only under its "
                         "own name (under another, it gets another address)", phase=Phase.PREFLIGHT)
    return dataclasses.replace(spec, id=name)


def by_pid(w: runtimes.Workload) -> dict[int, int]:
    """The tree's processes (PID here -> PID in the dump, in its root's PID namespace)."""
    return proc.in_dump(w.root_pid, w.pids())
