"""The systemd flavour of a namespaced lab host (python -m tests.lab up --init systemd).

Some moves are of systemd units (issue 35): the host's init must then be systemd itself,
so that `systemctl` on the target can say the unit runs there. Such a host is a lab-init
host in all but what systemd needs or would get wrong in a namespace:

- only cgroup2 is mounted at /sys/fs/cgroup (systemd 257 refuses cgroup v1): the host's
  own cgroup in the machine's unified hierarchy, with no controllers on a hybrid machine;
- PID 1 is /lib/systemd/systemd, told by `container=` that it runs in a container; its
  console is a pty the lab copies to the host's console log (it writes nowhere else);
- sshd is ssh.service with the lab's drop-in (its host key: no first-boot key generation);
- units that would reach past the namespace into the machine's kernel are masked, and the
  services the rootfs enables for its own tests (a lab-init host runs none) are not started;
- podman manages its containers' cgroups itself (cgroupfs), as on a lab-init host
  (CONTAINERS_CONF); the host's v1 cpuset cgroup gives the ones CRIU makes under it on a
  restore their cpus and mems (cgroups.create, cpuset_clone_children).

The files for that go into the host's overlay upper dir before it boots.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from . import cgroups
from .proc import LabError

CONTAINER = "livemig-lab"   # $container for systemd's container detection (any value but a known one)

# Masked: a lab host shares the machine's kernel, and the first three would set what is
# the machine's, not the host's. (modprobe@*.service may stay: the rootfs has no modules.)
MASKED = {
    "systemd-sysctl.service": "sysctl.d sets kernel.* (core_pattern), which are the machine's",
    "systemd-binfmt.service": "would register binfmt.d's formats (python3) in the machine's kernel",
    "proc-sys-fs-binfmt_misc.automount": "mounts the machine's binfmt_misc, for systemd-binfmt",
    # and one that is of no use here: the lab enters a host (nsenter) or ssh's in
    "console-getty.service": "a login prompt on the console pty, which nobody types into",
}

# Not started at boot, still startable: the rootfs has the databases for tests that start
# their own instance (a lab-init host runs none; one started at boot would hold its port),
# and netavark's DHCP proxy for podman networks the lab does not use.
NOT_AT_BOOT = [
    "multi-user.target.wants/postgresql.service",
    "multi-user.target.wants/redis-server.service",
    "default.target.wants/netavark-dhcp-proxy.service",
]


# /etc/containers/containers.conf (the rootfs has none): podman on a host booted by systemd
# would otherwise make its containers' cgroups through systemd, over D-Bus, and crun says
# "cannot open sd-bus" (the rootfs has no dbus).
CONTAINERS_CONF = """\
[containers]
# No pids.max for a container: the host's cgroup2 has no controllers (the lab enables none
# there, and a hybrid machine's unified hierarchy has none to give: its v1 hierarchies hold
# them all), and crun refuses a limit of a controller that is not there ("controller 'pids'
# is not available").
pids_limit = 0

[engine]
# podman makes its containers' cgroups itself, rather than ask systemd for them over D-Bus.
cgroup_manager = "cgroupfs"
"""


def cgroup_spec() -> list[dict]:
    """What hostinit mounts at /sys/fs/cgroup: the unified hierarchy alone, at its root
    (the host's cgroup namespace is rooted at its own cgroup there: cgroups.create)."""
    if not any(h.fstype == "cgroup2" for h in cgroups.hierarchies()):
        raise LabError("systemd hosts need cgroup2, and this machine mounts none")
    return [{"relative": "", "fstype": "cgroup2", "options": ""}]


def prepare(upper: Path) -> None:
    """Mask and disable, and configure podman, in the host's overlay upper dir (over the
    shared rootfs)."""
    etc = upper / "etc/systemd/system"
    etc.mkdir(parents=True, exist_ok=True)
    for unit in MASKED:
        (etc / unit).symlink_to("/dev/null")
    for link in NOT_AT_BOOT:
        # An overlay whiteout (a 0/0 character device in the upper dir) hides the lower
        # layer's enabling symlink: the unit is disabled on this host only.
        (etc / link).parent.mkdir(parents=True, exist_ok=True)
        os.mknod(etc / link, stat.S_IFCHR, os.makedev(0, 0))
    conf = upper / "etc/containers/containers.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(CONTAINERS_CONF)
