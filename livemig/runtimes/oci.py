"""OCI containers under runc or crun, checkpointed through the runtime itself.

Going through the runtime (not CRIU directly) is what makes the target's runtime
know the container afterwards: `runc list` there shows it, `runc exec` works.

The commit point is the runtime's own freeze. The container is paused (cgroup
freezer) before the final dump, and dumped with --leave-running: CRIU leaves a
cgroup it found frozen frozen, so after the dump the source stays paused, neither
running nor gone. Commit deletes it; rollback resumes it. The target restores it with
its tasks stopped (CRIU's leave-stopped, in a configuration file: target/restore.py) and
pauses it, and runs it only once the source is deleted.

runc streams pages to a page server and serves them lazily; crun has neither, so
its images are written here and sent as files, and it has no post-copy.

runc knows page servers only as TCP addresses, and a lazy dump's page server (CRIU told
lazy pages over RPC, as runc tells it) listens on every address of the host, whatever
address runc names: any local user, container or host that reaches the port could read
the frozen container's memory, or, connecting to a page server of ours, feed the target
pages of its own. So no TCP port is ever used: CRIU gets one end of a socketpair, named
in a configuration file that CRIU reads from CRIU_CONFIG_FILE (runc's environment is its
criu's, and a descriptor runc inherits criu inherits too) as `ps-socket FD`, which CRIU
uses for its page-server connection, client or lazy server alike, instead of any TCP.
Should a runc or CRIU ever drop that file or descriptor, CRIU falls back to the address
runc gave it: a port livemig holds bound and never listens on (_held_port), where CRIU
can neither listen nor connect, and the dump fails instead of opening the memory to others.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .. import criu, proc, trial
from ..errors import CommandFailed, DumpError, LivemigError, Phase, PreflightError
from ..options import WAITS
from ..wire import protocol as p
from . import oci_networks, quiet
from .bundle import mount_sources as bundle_mount_sources
from .process import criu_failure
from .workload import DumpRun, StopPages, Workload

RUNTIMES = ("runc", "crun")
LOOPBACK = "127.0.0.1"
PAGES_CONFIG = "criu-pages.conf"    # in the image directory: `ps-socket FD`, read by CRIU (see the module doc)
# The page socket's number in runc's process, and so in criu's: above those runc hands criu
# (stdio, its RPC socket, a status descriptor), which Go's exec moves onto 0, 1, 2, 3...
_PAGES_FD_FLOOR = 64


def flags(opts: criu.Options) -> list[str]:
    """CRIU options as the runtimes spell them: as CRIU does, but for the cgroup mode,
    which each runtime sets right for its own cgroups."""
    return [f for f in opts.flags() if not f.startswith("--manage-cgroups")]


def checkpoint(runtime: str, container: str, images: str, *, pre_dump: bool = False,
               parent: str | None = None, page_server: str | None = None, lazy: bool = False,
               status_fd: int | None = None, opts: criu.Options = criu.NO_OPTIONS) -> list[str]:
    argv = [runtime, "checkpoint", "--image-path", images, "--work-path", images]
    argv += ["--pre-dump"] if pre_dump else ["--leave-running"]   # the final dump: see the module doc
    if parent:
        argv += ["--parent-path", parent]
    if page_server:
        argv += ["--page-server", page_server]
    if lazy:
        argv += ["--lazy-pages", "--status-fd", str(status_fd)]
    return [*argv, *flags(opts), container]


def restore(runtime: str, container: str, images: str, bundle: str, pidfile: str, *, lazy: bool,
            opts: criu.Options = criu.NO_OPTIONS) -> list[str]:
    argv = [runtime, "restore", "--detach", "--image-path", images, "--work-path", images,
            "--bundle", bundle, "--pid-file", pidfile]
    if lazy:
        argv.append("--lazy-pages")
    return [*argv, *flags(opts), container]


async def state(runtime: str, container: str) -> dict | None:
    """The runtime's state of container (id, pid, status, bundle), or None if it has none."""
    try:
        res = await proc.run([runtime, "state", container], check=False)
    except CommandFailed:      # the runtime is not installed
        return None
    if res.returncode != 0:
        return None
    try:
        return json.loads(res.stdout)
    except ValueError:     # a state that is not JSON: none this livemig can act on
        return None


async def listed(runtime: str) -> list[dict]:
    """Every container runtime knows here, as its `list` gives them (id, pid, status, bundle);
    none where it is not installed."""
    try:
        res = await proc.run([runtime, "list", "--format", "json"], check=False)
    except CommandFailed:      # the runtime is not installed: it runs nothing
        return []
    if res.returncode != 0:
        raise PreflightError(f"`{runtime} list` failed: {proc.why(res.stderr)}")
    try:
        return json.loads(res.stdout) or []      # (runc prints null for none)
    except ValueError:
        raise PreflightError(f"`{runtime} list` printed what is not JSON") from None


