"""Podman containers, checkpointed and restored by podman itself, so that the target's
podman knows the container (its name, image, network and volumes) afterwards.

podman cannot checkpoint a paused container, so its commit point differs from
runc's: the final checkpoint stops the source container but keeps its checkpoint
(podman exports a copy), and a rollback restores it right there, from that local
checkpoint. The archive (`--export`, uncompressed: the stream compresses) is written
into this migration's private directory and sent with the other images; podman's
import reads its archive twice, so it cannot come from a pipe on the target either.
The container's image goes first, while it still runs, if the target lacks it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from .. import criu, proc, protocol as p
from ..errors import CommandFailed, DumpError, Phase, PreflightError
from . import DumpRun, Workload

ARCHIVE = "checkpoint.tar"


async def inspect(name: str) -> dict | None:
    try:
        res = await proc.run(["podman", "container", "inspect", name], check=False)
    except CommandFailed:
        return None
    if res.returncode != 0:
        return None
    try:
        [found] = json.loads(res.stdout)
    except ValueError:
        return None
    return found


async def facts() -> dict[str, str]:
    """What the seeds say must match on both hosts, as podman reports it."""
    try:
        res = await proc.run(["podman", "info", "--format", "json"], check=False)
        info = json.loads(res.stdout) if res.returncode == 0 else {}
    except (CommandFailed, ValueError):
        return {}
    h = info.get("host", {})
    return {"podman": info.get("version", {}).get("Version", ""),
            "OCI runtime": h.get("ociRuntime", {}).get("name", ""),
            "network stack": h.get("networkBackend", ""),
            "cgroups": h.get("cgroupVersion", "")}


def flags(opts: criu.Options) -> list[str]:
    return [f for f in ("--tcp-established",) if opts.tcp_established] + \
           (["--file-locks"] if opts.file_locks else [])


def restore(archive: str, name: str) -> list[str]:
    return ["podman", "container", "restore", "--import", archive, "--name", name]


class PodmanContainer(Workload):
    kind = "podman"
    streams_pages = False

    def __init__(self, found: dict, opts: criu.Options):
        self.container = found["Name"]
        self.name = self.container
        self.root_pid = int(found["State"]["Pid"])
        self.image = found.get("ImageName") or found["Image"]   # a name survives save and load
        self.opts = opts
        self.checkpointed = False
        self.run: DumpRun | None = None

    def pids(self) -> list[int]:
        from ..host import process_tree
        return process_tree(self.root_pid)

    def target_spec(self) -> p.Container:
        return p.Container("podman", self.container, "", image=self.image)

    async def send_image(self, writer, level: int):
        from .. import streams
        return await streams.send_output(["podman", "save", self.image], writer, level)

    async def final_dump(self, images: Path, parent: str | None, lazy: bool) -> DumpRun:
        frozen_at = time.monotonic()
        argv = ["podman", "container", "checkpoint", "--export", str(images / ARCHIVE), "--compress", "none",
                *flags(self.opts), self.container]
        self.checkpointed = True     # from here on a rollback restores it
        dumping = await proc.start(argv, stdout=asyncio.subprocess.DEVNULL)
        self.run = DumpRun(dumping, images / "dump.log")
        self.run.frozen_at = frozen_at
        return self.run

    async def dumped(self, run: DumpRun, lazy: bool) -> float:
        rc = await run.proc.wait()
        if rc != 0:
            err = (await run.proc.stderr.read()).decode(errors="replace").strip().splitlines()
            raise DumpError(f"podman container checkpoint exited {rc}" + (f": {err[-1]}" if err else ""))
        return time.monotonic()

    async def release(self, run: DumpRun, lazy: bool) -> list[str]:
        res = await proc.run(["podman", "rm", "--force", self.container], check=False)
        self.checkpointed = False
        return [] if res.returncode == 0 else [
            f"podman rm {self.container} failed here: {res.stderr.decode(errors='replace').strip()}"]

    async def resume(self, run: DumpRun | None, stop_pages) -> None:
        if run and run.proc.returncode is None:
            await run.proc.wait()          # podman ends its checkpoint; we act on what it left
        if not self.checkpointed:
            return
        found = await inspect(self.container)
        if found and not found["State"].get("Running"):
            await proc.run(["podman", "container", "restore", self.container], phase=Phase.ROLLBACK)
        self.checkpointed = False


async def find(name: str, opts: criu.Options) -> PodmanContainer | None:
    found = await inspect(name)
    if found is None:
        return None
    state = found.get("State", {})
    if not state.get("Running") or state.get("Paused"):
        raise PreflightError(f"container {name} is {state.get('Status', 'not running')}, not running",
                             hint=f"only a running container moves; `podman unpause {name}` if it is paused")
    return PodmanContainer(found, opts)
