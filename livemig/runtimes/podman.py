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

import contextlib
import json
import os
import re
import tarfile
import time
from pathlib import Path, PurePath

from .. import criu, proc, units
from ..errors import CommandFailed, DumpError, LivemigError, Phase, PreflightError
from ..wire import protocol as p
from ..wire import streams
from . import podman_networks
from .workload import DumpRun, StopPages, Workload

ARCHIVE = "checkpoint.tar"
# The final checkpoint's archive, linked beside the move's record (outside its image directories,
# which a sweep takes from a dead move): where `livemig recover` finds a --rm container that a move
# killed outright left gone here (held.from_its_checkpoint). It goes with the move's directory.
KEPT_ARCHIVE = "checkpoint-kept.tar"
KEPT_PREVIOUS = "checkpoint-kept-previous.tar"     # the pre-checkpoint it builds on, if any
STATS = "checkpoint-stats.log"     # podman's --print-stats; a .log stays on the source


async def inspect(name: str) -> dict | None:
    try:
        res = await proc.run(["podman", "container", "inspect", name], check=False)
    except CommandFailed:      # podman is not installed: it knows no container
        return None
    if res.returncode != 0:
        return None
    try:
        [found] = json.loads(res.stdout)
    except ValueError:         # not one container's JSON: none by that name
        return None
    return found


async def listed() -> list[dict]:
    """Every container podman knows here, as `podman ps --all` gives them (Id, Names, State);
    none where it is not installed."""
    try:
        res = await proc.run(["podman", "ps", "--all", "--format", "json"], check=False)
    except CommandFailed:      # podman is not installed: it runs nothing
        return []
    if res.returncode != 0:
        raise PreflightError(f"`podman ps` failed: {proc.why(res.stderr)}")
    try:
        return json.loads(res.stdout) or []
    except ValueError:
        raise PreflightError("`podman ps` printed what is not JSON") from None


async def facts() -> dict[str, str]:
    """What the seeds say must match on both hosts, as podman reports it."""
    try:
        res = await proc.run(["podman", "info", "--format", "json"], check=False)
        info = json.loads(res.stdout) if res.returncode == 0 else {}
    except (CommandFailed, ValueError):     # no podman here, or no info from it: no facts to compare
        return {}
    h = info.get("host", {})
    return {"podman": info.get("version", {}).get("Version", ""),
            "OCI runtime": h.get("ociRuntime", {}).get("name", ""),
            "network stack": h.get("networkBackend", ""),
            "cgroups": h.get("cgroupVersion", "")}


def flags(opts: criu.Options) -> list[str]:
    """A checkpoint's, and the restore of it here (a rollback's): its connections always taken
    as they are (CRIU's TCP repair). podman's checkpoint has no --tcp-close, and passes CRIU no
    configuration file of livemig's, so a connection open as it froze failed its dump without
    --tcp-established. The copy's restore closes them unless they move (restore_archive: the
    restore's configuration says tcp-close, criu.restored_config); a rollback keeps them."""
    return ["--tcp-established", *(["--file-locks"] if opts.file_locks else [])]


def checkpoint(container: str, archive: Path, opts: criu.Options, *, leave_running: bool = False,
               pre: bool = False, with_previous: bool = False) -> list[str]:
    # uncompressed: the stream to the target compresses, once
    return ["podman", "container", "checkpoint", "--export", str(archive), "--compress", "none",
            "--print-stats", *(["--leave-running"] if leave_running else []),
            *(["--pre-checkpoint"] if pre else []), *(["--with-previous"] if with_previous else []),
            *flags(opts), container]


async def _start(argv: list[str], images: Path):
    """A checkpoint whose statistics (stdout) land in images/STATS."""
    # a new, empty local file: opening it blocks the loop no longer than a thread hop would
    with open(images / STATS, "wb") as out:  # noqa: ASYNC230
        return await proc.start(argv, stdout=out)


def parse_stats(out: bytes) -> criu.DumpStats:
    """CRIU's dump statistics, from podman's --print-stats (times in microseconds)."""
    try:
        st = json.loads(out)["container_statistics"][0]["criu_statistics"]
    except (ValueError, KeyError, IndexError, TypeError):
        return criu.DumpStats()
    return criu.DumpStats(freezing_time=st.get("freezing_time", 0) / 1e6, frozen_time=st.get("frozen_time", 0) / 1e6,
                          memdump_time=st.get("memdump_time", 0) / 1e6, memwrite_time=st.get("memwrite_time", 0) / 1e6,
                          pages_scanned=st.get("pages_scanned", 0), pages_written=st.get("pages_written", 0))


def restore(images: Path, name: str, opts: criu.Options = criu.NO_OPTIONS) -> list[str]:
    previous = images / "parent" / ARCHIVE     # a pre-checkpoint the final one builds on
    return restore_archive(images / ARCHIVE, name, opts, previous if previous.exists() else None)


