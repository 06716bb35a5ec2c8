"""Auto-converge's hand on the workload: its cgroup's CPU quota.

QEMU slows a guest that dirties memory faster than pre-copy sends it by putting its
vCPUs to sleep a growing share of the time. A process tree is no vCPU: it may use a
tenth of a core or three. So a throttle of P % here is P % off what the workload
itself used since pre-copy began (its baseline), set as a CFS quota on the cgroup that
holds it: cgroup v2's cpu.max or v1's cpu.cfs_quota_us. Only a cgroup that holds the
workload and nothing else is throttled (a container's own; never a shared one).

The original quota is written to THROTTLE.json in the move's work directory before
the first change, so that `livemig recover` can put it back if livemig is killed
outright while the workload is throttled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import host, proc
from ..errors import LivemigError, Phase
from ..options import SIZES, WAITS
from ..report import ThrottleStep
from ..workdirs import write_private

FILE = "THROTTLE.json"
MIN_QUOTA_US = 1000          # the kernel's smallest CFS quota


class Unavailable(LivemigError):
    """Why the workload cannot be throttled (found at the preflight; a move goes on unthrottled)."""

    def __init__(self, message: str):
        super().__init__(message, phase=Phase.PREFLIGHT)


@dataclass(frozen=True)
class Quota:
    """A CFS bandwidth limit: quota_us of CPU time per period_us (quota_us < 0: none)."""
    quota_us: int
    period_us: int

    @property
    def cpus(self) -> float:
        return self.quota_us / self.period_us if self.quota_us >= 0 else float("inf")


@dataclass(frozen=True)
class CpuCgroup:
    """Where the workload's CPU quota is set and its CPU time read."""
    version: int                 # 1 or 2
    quota_dir: str               # v1: the "cpu" hierarchy's cgroup; v2: the cgroup
    usage_dir: str               # v1: the "cpuacct" hierarchy's ("" if not mounted); v2: the cgroup
    freezer: str = ""            # v1: its freezer.state, v2: its cgroup.freeze ("" if none)

    def read(self) -> Quota:
        d = Path(self.quota_dir)
        if self.version == 2:
            q, per = (d / "cpu.max").read_text().split()
            return Quota(-1 if q == "max" else int(q), int(per))
        return Quota(int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text()))

    def write(self, q: Quota) -> None:
        d = Path(self.quota_dir)
        if self.version == 2:
            (d / "cpu.max").write_text(f"{'max' if q.quota_us < 0 else q.quota_us} {q.period_us}")
            return
        # v1 checks the quota against the period in force: lift the quota first, so that no
        # intermediate pair is refused
        (d / "cpu.cfs_quota_us").write_text("-1")
        (d / "cpu.cfs_period_us").write_text(str(q.period_us))
        (d / "cpu.cfs_quota_us").write_text(str(q.quota_us))

    def freezing(self) -> bool:
        """Has a runtime (or CRIU) asked the cgroup's freezer to freeze it?"""
        if not self.freezer:
            return False
        try:
            state = Path(self.freezer).read_text().strip()
        except OSError:
            return False
        return state == "1" if self.version == 2 else state != "THAWED"

    def usage_ns(self, pids: list[int]) -> int:
        """CPU time the workload has used, in nanoseconds: the cgroup's own account where
        there is one, else its processes' (which forgets the threads that have exited)."""
        if self.version == 2:
            for line in (Path(self.usage_dir) / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) * 1000
        elif self.usage_dir:
            return int((Path(self.usage_dir) / "cpuacct.usage").read_text())
        return sum(host.cpu_ns(pid) for pid in pids)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root, mountpoint, super options) of every cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, post = line.split(" - ", 1)
        fields, post_fields = pre.split(), post.split()
        if post_fields[0] in ("cgroup", "cgroup2"):
            found.append((post_fields[0], fields[3], fields[4], set(post_fields[2].split(","))))
    return found


