"""Auto-converge's throttle on a real cgroup of this machine (v1 or v2), around a child
that spins: its CPU use must follow the quota, and come back when released."""

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livemig import host
from livemig.options import SIZES
from livemig.source import throttle

SPIN = "import sys\nprint('ready', flush=True)\nwhile True: pass\n"


def _cgroup_dirs(name: str) -> list[Path]:
    """A fresh child of our own cgroup in each hierarchy that throttles or accounts CPU."""
    dirs = []
    own = {c: path for hid, ctrls, path in (ln.split(":", 2) for ln in Path("/proc/self/cgroup").read_text().splitlines())
           for c in (ctrls.split(",") if hid != "0" else ["0"])}
    for fstype, root, mountpoint, opts in throttle._mounts():
        key = "0" if fstype == "cgroup2" else next((c for c in ("cpu", "cpuacct", "freezer") if c in opts), None)
        if key is None or key not in own:
            continue
        if fstype == "cgroup2" and "cpu" not in (Path(mountpoint, os.path.relpath(own[key], root), "cgroup.subtree_control")
                                                 .read_text().split()):
            continue
        d = Path(mountpoint, os.path.relpath(own[key], root), name)
        d.mkdir(exist_ok=True)
        dirs.append(d)
    return dirs


@pytest.fixture
def spinner():
    if os.geteuid() != 0:
        pytest.fail("the throttle tests need root (cgroups)")
    dirs = _cgroup_dirs(f"livemig-test-throttle-{os.getpid()}")
    assert dirs, "no cgroup hierarchy with the cpu controller here"
    p = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    for d in dirs:
        (d / "cgroup.procs").write_text(str(p.pid))
    yield p
    p.kill()
    p.wait()
    for d in dirs:
        for _ in range(50):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def _cpus(cg: throttle.CpuCgroup, pids: list[int], seconds: float) -> float:
    u0, t0 = cg.usage_ns(pids), time.monotonic()
    time.sleep(seconds)
    return (cg.usage_ns(pids) - u0) / 1e9 / (time.monotonic() - t0)


def test_steps_lower_the_workloads_cpu_by_the_share_asked_and_release_puts_it_back(spinner, tmp_path):
    pids = [spinner.pid]
    cg = throttle.find(pids)
    before = cg.read()
    t = throttle.Throttle(cg, pids, tmp_path)
    t.begin()
    time.sleep(0.5)
    step = t.set(50, after_round=2)
    # the baseline is what the spinner got of the machine's CPUs, one at most: how much of
    # one depends on what else runs here, so what follows is measured against it
    assert 0 < step.baseline_cpus < 1.1 and abs(step.quota_cpus - step.baseline_cpus / 2) < 0.01
    # what recover needs is on disk, private, from the first change on
    rec = tmp_path / throttle.FILE
    assert rec.stat().st_mode & 0o777 == 0o600 and json.loads(rec.read_text())["quota"]["quota_us"] == before.quota_us
    half = step.quota_cpus
    assert 0.5 * half < _cpus(cg, pids, 1.0) < 1.15 * half + 0.01     # the quota holds it, and it still spins
    step = t.set(90, after_round=3)
    assert abs(step.quota_cpus - step.baseline_cpus / 10) < 0.01
    assert _cpus(cg, pids, 1.0) < 1.2 * step.quota_cpus + 0.01
    t.release()
    assert cg.read() == before and not rec.exists()
    assert _cpus(cg, pids, 0.5) > 2 * step.quota_cpus               # no quota holds it any more
    t.release()      # twice is harmless (rollback after a switchover that released it)