async def version(runtime: str) -> str:
    try:
        res = await proc.run([runtime, "--version"], check=False)
    except CommandFailed:      # the runtime is not installed: no version
        return ""
    first = res.text.strip().splitlines()[:1]
    return first[0].split("version", 1)[-1].strip() if first else ""


async def find(name: str, runtime: str | None, opts: criu.Options) -> OciContainer:
    found = []
    for rt in [runtime] if runtime else RUNTIMES:
        st = await state(rt, name)
        if st is not None:
            found.append((rt, st))
    if not found:
        raise PreflightError(f"no container {name!r} here" + (f" under {runtime}" if runtime else
                                                                  " (podman, runc and crun know none)"))
    if len(found) > 1:
        raise PreflightError(f"both {found[0][0]} and {found[1][0]} have a container {name!r}",
                             hint="say which with --runtime")
    rt, st = found[0]
    if st.get("status") != "running":
        raise PreflightError(f"container {name} is {st.get('status')}, not running",
                             hint=f"only a running container moves; `{rt} resume {name}` if it is paused")
    c = OciContainer(rt, st["id"], int(st["pid"]), Path(st["bundle"]), opts)
    c.own_network = await oci_networks.own_network(c.root_pid, c.bundle())
    if c.own_network and c.own_network.links:
        try:
            quiet.tools()
        except LivemigError as e:
            raise PreflightError(e.message.replace("this host lacks", "the source lacks")) from None
    return c


class OciContainer(Workload):
    gone_at_release = False

    def __init__(self, runtime: str, container: str, pid: int, bundle: Path, opts: criu.Options):
        self.kind, self.container, self.root_pid, self._bundle, self.opts = runtime, container, pid, bundle, opts
        self.name = container
        self.streams_pages = runtime == "runc"
        self.untried = "" if runtime == "runc" else "crun has no lazy dump: a trial's images would hold every page"
        self.paused = False
        self.run: DumpRun | None = None
        self.own_network: p.OwnNetwork | None = None    # its own network namespace's (oci_networks.py)
        self.closed = False     # that namespace kept quiet (quiet.py) since the final dump's freeze

    def pids(self) -> list[int]:
        return proc.process_tree(self.root_pid)

    def bundle(self) -> Path:
        return self._bundle

    def target_spec(self) -> p.Container:
        return p.Container(self.kind, self.container, str(self._bundle), own_network=self.own_network)

    def mount_sources(self) -> list[str]:
        return bundle_mount_sources(self._bundle)

    async def pre_dump(self, images: Path, parent: str | None) -> DumpRun:
        pages = _PageSocket(images) if self.streams_pages else None
        try:
            argv = checkpoint(self.kind, self.container, str(images), pre_dump=True,
                              parent=f"../{parent}" if parent else None,
                              page_server=pages.address if pages else None, opts=self.opts)
            dumping = await proc.start(argv, stdout=asyncio.subprocess.DEVNULL,
                                       pass_fds=pages.pass_fds if pages else (), env=pages.env if pages else None)
        except BaseException:
            if pages:
                pages.close()
            raise
        finally:
            if pages:
                pages.started()
        return _RuncRun(dumping, images / "pre-dump.log", pages)

    async def trial_dump(self, images: Path) -> float:
        """runc's checkpoint of the running container (--leave-running), lazy, its page server
        told to close before it serves (trial.py), on the socket the configuration file names,
        and no --page-server: its few pages that are not lazy go into the images."""
        images.mkdir(mode=0o700)
        pages = _PageSocket(images, criu.connections_config(self.opts))
        status_r, status_w = os.pipe()      # (runc requires it with --lazy-pages; CRIU says "ready" on it)
        try:
            pages.ours.sendall(trial.CLOSE)
            argv = checkpoint(self.kind, self.container, str(images), lazy=True, status_fd=status_w, opts=self.opts)
            t0 = time.monotonic()
            res = await proc.run(argv, check=False, pass_fds=[pages.fd, status_w], env=pages.env,
                                 timeout=WAITS.trial_dump)
            seconds = time.monotonic() - t0
        finally:
            pages.close()
            os.close(status_r)
            os.close(status_w)
        trial.dumped(images, res, f"{self.kind} checkpoint")
        return seconds

    async def final_dump(self, images: Path, parent: str | None, lazy: bool) -> DumpRun:
        frozen_at = time.monotonic()
        await proc.run([self.kind, "pause", self.container], phase=Phase.FINAL_DUMP)
        self.paused = True
        if self.own_network and self.own_network.links:
            # its copy on the target will be on the link at the same address and MAC (quiet.py)
            self.closed = True
            await quiet.close(self.root_pid)
        connections = criu.connections_config(self.opts)
        pages = _PageSocket(images, connections) if self.streams_pages or lazy else None
        # without a page socket, the connections' options alone (the runtimes have no flags
        # for them, or only newer ones do)
        env = pages.env if pages else proc.environ(**criu.configured(images / PAGES_CONFIG, connections))
        status_r, status_w = os.pipe() if lazy else (-1, -1)   # a lazy dump says "ready" on it
        try:
            argv = checkpoint(self.kind, self.container, str(images),
                              parent=f"../{parent}" if parent else None,
                              page_server=pages.address if pages else None,
                              lazy=lazy, status_fd=status_w if lazy else None, opts=self.opts)
            pass_fds = [*(pages.pass_fds if pages else ()), *([status_w] if lazy else [])]
            dumping = await proc.start(argv, stdout=asyncio.subprocess.DEVNULL, pass_fds=pass_fds, env=env)
        except BaseException:
            if pages:
                pages.close()
            if status_r >= 0:
                os.close(status_r)
            raise
        finally:
            if pages:
                pages.started()
            if status_w >= 0:
                os.close(status_w)
        self.run = _RuncRun(dumping, images / "dump.log", pages, status_r=status_r)
        self.run.frozen_at = frozen_at
        return self.run

    async def dumped(self, run: DumpRun, lazy: bool) -> float:
        if lazy:
            if not (isinstance(run, _RuncRun) and await run.ready()):
                await run.proc.wait()
                raise DumpError(criu_failure(f"{self.kind} checkpoint --lazy-pages", run.proc.returncode, run.log))
        else:
            rc = await run.proc.wait()
            if rc != 0:
                raise DumpError(criu_failure(f"{self.kind} checkpoint", rc, run.log))
        return time.monotonic()

    async def release(self, run: DumpRun, lazy: bool) -> list[str]:
        # Given up by the commit mark alone (recovery.Record.committed): it stays paused and quiet,
        # until every page has been served (lazy), or stop-and-copy's target runs (remove)
        return []

    async def remove(self, run: DumpRun) -> list[str]:
        return await self._delete()

    async def finish_lazy(self, run: DumpRun) -> list[str]:
        await run.proc.wait()
        return await self._delete()

    async def _delete(self) -> list[str]:
        if self.closed:     # its links' MAC free here at once (quiet.unlink)
            await quiet.unlink(self.root_pid)
        res = await proc.run([self.kind, "delete", "--force", self.container], check=False)
        self.paused = False
        return [] if res.returncode == 0 else [
            f"{self.kind} delete {self.container} failed here: {proc.why(res.stderr)}"]

    async def resume(self, run: DumpRun | None, stop_pages: StopPages) -> list[str]:
        if run and run.proc.returncode is None:
            await stop_pages()
            run.close()
            try:
                async with asyncio.timeout(WAITS.dump_exit):
                    await run.proc.wait()
            except TimeoutError:
                await proc.kill(run.proc)
        if self.paused:
            st = await state(self.kind, self.container)
            if st and st.get("status") == "paused":
                await proc.run([self.kind, "resume", self.container], phase=Phase.ROLLBACK)
            self.paused = False
        if self.closed:
            self.closed = False
            if said := await quiet.speak(self.root_pid):
                return [f"container {self.container}: {said}"]
        return []

    async def close(self) -> None:
        if self.run:
            self.run.close()