def restore_archive(archive: Path, name: str, opts: criu.Options = criu.NO_OPTIONS,
                    previous: Path | None = None) -> list[str]:
    """The restore of archive under name. With its connections, under the name it has in the
    archive, which a move keeps: podman refuses --name beside --tcp-established (a container
    restored under another name gets another address, and the connections would be cut), and
    without --name it gives the container the address it had in its own network namespace."""
    return ["podman", "container", "restore", "--import", str(archive),
            *(["--import-previous", str(previous)] if previous else []),
            *(["--tcp-established"] if opts.tcp_established else ["--name", name])]


def stopped_tasks(images: Path) -> set[int]:
    """criu.stopped_tasks, of the checkpoint archive in images (its core images are under
    checkpoint/; the members' headers are read, the pages skipped)."""
    with tarfile.open(images / ARCHIVE) as tar:
        cores = [m for m in tar if m.isfile() and re.fullmatch(r"checkpoint/core-\d+\.img", m.name)]
        return criu.stopped_among((PurePath(m.name).name, tar.extractfile(m).read()) for m in cores)  # type: ignore[union-attr]


def without_cgroup_parent(archive: Path) -> None:
    """The archive's container config (config.dump) with no cgroup parent, rewritten in place
    (the pages around it are not copied): a Quadlet's container runs with --cgroups=split, which
    podman's import refuses beside a cgroup parent, and is restored into its unit's cgroup
    instead (units.py). The JSON is padded with spaces to its old length."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar if m.isfile() and PurePath(m.name).as_posix().lstrip("./") == "config.dump"),
                      None)
        if member is None:
            raise LivemigError("the checkpoint archive holds no config.dump", phase=Phase.RESTORE)
        config = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
    if not config.get("cgroupParent"):
        return
    config["cgroupParent"] = ""
    data = json.dumps(config, separators=(",", ":")).encode()
    if len(data) > member.size:      # never: it only lost a value
        raise LivemigError("cannot rewrite the checkpoint's config.dump in place", phase=Phase.RESTORE)
    with open(archive, "r+b") as f:
        f.seek(member.offset_data)
        f.write(data + b" " * (member.size - len(data)))


async def adoptable(name: str) -> int:
    """The restored container name's conmon, which its Quadlet's unit takes as its main process
    (units.adopt), with the file of its ID the unit's ExecStop names written anew (restored
    under its name, it has a new ID)."""
    found = await inspect(name)
    if found is None:
        raise LivemigError(f"no container {name} here", phase=Phase.COMMIT)
    cidfile = (found.get("Config", {}).get("Annotations") or {}).get("io.podman.annotations.cid-file", "")
    if cidfile.startswith("/run/"):
        Path(cidfile).write_text(found["Id"])
    return int(found["State"]["ConmonPid"])


def restore_kept(name: str, opts: criu.Options) -> list[str]:
    """A rollback's restore: name, from the checkpoint podman kept of it (its final one),
    with what its checkpoint kept (its connections: without the flag, CRIU refuses them)."""
    return ["podman", "container", "restore", *flags(opts), name]


class PodmanContainer(Workload):
    kind = "podman"
    streams_pages = False
    max_rounds = 1           # podman keeps one pre-checkpoint to build on
    # (trial.py) its images hold every page: podman's checkpoint has no lazy dump to leave them out
    untried = "podman's checkpoint cannot leave the pages out (it has no lazy dump)"
    gone_at_release = False

    def __init__(self, found: dict, opts: criu.Options):
        self.container = found["Name"]
        self.name = self.container
        self.root_pid = int(found["State"]["Pid"])
        self.image: str = found.get("ImageName") or found["Image"]   # a name survives save and load
        # bind mounts name host paths; named volumes travel in the checkpoint's archive
        self._binds = sorted({m["Source"] for m in found.get("Mounts") or [] if m.get("Type") == "bind"})
        self.opts = opts
        self.networks = podman_networks.attached(found)     # its own network namespace's (podman_networks.py)
        # the systemd unit that runs it (a Quadlet, `podman generate systemd --new`), by podman's label
        self.unit: str = (found.get("Config", {}).get("Labels") or {}).get("PODMAN_SYSTEMD_UNIT", "")
        self.conmon = int(found["State"].get("ConmonPid") or 0)
        self.unit_cgroup = ""     # its unit's cgroup, once the unit is handed over: a rollback restores it there
        self.checkpointed = False
        self.run: DumpRun | None = None

    def pids(self) -> list[int]:
        return proc.process_tree(self.root_pid)

    def target_spec(self) -> p.Container:
        return p.Container("podman", self.container, "", image=self.image, networks=self.networks)

    def mount_sources(self) -> list[str]:
        return self._binds

    async def send_image(self, writer: streams.Writer, level: int) -> streams.Meter:
        return await streams.send_output(["podman", "save", self.image], writer, level)

    async def pre_dump(self, images: Path, parent: str | None) -> DumpRun:
        """podman's pre-checkpoint: the memory while the container runs; podman keeps one,
        which the final checkpoint then builds on (--with-previous)."""
        return DumpRun(await _start(checkpoint(self.container, images / ARCHIVE, self.opts, pre=True), images),
                       images / "dump.log")

    async def final_dump(self, images: Path, parent: str | None, lazy: bool) -> DumpRun:
        frozen_at = time.monotonic()
        self.checkpointed = True     # from here on a rollback restores it
        argv = checkpoint(self.container, images / ARCHIVE, self.opts, with_previous=parent is not None)
        self.run = DumpRun(await _start(argv, images), images / "dump.log")
        self.run.frozen_at = frozen_at
        return self.run

    async def dumped(self, run: DumpRun, lazy: bool) -> float:
        _, err = await run.proc.communicate()
        if run.proc.returncode != 0:
            raise DumpError(f"podman container checkpoint exited {run.proc.returncode}: {proc.why(err)}")
        done = time.monotonic()
        images = run.log.parent
        # Safe to go without: the move goes on, and only a recover after it was killed outright
        # would find no archive (another file system, one kept already), and say the container lost.
        with contextlib.suppress(OSError):
            os.link(images / ARCHIVE, images.parent / KEPT_ARCHIVE)
            if (images / "parent" / ARCHIVE).exists():
                os.link(images / "parent" / ARCHIVE, images.parent / KEPT_PREVIOUS)
        return done

    async def copy(self, images: Path) -> criu.DumpStats:
        """A checkpoint of the running container that leaves it running: what clones start
        from. The container stops only while CRIU dumps it."""
        run = DumpRun(await _start(checkpoint(self.container, images / ARCHIVE, self.opts, leave_running=True),
                                   images), images / "dump.log")
        try:
            await self.dumped(run, lazy=False)
        finally:
            await proc.kill(run.proc)     # cancelled: never left behind (a no-op once it exited)
        return self.stats(images) or criu.DumpStats()

    def stats(self, images: Path) -> criu.DumpStats | None:
        try:
            return parse_stats((images / STATS).read_bytes())
        except OSError:     # none written: the report goes without them, as with CRIU's (criu.read_stats)
            return None

    async def release(self, run: DumpRun, lazy: bool) -> list[str]:
        # Given up by the commit mark alone (recovery.Record.committed): checkpointed, it does not
        # run; it goes once the target's copy runs (remove)
        return []

    async def remove(self, run: DumpRun) -> list[str]:
        res = await proc.run(["podman", "rm", "--force", self.container], check=False)
        self.checkpointed = False
        return [] if res.returncode == 0 else [
            f"podman rm {self.container} failed here: {proc.why(res.stderr)}"]

    async def resume(self, run: DumpRun | None, stop_pages: StopPages) -> list[str]:
        if run and run.proc.returncode is None:
            await run.proc.wait()          # podman ends its checkpoint; we act on what it left
        if not self.checkpointed:
            return []
        found = await inspect(self.container)
        self.checkpointed = False
        if found is None:
            # Gone: podman removed it as its checkpoint stopped it (a --rm container: conmon's
            # cleanup removes it), and the checkpoint it kept with it. It comes back from the
            # archive exported for the target, whole as it was frozen, under its name (podman
            # gives it a new ID).
            images = run.log.parent if run else None
            if images is None or not (images / ARCHIVE).exists():
                return [(f"container {self.container} is gone here (podman removed it at its checkpoint), and "
                        "no checkpoint of it is left to restore")]
            argv = restore(images, self.container, self.opts)
            if self.unit_cgroup:        # a Quadlet's: into its unit's cgroup, as the target would have
                await units.stopped(self.unit)
                without_cgroup_parent(images / ARCHIVE)
                argv = units.in_cgroup(self.unit_cgroup, argv)
            await proc.run(argv, phase=Phase.ROLLBACK, leaves_daemon=True)
        elif not found["State"].get("Running"):
            await proc.run(restore_kept(self.container, self.opts), phase=Phase.ROLLBACK, leaves_daemon=True)
        return []


async def find(name: str, opts: criu.Options) -> PodmanContainer | None:
    found = await inspect(name)
    if found is None:
        return None
    state = found.get("State", {})
    if not state.get("Running") or state.get("Paused"):
        raise PreflightError(f"container {name} is {state.get('Status', 'not running')}, not running",
                             hint=f"only a running container moves; `podman unpause {name}` if it is paused")
    return PodmanContainer(found, opts)
