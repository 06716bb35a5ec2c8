"""VM lab hosts: QEMU virtual machines booting Debian trixie's kernel, which tracks dirty pages.

Our machines' kernel has no soft-dirty, so CRIU's pre-dump (and with it
pre-copy) can only be proven inside these VMs. /dev/kvm here is a software
hypervisor that cannot boot a stock kernel, so they run under TCG emulation:
slow, but real. Where hardware virtualization is offered, KVM is used instead.

Each VM boots a copy-on-write overlay of the cached base image, its own config
disk (the checkout and its host files), a control NIC on QEMU's restricted user
network (only the machine's 127.0.0.1:port reaches its sshd; the VM reaches
nothing) and a lab NIC on a QEMU socket link to the other VM over loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from . import vmimage
from .hosts import (
    LAB_DIR,
    REPO,
    Host,
    State,
    _alive,
    _wait_gone,
    addresses,
    exec_,
    host_names,
    prepare_host_files,
    wait_for_ssh,
)
from .proc import LabError, run

MEM_MIB = int(os.environ.get("LIVEMIG_LAB_VM_MEM", "2048"))
LINK_MTU = 65520          # with a qemu64 CPU model: 75 MB/s between TCG VMs, 3.6x MTU 1500's
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt"   # "max" emulates rep movsb slowly: 5x slower copies
BOOT_TIMEOUT = 300


def accelerator() -> str:
    """kvm only where the CPU offers hardware virtualization; else tcg."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if os.path.exists("/dev/kvm") and (" vmx" in flags or " svm" in flags):
        return "kvm"
    return "tcg"


def up(n: int = 2, log=sys.stderr) -> State:
    if n != 2:
        raise LabError("the VM lab has two hosts (a and b, on one QEMU socket link)")
    image = vmimage.ensure(log)
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    (LAB_DIR / "logs").mkdir(parents=True)
    names = host_names(n)
    addrs = addresses(names)
    prepare_host_files(names, addrs)
    accel = accelerator()
    state = State(hosts=[], kind="vm", link=f"qemu socket over loopback, MTU {LINK_MTU}",
                  accel=accel, rootfs=str(image))
    state.save()
    t0 = time.monotonic()
    try:
        link_port = _free_port()
        known = []
        for i, name in enumerate(names):
            port = _free_port()
            _config_disk(name, addrs[name], i + 1)
            pid = _start_vm(image, name, i + 1, port, link_port, "listen" if i == 0 else "connect", accel)
            state.hosts.append(Host(name, addrs[name], pid, ssh_port=port))
            state.save()
            hostkey = (LAB_DIR / "hosts" / name / "upper/etc/ssh/lab_host_ed25519_key.pub").read_text().split()
            known.append(f"[127.0.0.1]:{port} {hostkey[0]} {hostkey[1]}")
        (LAB_DIR / "keys/known_hosts").write_text("\n".join(known) + "\n")
        for h in state.hosts:
            _wait_for_boot(state, h)
        state.extra["boot_seconds"] = round(time.monotonic() - t0, 1)
        wait_for_ssh(state)
    except BaseException:
        down()
        raise
    state.up_seconds = round(time.monotonic() - t0, 3)
    state.save()
    return state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mac(kind: int, idx: int) -> str:
    return f"52:54:00:{kind:02x}:00:{idx:02x}"


def _config_disk(name: str, address: str, idx: int) -> None:
    """The checkout, this VM's files and its identity, on a small read-only ext4 disk."""
    h = LAB_DIR / "hosts" / name
    disk = h / "disk"
    disk.mkdir()
    for part in ("livemig", "tests"):
        shutil.copytree(REPO / part, disk / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", disk)
    shutil.copytree(h / "upper", disk / "lab-overlay", symlinks=True)
    (disk / "lab-config.json").write_text(json.dumps(
        {"name": name, "address": address, "mtu": LINK_MTU, "ctl_mac": _mac(2, idx), "lab_mac": _mac(0x18, idx)}))
    run(["mkfs.ext4", "-q", "-F", "-d", disk, h / "config.img", "64M"])
    shutil.rmtree(disk)


def _start_vm(image: Path, name: str, idx: int, ssh_port: int, link_port: int, link: str, accel: str) -> int:
    h = LAB_DIR / "hosts" / name
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image / "base.raw", "-F", "raw", h / "root.qcow2"])
    cpu = ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", TCG_CPU] if accel == "tcg" else \
          ["-accel", "kvm", "-cpu", "host"]
    lab_net = f"socket,id=lab,{'listen' if link == 'listen' else 'connect'}=127.0.0.1:{link_port}"
    run(["qemu-system-x86_64", "-name", f"livemig-lab-{name}", *cpu, "-m", str(MEM_MIB), "-smp", "1",
         "-M", "pc", "-nodefaults", "-no-user-config", "-display", "none",
         "-kernel", image / "vmlinux", "-initrd", image / "initrd",
         "-append", "root=/dev/vda rw console=ttyS0 quiet net.ifnames=0 fsck.mode=skip",
         "-drive", f"file={h / 'root.qcow2'},if=virtio,format=qcow2,cache=unsafe",
         "-drive", f"file={h / 'config.img'},if=virtio,format=raw,readonly=on",
         "-netdev", f"user,id=ctl,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
         "-device", f"virtio-net-pci,netdev=ctl,mac={_mac(2, idx)}",
         "-netdev", lab_net, "-device", f"virtio-net-pci,netdev=lab,mac={_mac(0x18, idx)}",
         "-serial", f"file:{LAB_DIR / 'logs' / (name + '.console')}",
         "-daemonize", "-pidfile", h / "qemu.pid"], timeout=60)
    return int((h / "qemu.pid").read_text().strip())


def _wait_for_boot(state: State, host: Host) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if not _alive(host.pid):
            raise LabError(f"VM {host.name} died while booting: {_console(host.name)}")
        if exec_(state, host.name, ["true"], check=False, timeout=30).returncode == 0:
            return
        time.sleep(0.5)
    raise LabError(f"VM {host.name} did not answer over ssh in {BOOT_TIMEOUT} s: {_console(host.name)}")


def _console(name: str) -> str:
    try:
        text = (LAB_DIR / "logs" / f"{name}.console").read_text(errors="replace").strip()
    except OSError:
        return "(no console)"
    return text[-2000:] or "(no output)"


def down() -> list[str]:
    """Power the VMs off (their disks are throw-away overlays) and delete the lab's files;
    return what is left (empty when clean)."""
    state = State.load()
    for h in state.hosts if state else []:
        if _alive(h.pid) and Path(f"/proc/{h.pid}/cmdline").read_bytes().startswith(b"qemu-system"):
            os.kill(h.pid, signal.SIGKILL)
            _wait_gone(h.pid)
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    return [f"VM process {pid} is still running" for pid in _lab_qemus()]


def _lab_qemus() -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[0].startswith(b"qemu-system") and any(a.startswith(b"livemig-lab-") for a in cmd):
                found.append(int(d.name))
    return found