class _PageSocket:
    """Where CRIU's page-server connection goes: a socketpair, its far end named to CRIU
    through CRIU_CONFIG_FILE, and the held port runc is told (see the module doc). also:
    more of CRIU's configuration, in the same file (a final dump's connections_config)."""

    def __init__(self, images: Path, also: str = ""):
        self.ours, theirs = socket.socketpair()
        try:
            self.fd = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, _PAGES_FD_FLOOR)
        finally:
            theirs.close()
        self.held = _held_port()
        self.env = proc.environ(**criu.configured(images / PAGES_CONFIG, f"ps-socket {self.fd}\n{also}"))
        self.address = f"{LOOPBACK}:{self.held.getsockname()[1]}"
        self.pass_fds = (self.fd,)

    def started(self) -> None:
        """The dump started (or failed to): its end is the dump's now, or nobody's."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.started()
        self.ours.close()
        self.held.close()


class _RuncRun(DumpRun):
    """A runtime's dump: its pages on our socket (runc's), the port held until it ends; a
    lazy dump's page server serves there once it says it is ready (status_r)."""

    def __init__(self, proc_: asyncio.subprocess.Process, log: Path, pages: _PageSocket | None, *,
                 status_r: int = -1):
        super().__init__(proc_, log, pages.ours if pages else None)
        self.held, self.status_r = pages.held if pages else None, status_r

    def close(self) -> None:
        super().close()
        if self.held:
            self.held.close()

    async def ready(self) -> bool:
        def read_once() -> bytes:
            # closed by the thread that reads it: cancelled, this coroutine returns at once while
            # the thread still waits in read(); closed under it, the number could be reused
            try:
                return os.read(self.status_r, 1)
            finally:
                os.close(self.status_r)
        return bool(await asyncio.to_thread(read_once))


def _held_port() -> socket.socket:
    """A port bound on every address, never listened on, and without SO_REUSEADDR: while
    it is held, nobody (CRIU included, which binds with SO_REUSEADDR) can listen on it, and
    a connection to it is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", 0))
    return s
