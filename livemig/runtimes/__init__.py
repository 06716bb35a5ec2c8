"""What is being moved, and how it is checkpointed on the source.

A workload is a bare process tree (CRIU driven directly), an OCI container (runc
or crun driven through the runtime, so that the target's runtime knows the
container afterwards) or a podman container (podman's own checkpoint and restore).
Each says what it can do (stream pages into a page server, serve them lazily) and
runs its own dumps, freeze, release and resume; the coordinator's phases are the
same for all of them.

    workload   what every driver is: a Workload, and the DumpRun of a dump under way
    process    a process tree: CRIU itself, its commit point in hook.py
    oci        runc and crun
    podman     podman
    held       the workload as a host holds it after its final dump, to resume or to end
    hook       CRIU's action script: the commit point of a process tree's final dump
    bundle     an OCI bundle's files, carried to the target
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..criu import NO_OPTIONS, Options
from ..errors import PreflightError
from ..wire import protocol as p
from . import oci, podman, process
from .workload import DumpRun, StopPages, Workload

__all__ = ["CONTAINER_RUNTIMES", "DumpRun", "Hosted", "StopPages", "Workload", "control", "hosted", "known",
           "resolve", "restore_command"]

async def resolve(what: str | int, runtime: str | None, criu_opts: Options, work: Path) -> Workload:
    """The workload the user named: a PID (process tree), or a container name or ID. podman
    is asked first: its containers run under runc or crun too, but only podman knows them
    by name, and only podman can bring them back registered."""
    if isinstance(what, int):
        return process.ProcessTree(what, criu_opts, work)
    if runtime in (None, "podman"):
        found = await podman.find(what, criu_opts)
        if found is not None or runtime == "podman":
            if found is None:
                raise PreflightError(f"no container {what!r} here under podman")
            return found
    return await oci.find(what, runtime, criu_opts)


CONTAINER_RUNTIMES = ("podman", "runc", "crun")
_UP = ("running", "paused")     # what a host runs: a paused container is still there (its move is refused, and says why)


@dataclass(frozen=True)
class Hosted:
    """A container this host runs, under the runtime that moves it."""
    runtime: str
    name: str       # its name (podman), or its ID (runc, crun: the two are one)


async def hosted() -> list[Hosted]:
    """Every container podman, runc and crun run here, running or paused, each once: podman's
    run under runc or crun too, and may be listed there, but only podman brings them back
    registered, so they are podman's."""
    found, podmans = [], set()
    for c in await podman.listed():
        podmans.add(c.get("Id", ""))
        if str(c.get("State", "")).lower() in _UP:
            found.append(Hosted("podman", (c.get("Names") or [c.get("Id", "")])[0]))
    for rt in oci.RUNTIMES:
        found += [Hosted(rt, c["id"]) for c in await oci.listed(rt)
                  if c.get("status") in _UP and c.get("id") not in podmans]
    return found


async def known(c: p.Container) -> bool:
    """Does this host's runtime have a container by c's name?"""
    if c.runtime == "podman":
        return await podman.inspect(c.id) is not None
    return await oci.state(c.runtime, c.id) is not None


def restore_command(c: p.Container, images: Path, pidfile: Path, lazy: bool,
                    opts: Options = NO_OPTIONS) -> list[str]:
    """How this host's runtime restores c from image directory images; opts: what its dump
    carried that the restore must ask for too (the runtimes tell CRIU each option themselves,
    so a configuration file cannot add one)."""
    if c.runtime == "podman":
        return podman.restore(images, c.id, opts)
    return oci.restore(c.runtime, c.id, str(images), c.bundle, str(pidfile), lazy=lazy, opts=opts)


def control(c: p.Container, action: str) -> list[str]:
    """The command that pauses, resumes or deletes container c on this host (or, "exists",
    exits 0 only if the runtime has it)."""
    if c.runtime == "podman":
        verb = {"pause": ["pause"], "resume": ["unpause"], "delete": ["rm", "--force"],
                "exists": ["container", "exists"]}[action]
    else:
        verb = {"pause": ["pause"], "resume": ["resume"], "delete": ["delete", "--force"], "exists": ["state"]}[action]
    return [c.runtime, *verb, c.id]
