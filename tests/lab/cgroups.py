"""Per-host cgroups: one child of the caller's own cgroup in every hierarchy.

A lab host lives in its own cgroup namespace rooted at these children, so CRIU,
runc and podman inside see a consistent tree, and the host's processes can be
accounted and throttled without touching the machine's other cgroups. Works on
cgroup v1, hybrid (v1 + unified) and pure v2 machines alike.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hierarchy:
    mountpoint: str        # where the machine mounts it, e.g. /sys/fs/cgroup/cpu
    fstype: str            # "cgroup" or "cgroup2"
    options: str           # the v1 controllers or name=, e.g. "cpu" or "none,name=systemd"
    own_path: str          # the caller's cgroup in it, relative to the mountpoint

    @property
    def relative(self) -> str:
        """Its mountpoint relative to /sys/fs/cgroup ("" for a pure v2 machine)."""
        rel = os.path.relpath(self.mountpoint, "/sys/fs/cgroup")
        return "" if rel == "." else rel


def hierarchies() -> list[Hierarchy]:
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        own["" if hid == "0" else ctrls] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, post = line.split(" - ", 1)
        fields, post_fields = pre.split(), post.split()
        fstype, mnt_root, mountpoint = post_fields[0], fields[3], fields[4]
        if fstype not in ("cgroup", "cgroup2") or not mountpoint.startswith("/sys/fs/cgroup"):
            continue
        if fstype == "cgroup2":
            key, options = "", ""
        else:
            supers = post_fields[2].split(",")
            names = [o for o in supers if o not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec")]
            key = ",".join(names)
            options = ",".join(names) if not any(n.startswith("name=") for n in names) else "none," + key
        if key not in own:
            continue
        rel = os.path.relpath(own[key], mnt_root) if own[key].startswith(mnt_root) else own[key]
        found.append(Hierarchy(mountpoint, fstype, options, "" if rel == "." else rel.lstrip("/")))
    return found


def host_dir(h: Hierarchy, name: str) -> Path:
    return Path(h.mountpoint, h.own_path, f"livemig-lab-{name}")


def create(name: str, cpuset_clone_children: bool = False) -> list[str]:
    """Create the host's cgroup in every hierarchy; return the cgroup.procs files to join.

    cpuset_clone_children (a systemd host's): every cpuset cgroup made under the host's
    takes its cpus and mems when made. Such a host mounts cgroup2 alone, and podman there
    makes no v1 cgroups; but CRIU restores a container into the v1 ones too (it finds them
    in /proc/self/cgroup, on a hybrid machine), making them itself in the cpuset hierarchy,
    empty, where a task cannot go ("Can't move ... No space left on device", or cpuset.cpus
    refused: "CRIU restoring failed -52"). A lab-init host needs none of it: its runtimes
    see the v1 hierarchies and give each cpuset cgroup they make its cpus and mems, and
    CRIU restores the ones it dumped."""
    procs = []
    for h in hierarchies():
        d = host_dir(h, name)
        d.mkdir(exist_ok=True)
        if h.fstype == "cgroup" and "cpuset" in h.options.split(","):
            # A v1 cpuset child starts empty and refuses tasks until given cpus and mems.
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text((d.parent / f).read_text())
            if cpuset_clone_children:
                (d / "cgroup.clone_children").write_text("1")   # (the cgroups made below inherit it)
        procs.append(str(d / "cgroup.procs"))
    return procs


def join(procs_files: list[str]) -> None:
    """Move the calling process into the given cgroups (used before entering a host)."""
    for f in procs_files:
        with open(f, "w") as fh:
            fh.write("0")


def thaw(name: str) -> None:
    """Thaw every frozen cgroup of the host (a paused container's): a frozen task
    cannot die, so SIGKILL alone would leave it, and its cgroup, behind."""
    for h in hierarchies():
        d = host_dir(h, name)
        for state in d.rglob("freezer.state") if d.exists() else []:
            try:
                state.write_text("THAWED")
            except OSError:
                pass
        for freeze in d.rglob("cgroup.freeze") if d.exists() else []:   # cgroup v2
            try:
                freeze.write_text("0")
            except OSError:
                pass


def remove(name: str, timeout: float = 5.0) -> list[str]:
    """Remove the host's cgroups depth first; return the ones that would not go."""
    left = []
    for h in hierarchies():
        d = host_dir(h, name)
        deadline = time.monotonic() + timeout
        while d.exists():
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    sub.rmdir()
                except OSError:
                    pass
            try:
                d.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    left.append(str(d))
                    break
                time.sleep(0.05)
    return left
