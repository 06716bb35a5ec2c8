"""A bare process tree, checkpointed by CRIU directly.

Pages leave CRIU on one end of a socketpair (--ps-socket) that the coordinator
relays to the target. The final dump's commit point is CRIU's post-dump action
script (hook.py): CRIU waits there with the tree frozen until the coordinator
says "killed" (commit) or "resume" (rollback).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

from .. import addresses, criu, host, proc, trial
from ..errors import CommandFailed, DumpError, Phase, PreflightError
from ..options import WAITS
from . import hook
from .workload import DumpRun, StopPages, Workload


class ProcessTree(Workload):
    kind = "process"

    def __init__(self, pid: int, opts: criu.Options, work: Path):
        if not os.path.exists(f"/proc/{pid}"):
            raise PreflightError(f"no process with PID {pid}")
        self.root_pid, self.name, self.opts, self.work = pid, str(pid), opts, work
        # The tree as CRIU froze it, read once it is frozen (dumped), (PID, start time): what
        # is stopped, killed after the move and resumed on rollback. Before the freeze the
        # tree is read afresh each time: it may fork, and its children exit.
        self.frozen: list[proc.Task] = []
        self.hook: hook.HookServer | None = None
        self.run: DumpRun | None = None
        self.dump_flags: list[str] = []    # the final dump's own: its streams to journald (units.py)

    def pids(self) -> list[int]:
        if self.frozen:
            return [pid for pid, _ in self.frozen]
        return proc.process_tree(self.root_pid)

    async def pre_dump(self, images: Path, parent: str | None) -> DumpRun:
        ours, theirs = socket.socketpair()
        try:
            argv = criu.pre_dump(self.root_pid, str(images), theirs.fileno(),
                                 f"../{parent}" if parent else None, self.opts)
            dumping = await proc.start(argv, stdout=asyncio.subprocess.DEVNULL, pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return DumpRun(dumping, images / "pre-dump.log", ours)

    async def trial_dump(self, images: Path) -> float:
        return await trial.take(self.root_pid, images, self.opts, nothing_to_lock=host.same_netns(self.root_pid),
                                extra=tuple(self.dump_flags))

    async def final_dump(self, images: Path, parent: str | None, lazy: bool) -> DumpRun:
        self.hook = await hook.HookServer.start(self.work)
        ours, theirs = socket.socketpair()
        try:
            argv = criu.dump(self.root_pid, str(images), ps_fd=theirs.fileno(), hook=str(self.hook.script),
                             parent=f"../{parent}" if parent else None, lazy=lazy, opts=self.opts,
                             nothing_to_lock=host.same_netns(self.root_pid), extra=tuple(self.dump_flags))
            dumping = await proc.start(argv, stdout=asyncio.subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                                       env=proc.environ(**self.hook.environment()))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.run = DumpRun(dumping, images / "dump.log", ours)
        return self.run

    def _final_hook(self) -> hook.HookServer:
        """The final dump's hook: what the steps after final_dump() act through."""
        if self.hook is None:
            raise DumpError("no final dump was started", phase=Phase.FINAL_DUMP)
        return self.hook

    async def dumped(self, run: DumpRun, lazy: bool) -> float:
        h = self._final_hook()
        exited = asyncio.create_task(run.proc.wait())
        try:
            await asyncio.wait({h.post_dump, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not h.post_dump.done():
            raise DumpError(criu_failure("criu dump", run.proc.returncode, run.log))
        run.frozen_at = h.frozen_at
        # CRIU holds the tree frozen while its post-dump step waits for us: no task forks or
        # exits now, so this is the tree that was dumped, children forked in pre-copy included.
        self.frozen = proc.tasks(proc.process_tree(self.root_pid))
        if lazy:
            # The pages are read in the frozen tree itself (push.Pusher.read_in_place), and
            # CRIU resumes the tree by itself if its lazy page server fails (cr_dump_finish:
            # TASK_ALIVE on error), or lets go of it if killed. A SIGSTOP queued while CRIU
            # holds it (it waits here for our verdict) outlasts its detach: the tree never
            # runs again but on rollback, so what is read is what was dumped. The tasks the
            # workload stopped itself get none: CRIU leaves them stopped as it found them,
            # and a rollback continues only the others (a SIGSTOP left pending on them would
            # be state the workload never had).
            try:
                stopped = criu.stopped_tasks(run.log.parent)
            except (OSError, ValueError) as e:     # CRIU's hook still waits: a rollback resumes the tree
                raise DumpError(f"the dump's images do not say which tasks were stopped: {e}") from None
            own = proc.dumped_as(self.root_pid, [pid for pid, _ in self.frozen], stopped)
            self.own_stops = tuple(t for t in self.frozen if t[0] in own)
            proc.signal_tasks(self._ours(), signal.SIGSTOP)
            if let_go := [pid for pid in proc.named(self.frozen) if _traceable(pid) and proc.tracer(pid) == 0]:
                proc.signal_tasks(self._ours(), signal.SIGCONT)    # it runs on, as CRIU left it
                raise DumpError(f"CRIU let go of PID {let_go[0]} before the dump was done")
            h.proceed()     # CRIU goes on to serve pages, the tree stays stopped
        return h.post_dump.result()

    async def release(self, run: DumpRun, lazy: bool) -> list[str]:
        h = self._final_hook()
        if lazy:
            # From the target's first instruction on, it is the workload: never resume the
            # source. The SIGSTOP queued at the dump keeps it stopped however CRIU ends, so
            # that only the target's verdict lets this copy run again (source/recovery.py).
            h.mark_committed()
            return []
        h.commit()             # durable first: a crash from here on means "moved"; CRIU kills the source
        return []

    async def remove(self, run: DumpRun) -> list[str]:
        rc = await run.proc.wait()     # CRIU has killed the source, and exits
        return [f"criu dump exited {rc} after the commit"] if rc != 0 else await self._network_let_go(run)

    async def finish_lazy(self, run: DumpRun) -> list[str]:
        await run.proc.wait()
        proc.signal_tasks(self.frozen, signal.SIGKILL)   # left stopped by the lazy dump
        return await self._network_let_go(run)

    async def resume(self, run: DumpRun | None, stop_pages: StopPages) -> list[str]:
        h = self.hook
        lazy_served = h is not None and h.post_dump.done() and not h.waiting
        if h and h.waiting:
            h.rollback()                   # CRIU resumes the source
        elif run and run.proc.returncode is None:
            if h and not h.post_dump.done():
                h.rollback()               # still dumping: its post-dump step hears it at once
            # Still dumping, or serving lazy pages: cut its page stream, and CRIU ends.
            await stop_pages()
            run.close()
        if run and run.proc.returncode is None:
            try:
                async with asyncio.timeout(WAITS.dump_exit):
                    await run.proc.wait()
            except TimeoutError:
                # Never seen; CRIU's ptrace detach on exit lets the frozen tasks go on.
                await proc.kill(run.proc)
        warnings = []
        if lazy_served:
            if run is not None:
                warnings = await unlock_after_lazy([pid for pid, _ in self.frozen], run.log.parent)
            # A lazy dump leaves the source stopped (--leave-stopped): let it run again.
            # The target's copy never ran: it is resumed only after the commit.
            proc.signal_tasks(self._ours(), signal.SIGCONT)
        self.frozen, self.own_stops = [], ()     # it runs again: its tree is read afresh from here on
        return warnings

    async def _network_let_go(self, run: DumpRun) -> list[str]:
        """Once the source's copy is gone: CRIU leaves its network lock (taken only for the
        connections it was asked to carry) for the restore to lift, which does so on its own
        host, so the source's would stay for good (a table a move)."""
        if not self.opts.tcp_established:
            return []
        why = await unlock_network(run.log.parent)
        return [f"CRIU's network lock stays on this host: {why}"] if why else []

    def _ours(self) -> list[proc.Task]:
        """The frozen tree's tasks that the move stopped: all but the workload's own stops."""
        return [t for t in self.frozen if t not in self.own_stops]

    async def close(self) -> None:
        if self.hook:
            await self.hook.close()
        if self.run:
            self.run.close()


def _traceable(pid: int) -> bool:
    """Can CRIU hold pid by ptrace? A zombie it dumps from /proc, never traced."""
    return proc.state(pid) not in (None, "Z", "X")


def criu_failure(what: str, rc: int | None, log: Path, stderr: bytes = b"") -> str:
    """Why a dump failed: CRIU's log says best; else what the command printed."""
    try:
        errors = criu.log_errors(log.read_text(errors="replace"), limit=2)
    except OSError:
        errors = []
    if not errors and stderr.strip():
        errors = [proc.why(stderr)]
    return f"{what} exited {rc}" + (f": {errors[0]}" if errors else "")


async def unlock_after_lazy(pids: list[int], images: Path) -> list[str]:
    """A tree whose lazy dump (in images) was cut short, as a rollback cuts it, put back as
    CRIU leaves a dump it could not finish where it unlocks in time: CRIU lets go of its
    network lock and of its sockets' repair mode only before it serves lazy pages, so the
    tree's connections would stay dead (EPERM). What could not be undone, in words."""
    if not addresses.in_repair(pids):
        return []       # no connection was taken: the dump locked none
    why = await unlock_network(images)
    addresses.repair_off(pids)
    return [f"the workload's connections may stay blocked: {why}"] if why else []


async def unlock_network(images: Path) -> str | None:
    """The network lock a lazy dump took, let go of where CRIU itself did not: it unlocks only
    before it serves the lazy pages (cr_dump_finish), so a dump whose page serving fails, as a
    rollback makes it, leaves its table (and its sockets in repair: addresses.repair_off).
    None once done (or if there was none); else why not, for a warning."""
    try:
        run_id = criu.parse_run_id((images / "inventory.img").read_bytes())
    except (OSError, ValueError) as e:
        return f"cannot read which network lock the dump took: {e}"
    if run_id is None:
        return None
    try:
        listed = await proc.run(["nft", "list", "tables", "inet"], check=False)
    except CommandFailed as e:      # no nft here: the table, if any, cannot be lifted
        return str(e)
    # CRIU cuts the name to its buffer ("inet CRIU-" and the run id's first 21 characters, in 4.2)
    tables = [t for t in listed.stdout.decode(errors="replace").split()
              if t.startswith("CRIU-") and len(t) > 13 and f"CRIU-{run_id}".startswith(t)]
    if listed.returncode != 0 or not tables:
        return None     # no such table: the dump locked nothing, or not with nftables
    table = tables[0]
    gone = await proc.run(["nft", "delete", "table", "inet", table], check=False)
    return None if gone.returncode == 0 else f"nft delete table inet {table}: {proc.why(gone.stderr)}"
