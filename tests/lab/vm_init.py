"""PID 1 of a lab VM: make it the lab host its config disk describes, then run sshd and reap.

The VM's initrd mounts the root disk and the read-only config disk (at
/opt/livemig: the checkout, this VM's files under lab-overlay/, and
lab-config.json) and hands over here, under the root's python3.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path("/opt/livemig")


def mount(fstype: str, target: str, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    argv = ["mount", "-t", fstype] + (["-o", options] if options else []) + [fstype, target]
    subprocess.run(argv, check=True)


def iface(mac: str) -> str:
    """The interface with this MAC, once the driver has brought it up (no udev here)."""
    for _ in range(1000):
        for dev in Path("/sys/class/net").iterdir():
            if (dev / "address").read_text().strip() == mac:
                return dev.name
        time.sleep(0.01)
    raise SystemExit(f"vm-init: no network interface with MAC {mac}")


def main() -> None:
    mount("proc", "/proc")
    mount("sysfs", "/sys")
    mount("cgroup2", "/sys/fs/cgroup")
    mount("devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666")
    for d, opts in (("/dev/shm", "mode=1777"), ("/run", "mode=755"), ("/tmp", "mode=1777"),
                    # images in memory, as on the namespaced hosts: the VM's disk is slow
                    ("/img", "mode=700"), ("/var/lib/livemig", "mode=700")):
        mount("tmpfs", d, opts)
    cfg = json.loads((CONFIG / "lab-config.json").read_text())
    shutil.copytree(CONFIG / "lab-overlay", "/", dirs_exist_ok=True, symlinks=True)
    socket.sethostname(cfg["name"])
    subprocess.run(["modprobe", "virtio_net"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    ctl, lab = iface(cfg["ctl_mac"]), iface(cfg["lab_mac"])
    # QEMU's user network forwards the machine's 127.0.0.1:port to sshd at this address.
    subprocess.run(["ip", "addr", "add", "10.0.2.15/24", "dev", ctl], check=True)
    subprocess.run(["ip", "link", "set", ctl, "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{cfg['address']}/24", "dev", lab], check=True)
    subprocess.run(["ip", "link", "set", lab, "mtu", str(cfg["mtu"]), "up"], check=True)
    Path("/proc/sys/fs/pipe-max-size").write_text("4194304")   # CRIU's lazy dump, as in the netns lab
    Path("/proc/sys/kernel/printk").write_text("3 4 1 3")
    # As on our machines (Debian's kernel defaults to "always"); livemig warns where it matters.
    Path("/sys/kernel/mm/transparent_hugepage/enabled").write_text("madvise")
    subprocess.run(["modprobe", "tun"], check=False)   # else every `criu check` complains
    with open("/dev/console", "w") as console:
        console.write(f"livemig lab VM {cfg['name']} ready\n")
    sys.path.insert(0, str(CONFIG / "tests/lab"))
    import lab_init
    lab_init.main()


if __name__ == "__main__":
    main()
