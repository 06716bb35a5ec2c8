"""What every runtime's driver is on the source: a Workload (what it can do, its dumps, its
freeze, release and resume) and the DumpRun of a dump under way. The drivers (process, oci,
podman) derive from these; runtimes' own module picks the one that knows a workload.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import criu, proc
from ..criu import DumpStats, read_stats
from ..errors import LivemigError, Phase
from ..wire import protocol as p

StopPages = Callable[[], Awaitable[None]]   # cuts the coordinator's page relay (resume's stop_pages)


@dataclass
class DumpRun:
    """One CRIU dump under way on the source.

    `pages()` gives the socket CRIU's page stream comes out of (None when this
    workload writes its pages into the image directory instead); `lazy_pages()`
    the connection to a lazy dump's page server."""
    proc: asyncio.subprocess.Process
    log: Path
    sock: socket.socket | None = None
    frozen_at: float = field(default_factory=time.monotonic)

    async def pages(self) -> socket.socket | None:
        return self.sock

    async def lazy_pages(self) -> socket.socket:
        if self.sock is None:       # a lazy dump's run always has one (process.py)
            raise LivemigError("this dump serves no pages", phase=Phase.FINAL_DUMP)
        return self.sock

    def close(self) -> None:
        if self.sock:
            self.sock.close()


class Workload:
    """The interface every kind of workload implements (see process.py, oci.py)."""
    kind = ""                 # "process", "runc", "crun": in the report
    streams_pages = True      # pages go to the target's page server as CRIU writes them
                              # (which strategies each runtime can run: policy.choose_mode)

    root_pid: int
    opts: criu.Options        # what the user asked of CRIU for it
    name: str                 # what the user called it: a PID or a container name
    image: str | None = None  # a container image the target must have too (podman's)
    max_rounds: int | None = None   # pre-copy rounds this runtime can chain (podman keeps one)
    # The tasks the workload had stopped itself, as its final dump found them: a rollback
    # that continues the tasks it stopped leaves these stopped (read where the runtime
    # itself does not keep them so: process.py).
    own_stops: tuple[proc.Task, ...] = ()
    # Why no trial restore is taken of this kind of workload (trial.py); "": one is (trial_dump)
    untried = ""
    # Stop-and-copy's release ends the source's copy (a tree's: CRIU, told, kills it at once; what
    # CRIU leaves, remove() waits for); else it stands here, paused and quiet, given up, until
    # remove() after the target's Resume
    gone_at_release = True

    def pids(self) -> list[int]:
        raise NotImplementedError

    def target_spec(self) -> p.Container | None:
        """What the target's agent needs to restore this workload under its runtime."""
        return None

    def bundle(self) -> Path | None:
        """A directory that must exist on the target too (an OCI bundle), or None."""
        return None

    def mount_sources(self) -> list[str]:
        """The host's paths a container's restore binds in (its volumes): each must be on the
        target, or the restore fails after the freeze. None for a process tree, whose files
        are checked one by one (host.reopened_files)."""
        return []

    async def pre_dump(self, images: Path, parent: str | None) -> DumpRun:
        raise NotImplementedError

    async def trial_dump(self, images: Path) -> float:
        """A trial's images, without the pages, the workload left running (trial.py): the
        seconds it stood still for them, at most. DumpError (Phase.TRIAL) if they cannot be taken."""
        raise NotImplementedError

    async def final_dump(self, images: Path, parent: str | None, lazy: bool) -> DumpRun:
        """Freeze the workload and start the final dump; returns once it is started."""
        raise NotImplementedError

    async def dumped(self, run: DumpRun, lazy: bool) -> float:
        """Wait until every image is written (lazy: until the page server is ready), the
        workload still frozen; the time that happened. Raises DumpError if the dump failed."""
        raise NotImplementedError

    async def release(self, run: DumpRun, lazy: bool) -> list[str]:
        """The commit point, after the target restored: the source is given up for good
        (lazy: recorded as given up; see finish_lazy). Returns warnings. What of it stays
        here (gone_at_release False) can neither run nor answer until remove()."""
        raise NotImplementedError

    async def remove(self, run: DumpRun) -> list[str]:
        """Stop-and-copy, once the target's copy runs: what is left here of the source's
        copy, given up at release, goes. Returns warnings."""
        return []

    def stats(self, images: Path) -> DumpStats | None:
        """CRIU's statistics of the dump into images (criu.DumpStats), or None."""
        st = read_stats(images / "stats-dump")
        return st if isinstance(st, DumpStats) else None    # (a stats-dump image holds a dump's)

    async def finish_lazy(self, run: DumpRun) -> list[str]:
        """Post-copy is over: every page is on the target; end the source's copy. Returns
        warnings."""
        raise NotImplementedError

    async def resume(self, run: DumpRun | None, stop_pages: StopPages) -> list[str]:
        """Roll back: the source runs on from where it was frozen. stop_pages() cuts the
        coordinator's page relay, which makes a running CRIU dump fail. What could not be
        put back as it was, in words (warnings for the report)."""
        raise NotImplementedError

    async def close(self) -> None:
        pass