def _dir(mounts: list[tuple[str, str, str, set[str]]], fstype: str, controller: str, path: str) -> str | None:
    for fs, root, mountpoint, opts in mounts:
        if fs == fstype and (fs == "cgroup2" or controller in opts) and (path + "/").startswith(root.rstrip("/") + "/"):
            return os.path.join(mountpoint, os.path.relpath(path, root))
    return None


def locate(pid: int) -> CpuCgroup:
    """The cgroup that sets pid's CPU quota."""
    lines = [ln.split(":", 2) for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    v1 = {c: path for hid, ctrls, path in lines if hid != "0" for c in ctrls.split(",")}
    mounts = _mounts()
    if "cpu" in v1:
        path = v1["cpu"]
        quota_dir = _dir(mounts, "cgroup", "cpu", path)
        if quota_dir is None:
            raise Unavailable(f"its cpu cgroup {path} is not mounted here")
        acct, frz = v1.get("cpuacct"), v1.get("freezer")
        frz_dir = _dir(mounts, "cgroup", "freezer", frz) if frz else None
        return CpuCgroup(1, quota_dir, (_dir(mounts, "cgroup", "cpuacct", acct) or "") if acct else "",
                         os.path.join(frz_dir, "freezer.state") if frz_dir else "")
    unified = next((p for hid, _, p in lines if hid == "0"), None)
    d = _dir(mounts, "cgroup2", "", unified) if unified is not None else None
    if d is None:
        raise Unavailable("it has no cpu cgroup here")
    if "cpu" not in Path(d, "cgroup.controllers").read_text().split():
        raise Unavailable(f"the cpu controller is not enabled in its cgroup {unified}")
    return CpuCgroup(2, d, d, os.path.join(d, "cgroup.freeze"))


def find(pids: list[int]) -> CpuCgroup:
    """The workload's own cgroup; Unavailable when it shares it, or there is none to use."""
    cgs = {locate(pid) for pid in pids}
    if len(cgs) != 1:
        raise Unavailable("its processes are in different cgroups")
    cg = cgs.pop()
    ours = set(pids)
    if not (Path(cg.quota_dir) / ("cpu.max" if cg.version == 2 else "cpu.cfs_quota_us")).exists():
        raise Unavailable("it is in the root cgroup, which has no CPU quota")
    if os.getpid() in ours or any(p not in ours for p in _members(Path(cg.quota_dir))):
        # throttling it would throttle others too (livemig itself, sshd, a shell)
        raise Unavailable(f"its cgroup {cg.quota_dir} holds other processes too")
    return cg


def _members(d: Path) -> list[int]:
    out = []
    for procs in [d / "cgroup.procs", *d.rglob("*/cgroup.procs")]:
        out += [int(x) for x in procs.read_text().split()]
    return out


class Throttle:
    """The workload's CPU quota, lowered in steps and put back (release) at switchover."""

    def __init__(self, cg: CpuCgroup, pids: list[int], work: Path, what: str = ""):
        self.cg, self.pids, self.record, self.what = cg, pids, work / FILE, what
        self.original: Quota | None = None    # set once the quota was first changed
        self.current: Quota | None = None
        self.baseline: float | None = None
        self._t0 = self._u0 = 0.0

    def begin(self) -> None:
        """Pre-copy starts: the baseline is measured from here to the first step."""
        self._t0, self._u0 = time.monotonic(), self.cg.usage_ns(self.pids)

    def set(self, percent: int, after_round: int) -> ThrottleStep:
        if self.baseline is None:
            used = (self.cg.usage_ns(self.pids) - self._u0) / 1e9
            self.baseline = max(SIZES.throttle_min_cpus, used / max(time.monotonic() - self._t0, 1e-3))
        if self.original is None:
            self.original = self.cg.read()
            save(self.record, self.cg, self.original, self.what)
        cpus = min(self.baseline * (100 - percent) / 100, self.original.cpus)
        period = self.original.period_us
        if cpus * period < MIN_QUOTA_US:
            # a long period lets a small share still be a quota the kernel takes
            period = min(SIZES.throttle_max_period_us, int(MIN_QUOTA_US / cpus) + 1)
        self.current = Quota(max(MIN_QUOTA_US, int(cpus * period)), period)
        self.cg.write(self.current)
        return ThrottleStep(after_round, percent, round(self.baseline, 4), round(self.current.cpus, 4))

    def held(self, pid: int) -> bool:
        """Is the workload being frozen or dumped: its cgroup's freezer asked to freeze it
        (runc, crun, podman, CRIU's --freeze-cgroup), or CRIU holding pid (ptrace)?"""
        return self.cg.freezing() or proc.tracer(pid) != 0

    async def eased_while_held(self, pid: int, dumping: Awaitable[object]) -> None:
        """For a pre-dump: while the workload is being frozen and dumped, its quota is the
        original one, and the throttle is back once CRIU lets go; until dumping (an
        awaitable) is done. A throttled task is slow to reach the freezer, and CRIU's
        parasite runs as the workload: throttled, a parasite draining 60 MiB kept it frozen
        12 s in the VM lab. Frozen or held, it runs none of its own code meanwhile."""
        if self.current is None:
            await dumping
            return
        eased = False
        waiting = asyncio.ensure_future(dumping)
        try:
            while not waiting.done():
                held = self.held(pid)
                quota = self.original if held else self.current
                if held != eased and quota is not None:
                    self.cg.write(quota)
                    eased = held
                await asyncio.wait({waiting}, timeout=WAITS.throttle_hold_poll)
            await waiting
        finally:
            if eased and self.current is not None:
                self.cg.write(self.current)

    async def released_once_held(self, pid: int, wait: float) -> None:
        """For the final dump (switchover): the original quota back as soon as the freeze
        begins, so that the workload runs no unthrottled moment before it (at 400 MiB/s
        dirtied, 50 ms of it are 5000 pages more for the final dump), yet freezes and is
        dumped at full speed; at the latest after wait seconds."""
        if self.current is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            while not self.held(pid) and loop.time() < deadline:
                await asyncio.sleep(WAITS.throttle_hold_poll)
        finally:
            self.release()

    def release(self) -> None:
        """The original quota back; again, harmlessly. The cgroup may be gone with its
        workload (a container deleted at the commit)."""
        if self.original is None:
            return
        # the cgroup went with its workload (deleted at the commit): no quota left to restore
        with contextlib.suppress(FileNotFoundError):
            self.cg.write(self.original)
        self.original = self.current = None
        self.record.unlink(missing_ok=True)


def save(path: Path, cg: CpuCgroup, original: Quota, what: str) -> None:
    me = os.getpid()
    write_private(path, {"cgroup": asdict(cg), "quota": asdict(original), "workload": what,
                         "coordinator": [me, proc.start_time(me) or 0], "boot": proc.boot_id()})


def left(work: Path) -> str | None:
    """The workload a killed livemig left throttled in work (None: none, or its livemig lives)."""
    path = work / FILE
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    pid, t = d["coordinator"]
    return None if proc.named([(pid, t)], d.get("boot", "")) else d.get("workload", "")


def restarted(work: Path) -> bool:
    """Was the throttle left in work set in an earlier boot of this host?"""
    try:
        boot = json.loads((work / FILE).read_text()).get("boot", "")
    except (OSError, ValueError):      # none left (or unreadable): nothing says so
        return False
    return bool(boot) and boot != proc.boot_id()


def lift_left(work: Path) -> str:
    """`livemig recover`: put back a quota whose livemig was killed; what it did, or ""."""
    if left(work) is None:
        return ""       # none, or still moving it: its own release will come
    path = work / FILE
    if restarted(work):
        # cgroups do not outlive a boot: one at that path now is another's, never written
        path.unlink(missing_ok=True)
        return "its CPU throttle went with the restart"
    d = json.loads(path.read_text())
    cg, q = CpuCgroup(**d["cgroup"]), Quota(**d["quota"])
    try:
        cg.write(q)
        done = "its CPU throttle is lifted"
    except FileNotFoundError:
        done = "its throttled cgroup is gone"
    path.unlink(missing_ok=True)
    return done
