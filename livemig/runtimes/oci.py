"""OCI containers under runc or crun, checkpointed through the runtime itself.

Going through the runtime (not CRIU directly) is what makes the target's runtime
know the container afterwards: `runc list` there shows it, `runc exec` works.

The commit point is the runtime's own freeze. The container is paused (cgroup
freezer) before the final dump, and dumped with --leave-running: CRIU leaves a
cgroup it found frozen frozen, so after the dump the source stays paused, neither
running nor gone. Commit deletes it; rollback resumes it. The target restores it with
its tasks stopped (CRIU's leave-stopped, in a configuration file: target/restore.py) and
pauses it, and runs it only once the source is deleted.

runc streams pages to a page server (--page-server ADDRESS:PORT: a TCP port on
loopback that livemig relays to the target) and serves them lazily; crun has
neither, so its images are written here and sent as files, and it has no post-copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

from .. import criu, proc
from ..errors import CommandFailed, DumpError, Phase, PreflightError
from ..options import WAITS
from ..wire import protocol as p
from .process import criu_failure
from .workload import DumpRun, StopPages, Workload

RUNTIMES = ("runc", "crun")
_NO_OPTIONS = criu.Options()     # nothing asked of CRIU (frozen: one instance serves every call)
LOOPBACK = "127.0.0.1"


def flags(opts: criu.Options) -> list[str]:
    """CRIU options as the runtimes spell them: as CRIU does, but for the cgroup mode,
    which each runtime sets right for its own cgroups."""
    return [f for f in opts.flags() if not f.startswith("--manage-cgroups")]


def checkpoint(runtime: str, container: str, images: str, *, pre_dump: bool = False,
               parent: str | None = None, page_server: str | None = None, lazy: bool = False,
               status_fd: int | None = None, opts: criu.Options = _NO_OPTIONS) -> list[str]:
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
            opts: criu.Options = _NO_OPTIONS) -> list[str]:
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
    return OciContainer(rt, st["id"], int(st["pid"]), Path(st["bundle"]), opts)


class OciContainer(Workload):
    def __init__(self, runtime: str, container: str, pid: int, bundle: Path, opts: criu.Options):
        self.kind, self.container, self.root_pid, self._bundle, self.opts = runtime, container, pid, bundle, opts
        self.name = container
        self.streams_pages = runtime == "runc"
        self.paused = False
        self.run: DumpRun | None = None

    def pids(self) -> list[int]:
        return proc.process_tree(self.root_pid)

    def bundle(self) -> Path:
        return self._bundle

    def target_spec(self) -> p.Container:
        return p.Container(self.kind, self.container, str(self._bundle))

    async def pre_dump(self, images: Path, parent: str | None) -> DumpRun:
        listener = _listen() if self.streams_pages else None
        try:
            argv = checkpoint(self.kind, self.container, str(images), pre_dump=True,
                              parent=f"../{parent}" if parent else None,
                              page_server=_address(listener), opts=self.opts)
            dumping = await proc.start(argv, stdout=asyncio.subprocess.DEVNULL)
        except BaseException:
            if listener:
                listener.close()
            raise
        return _PageServerClientRun(dumping, images / "dump.log", listener=listener)

    async def final_dump(self, images: Path, parent: str | None, lazy: bool) -> DumpRun:
        frozen_at = time.monotonic()
        await proc.run([self.kind, "pause", self.container], phase=Phase.FINAL_DUMP)
        self.paused = True
        listener: socket.socket | None = None
        port, status_r = 0, -1          # a lazy dump's: its page server's, the pipe it says "ready" on
        pass_fds: list[int] = []
        if lazy:
            port = _free_port()
            status_r, status_w = os.pipe()
            pass_fds = [status_w]
        elif self.streams_pages:
            listener = _listen()
        try:
            argv = checkpoint(self.kind, self.container, str(images),
                              parent=f"../{parent}" if parent else None,
                              page_server=f"{LOOPBACK}:{port}" if lazy else _address(listener),
                              lazy=lazy, status_fd=pass_fds[0] if lazy else None, opts=self.opts)
            dumping = await proc.start(argv, stdout=asyncio.subprocess.DEVNULL, pass_fds=pass_fds)
        except BaseException:
            if listener:
                listener.close()
            if status_r >= 0:
                os.close(status_r)
            raise
        finally:
            for fd in pass_fds:
                os.close(fd)
        if lazy:
            self.run = _LazyServerRun(dumping, images / "dump.log", port=port, status_r=status_r)
        else:
            self.run = _PageServerClientRun(dumping, images / "dump.log", listener=listener)
        self.run.frozen_at = frozen_at
        return self.run

    async def dumped(self, run: DumpRun, lazy: bool) -> float:
        if lazy:
            if not (isinstance(run, _LazyServerRun) and await run.ready()):
                await run.proc.wait()
                raise DumpError(criu_failure(f"{self.kind} checkpoint --lazy-pages", run.proc.returncode, run.log))
        else:
            rc = await run.proc.wait()
            if rc != 0:
                raise DumpError(criu_failure(f"{self.kind} checkpoint", rc, run.log))
        return time.monotonic()

    async def release(self, run: DumpRun, lazy: bool) -> list[str]:
        if lazy:
            return []     # the source stays paused until every page has been served
        return await self._delete()

    async def finish_lazy(self, run: DumpRun) -> None:
        await run.proc.wait()
        await self._delete()

    async def _delete(self) -> list[str]:
        res = await proc.run([self.kind, "delete", "--force", self.container], check=False)
        self.paused = False
        return [] if res.returncode == 0 else [
            f"{self.kind} delete {self.container} failed here: {proc.why(res.stderr)}"]

    async def resume(self, run: DumpRun | None, stop_pages: StopPages) -> None:
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

    async def close(self) -> None:
        if self.run:
            self.run.close()


class _PageServerClientRun(DumpRun):
    """CRIU connects to our loopback listener as a page-server client."""

    def __init__(self, proc_: asyncio.subprocess.Process, log: Path, *, listener: socket.socket | None):
        super().__init__(proc_, log)
        self.listener = listener

    async def pages(self) -> socket.socket | None:
        if self.listener is None:
            return None
        loop = asyncio.get_running_loop()
        accepting = asyncio.ensure_future(loop.sock_accept(self.listener))
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait({accepting, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not accepting.done():
                accepting.cancel()
        if accepting.done() and not accepting.cancelled():
            self.sock, _ = accepting.result()
        self.listener.close()
        return self.sock

    def close(self) -> None:
        super().close()
        if self.listener:
            self.listener.close()


class _LazyServerRun(DumpRun):
    """A lazy dump listens on a loopback port; the relay connects once it says it is ready."""

    def __init__(self, proc_: asyncio.subprocess.Process, log: Path, *, port: int, status_r: int):
        super().__init__(proc_, log)
        self.port, self.status_r = port, status_r

    async def ready(self) -> bool:
        def read_once() -> bytes:
            # closed by the thread that reads it: cancelled, this coroutine returns at once while
            # the thread still waits in read(); closed under it, the number could be reused
            try:
                return os.read(self.status_r, 1)
            finally:
                os.close(self.status_r)
        return bool(await asyncio.to_thread(read_once))

    async def lazy_pages(self) -> socket.socket:
        _, writer = await asyncio.open_connection(LOOPBACK, self.port)
        sock = writer.get_extra_info("socket").dup()
        writer.transport.abort()
        self.sock = socket.socket(fileno=sock.detach())
        return self.sock


def _listen() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOPBACK, 0))
    s.listen(1)
    s.setblocking(False)
    return s


def _address(listener: socket.socket | None) -> str | None:
    return f"{LOOPBACK}:{listener.getsockname()[1]}" if listener else None


def _free_port() -> int:
    """A port for a lazy dump to listen on. The runtimes take a number, not a socket, so
    another program could take it first: the dump then fails cleanly and rolls back."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]
