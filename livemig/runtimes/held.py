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

from .. import proc
from ..errors import LivemigError, Phase
from ..wire import protocol as p
from . import bundle, control, oci, podman


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

    @classmethod
    def from_dict(cls, d: dict) -> HeldCopy:
        return cls(d["runtime"], [tuple(x) for x in d["pids"]], d["container"], d.get("bundle", ""),
                   d.get("boot", ""), d.get("stopped", False))

    @classmethod
    def of(cls, workload, bundle_moves: bool = False) -> HeldCopy:
        """The workload's tree as it is now (frozen, once its final dump has begun)."""
        return cls(workload.kind, proc.tasks(workload.pids()), "" if workload.kind == "process" else workload.name,
                   str(workload.bundle()) if bundle_moves else "", proc.boot_id())

    def _alive(self) -> list[proc.Task]:
        alive = set(proc.named(self.pids, self.boot))
        return [t for t in self.pids if t[0] in alive]

    def _control(self, action: str) -> list[str]:
        return control(p.Container(self.runtime, self.container, ""), action)

    async def resume(self) -> None:
        """Let it run again, from the final dump, as it is now (not as it was left: a move
        killed before its pause, or a resume that ran already, leave it running)."""
        if self.runtime == "process":
            proc.signal_tasks(self._alive(), signal.SIGCONT)     # a no-op on a running task
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
            proc.signal_tasks(self._alive()[::-1], signal.SIGCONT)

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
            await proc.run(podman.restore_kept(self.container), phase=Phase.ROLLBACK, leaves_daemon=True)

    def _cannot_resume(self, status: str) -> LivemigError:
        return LivemigError(f"{self.runtime} container {self.container} is {status}: there is nothing to "
                            "resume", phase=Phase.ROLLBACK)

    async def exists(self) -> bool:
        """Is it still here (stopped, paused, or running)?"""
        if self.runtime == "process":
            return bool(self._alive())
        return (await proc.run(self._control("exists"), check=False)).returncode == 0

    def root_gone(self) -> bool:
        """Is its root process (a container's init) gone? Read in /proc alone."""
        return bool(self.pids) and not proc.named(self.pids[:1], self.boot)

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
        res = await proc.run(self._control("delete"), check=False)
        if res.returncode != 0 and await self.exists():
            return [f"{self.runtime} delete {self.container} failed here: {proc.why(res.stderr)}"]
        if self.bundle and Path(self.bundle).is_dir():
            if bundle.mounts_under(Path(self.bundle)):
                return [f"the bundle {self.bundle} stays here: file systems are mounted in it"]
            shutil.rmtree(self.bundle, ignore_errors=True)     # what is left is only disk, not the workload
        return []


