"""hostinit.py SPEC_JSON -- stage 1 of a namespaced lab host.

Runs as PID 1 of fresh pid, mount, net, uts, ipc and cgroup namespaces (the lab
starts it through unshare). It builds the host's root: an overlay over the
shared read-only rootfs, the pseudo file systems a Debian host and CRIU expect,
the project checkout read-only at /opt/livemig, the storage every host shares at
/srv/shared; then pivot_roots into it and execs the host's own init: lab-init,
which starts sshd and reaps orphans, or systemd (systemd_host.py).
"""

import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel as k

NOSUID_NODEV = k.MS_NOSUID | k.MS_NODEV


def build_root(spec: dict) -> str:
    m = spec["merged"]
    k.mount("none", "/", None, k.MS_REC | k.MS_PRIVATE)
    k.mount("overlay", m, "overlay", 0,
            f"lowerdir={spec['lower']},upperdir={spec['upper']},workdir={spec['work']}")

    # The checkout, read-only: every host runs the livemig under test, never a copy.
    k.mount(spec["repo"], f"{m}/opt/livemig", None, k.MS_BIND | k.MS_REC)
    k.mount("none", f"{m}/opt/livemig", None, k.MS_BIND | k.MS_REMOUNT | k.MS_RDONLY)

    # Storage every host shares, at one path (as NFS or a SAN would be): a database's files
    # are there on whichever host its processes run.
    os.makedirs(f"{m}/srv/shared", exist_ok=True)
    k.mount(spec["shared"], f"{m}/srv/shared", None, k.MS_BIND)

    k.mount("proc", f"{m}/proc", "proc", NOSUID_NODEV | k.MS_NOEXEC)
    # sysfs of our own net namespace; read-only like a container's.
    k.mount("sysfs", f"{m}/sys", "sysfs", NOSUID_NODEV | k.MS_NOEXEC | k.MS_RDONLY)
    _mount_cgroups(m, spec["cgroups"])
    _mount_dev(f"{m}/dev")
    if spec.get("init") == "systemd":
        # systemd writes its boot to /dev/console only; the lab gives us a pty for it
        # (copied to the host's console log), as systemd-nspawn does.
        open(f"{m}/dev/console", "w").close()
        k.mount(os.ttyname(1), f"{m}/dev/console", None, k.MS_BIND)
    for d, mode in (("tmp", "1777"), ("run", "755")):
        k.mount(d, f"{m}/{d}", "tmpfs", NOSUID_NODEV, f"mode={mode}")
    # CRIU images stay in memory (as the tool advises for speed), and podman's
    # storage cannot be an overlay on an overlay.
    k.mount("img", f"{m}/img", "tmpfs", NOSUID_NODEV, "mode=700")
    k.mount("containers", f"{m}/var/lib/containers", "tmpfs", 0, "mode=700")
    return m


def _mount_cgroups(m: str, cgroups: list) -> None:
    base = f"{m}/sys/fs/cgroup"
    if len(cgroups) == 1 and cgroups[0]["relative"] == "":
        k.mount("cgroup2", base, "cgroup2", NOSUID_NODEV | k.MS_NOEXEC)
        return
    k.mount("cgroup_root", base, "tmpfs", NOSUID_NODEV | k.MS_NOEXEC, "mode=755")
    for h in cgroups:
        target = f"{base}/{h['relative']}"
        os.makedirs(target, exist_ok=True)
        k.mount("cgroup", target, h["fstype"], NOSUID_NODEV | k.MS_NOEXEC, h["options"] or None)


def _mount_dev(dev: str) -> None:
    k.mount("dev", dev, "tmpfs", k.MS_NOSUID, "mode=755,size=64k")
    nodes = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
             "urandom": (1, 9), "tty": (5, 0), "net/tun": (10, 200)}
    for d in ("pts", "shm", "mqueue", "net"):
        os.mkdir(f"{dev}/{d}")
    for name, (major, minor) in nodes.items():
        os.mknod(f"{dev}/{name}", 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", 0o666)
    k.mount("devpts", f"{dev}/pts", "devpts", k.MS_NOSUID | k.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=620,gid=5")
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    k.mount("shm", f"{dev}/shm", "tmpfs", NOSUID_NODEV, "mode=1777")
    k.mount("mqueue", f"{dev}/mqueue", "mqueue", NOSUID_NODEV | k.MS_NOEXEC)


def enter(m: str) -> None:
    os.chdir(m)
    os.mkdir(".oldroot")
    k.pivot_root(".", ".oldroot")
    os.chdir("/")
    k.umount("/.oldroot", k.MNT_DETACH)
    os.rmdir("/.oldroot")


def main() -> None:
    spec = json.loads(sys.argv[1])
    socket.sethostname(spec["name"])
    # The machine's ip binary, before pivot_root: lo is all this namespace has yet.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    enter(build_root(spec))
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if spec.get("init") == "systemd":
        # $container: systemd's container detection (no kernel to set up, no udev, ...)
        os.execve("/lib/systemd/systemd", ["/lib/systemd/systemd"],
                  {"container": spec["container"], "PATH": path})
    os.execve("/usr/local/sbin/lab-init", ["lab-init"], {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8"})


if __name__ == "__main__":
    main()
