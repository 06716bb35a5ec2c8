"""The workload as one host holds it after a final dump, stopped (a tree) or paused (a
container), to resume or to end: the source's copy while the move may still go either way,
and a target's restored copy that its coordinator never resumed (the agent's orphan). Both
sides keep one, on disk, for `livemig recover`."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from .. import criu, proc
from ..errors import LivemigError, Phase
from ..wire import protocol as p
from . import bundle, control, oci, podman, process, quiet

# How a held copy stands on this host now (HeldCopy.standing)
REBOOTED = "rebooted"     # its boot is over: nothing of it runs, whatever has its PIDs now
GONE = "gone"
HELD = "held"             # a tracer holds its processes: CRIU still at work (or a debugger)
STOPPED = "stopped"       # a tree stopped, a container paused (or podman's, checkpointed): it may run again
RUNNING = "running"


@dataclass
class HeldCopy:
    """The workload as one host holds it, stopped (a tree) or paused (a container), to
    resume or to end: the source's copy after its final dump, or a target's restored copy
    that its coordinator never resumed (the agent's Orphan)."""
    runtime: str                                   # "process", or the container's runtime
    pids: list[proc.Task] = field(default_factory=list)   # (PID, start time), the root first
    container: str = ""
    bundle: str = ""        # its bundle, copied to the other host: it goes when the copy does
    boot: str = ""          # the boot the pairs were taken in: after a reboot none of them runs
    stopped: bool = False   # a container's tasks are stopped too (SIGSTOP): a target's restored copy
    # The tasks the workload had stopped itself when it was dumped: they stay stopped when
    # the rest runs again (their stop is the workload's state, not the move's).
    own_stops: list[proc.Task] = field(default_factory=list)
    tcp_established: bool = False   # its dump kept its connections: a restore here must ask for them too
    hushed: list[str] = field(default_factory=list)   # a target's copy kept off the link from the host (quiet.hush)

    @classmethod
    def from_dict(cls, d: dict) -> HeldCopy:
        return cls(d["runtime"], [tuple(x) for x in d["pids"]], d["container"], d.get("bundle", ""),
                   d.get("boot", ""), d.get("stopped", False), [tuple(x) for x in d.get("own_stops", [])],
                   d.get("tcp_established", False), list(d.get("hushed", [])))

    @classmethod
    def of(cls, workload, bundle_moves: bool = False) -> HeldCopy:
        """The workload's tree as it is now (frozen, once its final dump has begun)."""
        return cls(workload.kind, proc.tasks(workload.pids()), "" if workload.kind == "process" else workload.name,
                   str(workload.bundle()) if bundle_moves else "", proc.boot_id(), own_stops=list(workload.own_stops),
                   tcp_established=workload.opts.tcp_established)

    @property
    def what(self) -> str:
        if self.runtime == "process":
            return f"PID {self.pids[0][0]}" if self.pids else "a process tree"
        return f"{self.runtime} container {self.container}"

    async def standing(self) -> str:
        """How it is here now, read from the host itself (REBOOTED, GONE, HELD, STOPPED or RUNNING),
        never from what was said of it."""
        if self.boot and self.boot != proc.boot_id():
            return REBOOTED
        if self.runtime == "process":
            return self._tree_standing()
        if self.runtime == "podman":
            found = await podman.inspect(self.container)
            st = found.get("State", {}) if found else {}
            if st.get("Paused"):
                return STOPPED
            if st.get("Running"):
                return RUNNING
            return STOPPED if st.get("Checkpointed") else GONE     # its checkpoint brings it back
        st = await oci.state(self.runtime, self.container)
        return {"paused": STOPPED, "running": RUNNING}.get(str((st or {}).get("status")), GONE)

    def _tree_standing(self) -> str:
        states = {pid: proc.state(pid) for pid, _ in self._alive()}
        live = [pid for pid, st in states.items() if st not in (None, "Z", "X")]    # a zombie runs nothing
        if not live:
            return GONE
        if any(proc.tracer(pid) for pid in live):
            return HELD
        # A task the workload stopped itself tells nothing of the move's stop; a tree of
        # nothing else is as the workload left it, which RUNNING stands for.
        own = {pid for pid, _ in self.own_stops}
        return STOPPED if all(states[pid] in ("T", "t") for pid in live if pid not in own) and \
            any(pid not in own for pid in live) else RUNNING

    def _alive(self) -> list[proc.Task]:
        alive = set(proc.named(self.pids, self.boot))
        return [t for t in self.pids if t[0] in alive]

    def _ours(self) -> list[proc.Task]:
        """Its live tasks that the move stopped: all but the workload's own stops."""
        return [t for t in self._alive() if t not in self.own_stops]

    def _control(self, action: str) -> list[str]:
        return control(p.Container(self.runtime, self.container, ""), action)

    async def resume(self, lazy_images: Path | None = None) -> list[str]:
        """Let it run again, from the final dump, as it is now (not as it was left: a move
        killed before its pause, or a resume that ran already, leave it running). Returns
        once it runs, with what could not be put back as it was; else raises, saying how it
        is instead. lazy_images: a process tree's lazy dump, cut short (its network lock)."""
        warnings = []
        if lazy_images is not None and self.runtime == "process":
            warnings = await process.unlock_after_lazy([pid for pid, _ in self._alive()], lazy_images)
        await self._resume()
        now = await self.standing()
        if now != RUNNING:
            raise LivemigError(f"{self.what} was resumed, but it does not run: it is {self.told(now)}",
                               phase=Phase.ROLLBACK)
        # a container's own network, quiet since its move's freeze or its restore (quiet.py), as it was
        await quiet.unhush(self.hushed)
        if self.runtime != "process" and (alive := self._alive()) and (said := await quiet.speak(alive[0][0])):
            warnings.append(f"{self.what}: {said}")
        return warnings

    @staticmethod
    def told(standing: str) -> str:
        """standing, as a sentence says it."""
        return {REBOOTED: "gone with a restart of this host", HELD: "held by a tracer (CRIU, or a debugger)"
                }.get(standing, standing)

    async def _resume(self) -> None:
        if self.runtime == "process":
            proc.signal_tasks(self._ours(), signal.SIGCONT)     # a no-op on a running task
            return
        if self.runtime == "podman":
            await self._resume_podman()
        else:
            st = await oci.state(self.runtime, self.container)
            status = st.get("status") if st else None
            if status == "paused":
                await proc.run(self._control("resume"), phase=Phase.ROLLBACK)
            elif status != "running":
                raise self._cannot_resume(status or "gone")
        if self.stopped:     # thawed, its tasks still stopped: leaves first, as the target's Resume
            proc.signal_tasks(self._ours()[::-1], signal.SIGCONT)

    async def _resume_podman(self) -> None:
        """podman cannot checkpoint a paused container: its final checkpoint stopped it, and
        only a restore from the checkpoint podman kept brings it back (a target's restored
        copy, or a move killed before its checkpoint, may be paused, or running, instead)."""
        found = await podman.inspect(self.container)
        if found is None:
            raise self._cannot_resume("gone")
        st = found.get("State", {})
        if st.get("Paused"):
            await proc.run(self._control("resume"), phase=Phase.ROLLBACK)
        elif not st.get("Running"):
            await proc.run(podman.restore_kept(self.container, self._dumped_with()), phase=Phase.ROLLBACK,
                           leaves_daemon=True)

    def _dumped_with(self) -> criu.Options:
        # (podman's checkpoints always take the connections as they are: podman.flags)
        return criu.Options(tcp_established=self.tcp_established or self.runtime == "podman")

    async def from_its_checkpoint(self, work: Path, unit: str) -> str:
        """A podman container never given up and gone here: podman removed it at its checkpoint
        (a --rm container's conmon does), and the archive that checkpoint exported for the
        target, kept in the move's directory work (podman.KEPT_ARCHIVE), is the workload as it
        froze. It is restored here from that, under its name, as a rollback restores it: "". A
        Quadlet's is not (its unit would have to take it): what keeps it, and where its archive
        is kept for the operator. No archive: ""."""
        archive = work / podman.KEPT_ARCHIVE
        if not archive.exists():
            return ""       # nothing to restore from: gone, as recover then says
        if unit:
            return (f"podman container {self.container} is gone here (podman removed it at its checkpoint), and "
                    f"its unit {unit} would have to take it again: its checkpoint is kept in {archive}; restore "
                    f"it with `podman container restore --import {archive} --name {self.container}` once {unit} "
                    "is stopped, then run `livemig recover` again")
        previous = work / podman.KEPT_PREVIOUS
        await proc.run(podman.restore_archive(archive, self.container, self._dumped_with(),
                                              previous if previous.exists() else None),
                       phase=Phase.ROLLBACK, leaves_daemon=True)
        return ""

    def _cannot_resume(self, status: str) -> LivemigError:
        return LivemigError(f"{self.runtime} container {self.container} is {status}: there is nothing to "
                            "resume", phase=Phase.ROLLBACK)

    async def exists(self) -> bool:
        """Is it still here (stopped, paused, or running)?"""
        if self.runtime == "process":
            return bool(self._alive())
        return (await proc.run(self._control("exists"), check=False)).returncode == 0

    def root_gone(self) -> bool:
        """Is its root process (a container's init) gone? Read in /proc alone. A zombie has
        gone: it exited, and only its parent's reaping is still to come (a round that read a
        killed workload before its reaper did went on to the final dump, and failed there)."""
        if not self.pids:
            return False
        return not proc.named(self.pids[:1], self.boot) or proc.state(self.pids[0][0]) in ("Z", "X")

    async def exited(self) -> bool:
        """Did it end by itself (its root process gone, its container stopped or gone)?"""
        if self.runtime == "process":
            return self.root_gone()
        res = await proc.run(self._control("exists"), check=False)
        if res.returncode != 0:
            return True
        try:     # runc and crun print their state; podman's `container exists` prints nothing
            return json.loads(res.stdout).get("status") == "stopped"
        except ValueError:     # no state printed (podman): it exists, so it has not ended
            return False

    async def end(self) -> list[str]:
        """Its target's copy runs: this one goes. Returns warnings."""
        if self.runtime == "process":
            proc.signal_tasks(self._alive(), signal.SIGKILL)
            return []
        await quiet.unhush(self.hushed)
        if alive := self._alive():     # (a container's: its own network's)
            await quiet.unlink(alive[0][0])     # its links' MAC free here at once (quiet.unlink)
        res = await proc.run(self._control("delete"), check=False)
        if res.returncode != 0 and await self.exists():
            return [f"{self.runtime} delete {self.container} failed here: {proc.why(res.stderr)}"]
        if self.bundle and Path(self.bundle).is_dir():
            if bundle.mounts_under(Path(self.bundle)):
                return [f"the bundle {self.bundle} stays here: file systems are mounted in it"]
            shutil.rmtree(self.bundle, ignore_errors=True)     # what is left is only disk, not the workload
        return []