def test_a_tiny_share_lengthens_the_period_rather_than_refused(spinner, tmp_path):
    pids = [spinner.pid]
    cg = throttle.find(pids)
    t = throttle.Throttle(cg, pids, tmp_path)
    t.baseline = 0.5            # a workload that used half a CPU, throttled by 99 %
    step = t.set(99, after_round=1)
    q = cg.read()
    assert q.quota_us >= throttle.MIN_QUOTA_US and q.period_us > 100_000 and abs(step.quota_cpus - 0.005) < 0.0001
    t.baseline = 0.05           # 1 ms in the longest period we use is the least it gets
    assert t.set(99, after_round=2).quota_cpus == throttle.MIN_QUOTA_US / SIZES.throttle_max_period_us
    t.release()


def test_a_shared_cgroup_is_never_throttled(spinner):
    with pytest.raises(throttle.Unavailable, match="other processes"):
        throttle.find([os.getpid()])         # ours holds pytest, and others
    other = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    try:
        other.stdout.readline()
        with pytest.raises(throttle.Unavailable, match="different cgroups"):
            throttle.find([spinner.pid, other.pid])
        for f in throttle.find([spinner.pid]).quota_dir, :
            (Path(f) / "cgroup.procs").write_text(str(other.pid))
        with pytest.raises(throttle.Unavailable, match="other processes"):
            throttle.find([spinner.pid])
    finally:
        other.kill()
        other.wait()


def test_recover_lifts_a_throttle_its_livemig_left(spinner, tmp_path):
    pids = [spinner.pid]
    cg = throttle.find(pids)
    before = cg.read()
    t = throttle.Throttle(cg, pids, tmp_path)
    t.baseline = 1.0
    t.set(60, after_round=2)
    assert throttle.lift_left(tmp_path) == ""       # its livemig (us) is alive: not ours to lift
    assert cg.read() != before
    rec = tmp_path / throttle.FILE
    d = json.loads(rec.read_text())
    d["coordinator"] = [d["coordinator"][0], d["coordinator"][1] + 1]    # another process by now
    rec.write_text(json.dumps(d))
    assert throttle.lift_left(tmp_path) == "its CPU throttle is lifted"
    assert cg.read() == before and not rec.exists()


def _freeze(cg: throttle.CpuCgroup, on: bool) -> None:
    """What runc pause / resume (or CRIU's --freeze-cgroup) write."""
    Path(cg.freezer).write_text(("1" if on else "0") if cg.version == 2 else ("FROZEN" if on else "THAWED"))


async def test_the_quota_is_eased_while_a_dump_freezes_the_workload_and_lifted_when_the_final_one_does(
        spinner, tmp_path):
    pids = [spinner.pid]
    cg = throttle.find(pids)
    assert cg.freezer, "no freezer for the workload's cgroup"
    before = cg.read()
    t = throttle.Throttle(cg, pids, tmp_path)
    t.baseline = 1.0
    t.set(90, after_round=1)
    throttled = cg.read()
    assert not t.held(spinner.pid)
    seen = []

    async def pre_dump():      # freezes it, dumps, thaws it: the quota follows
        await asyncio.sleep(0.05)
        _freeze(cg, True)
        await asyncio.sleep(0.2)
        seen.append(cg.read())
        _freeze(cg, False)
        await asyncio.sleep(0.2)
        seen.append(cg.read())
    await t.eased_while_held(spinner.pid, pre_dump())
    assert seen == [before, throttled] and cg.read() == throttled
    # the switchover: throttled until the final dump's freeze begins, then as it was
    lifting = asyncio.create_task(t.released_once_held(spinner.pid, wait=10))
    await asyncio.sleep(0.2)
    assert not lifting.done() and cg.read() == throttled
    _freeze(cg, True)
    await asyncio.wait_for(lifting, 1)
    assert cg.read() == before and not (tmp_path / throttle.FILE).exists()
    _freeze(cg, False)
    # and at the latest after its wait, frozen or not
    t.set(50, after_round=2)
    await asyncio.wait_for(t.released_once_held(spinner.pid, wait=0.1), 1)
    assert cg.read() == before


def test_cpu_time_of_a_process_counts_its_threads():
    assert host.cpu_ns(os.getpid()) > 0 and host.cpu_ns(2 ** 22 + 1) == 0
