"""The VM lab's disk image, kernel and initrd, built once per recipe and cached.

Built from a copy of the shared rootfs (never written) plus trixie's kernel, in
LIVEMIG_LAB_CACHE as vm-<key>/ with base.raw (ext4, read-only base of every VM's
copy-on-write overlay), vmlinux (uncompressed: booting it directly skips the
kernel's decompressor, which costs seconds under emulation) and initrd (busybox
and the modules needed to mount the root disk; Debian's own initrd runs udev,
about 9 s more under emulation).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import rootfs, vm_recipe
from .proc import LabError, run

_DONE = ".livemig-vm-image-complete"


def recipe_key() -> str:
    """The recipe, this builder and the rootfs beneath: change any and the image is rebuilt."""
    h = hashlib.sha256(Path(vm_recipe.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(rootfs.recipe_key().encode())
    return h.hexdigest()[:16]


def path() -> Path:
    return rootfs.CACHE / f"vm-{recipe_key()}"


def ensure(log=sys.stderr) -> Path:
    dest = path()
    if (dest / _DONE).is_file():
        return dest
    base = rootfs.ensure(log)
    tmp = dest.with_name(dest.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.monotonic()
    print(f"lab: building the VM image {dest.name} (a few minutes, once per recipe)", file=log, flush=True)
    root = tmp / "root"
    run(["cp", "-a", base, root], timeout=600)
    _install_kernel(root)
    kver = _kernel_version(root)
    _extract_vmlinux(root / "boot" / f"vmlinuz-{kver}", tmp / "vmlinux")
    _build_initrd(root, kver, tmp / "initrd")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,noatime 0 1\n")
    run(["mkfs.ext4", "-q", "-F", "-L", "livemig-lab", "-E", "lazy_itable_init=1,lazy_journal_init=1",
         "-d", root, tmp / "base.raw", vm_recipe.IMAGE_SIZE], timeout=900)
    os.chmod(tmp / "base.raw", 0o444)
    shutil.rmtree(root)
    (tmp / _DONE).write_text(f"kernel {kver}\nbuilt in {time.monotonic() - t0:.0f} s\n")
    tmp.rename(dest)
    for old in rootfs.CACHE.glob("vm-*"):
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    print(f"lab: VM image ready in {time.monotonic() - t0:.0f} s", file=log, flush=True)
    return dest


def _install_kernel(root: Path) -> None:
    # No initrd from initramfs-tools: ours is built below, and its udev-based one is slow to boot.
    conf = root / "etc/initramfs-tools/update-initramfs.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("update_initramfs=no\n")
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    try:
        rootfs.chroot(root, ["apt-get", "-q", "update"])
        # --force-confold keeps our update-initramfs.conf over the package's
        rootfs.chroot(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                             "-o", "Dpkg::Options::=--force-confold", *vm_recipe.KERNEL_PACKAGES])
        rootfs.chroot(root, ["apt-get", "clean"])
    finally:
        (root / "etc/resolv.conf").write_text("")
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def _kernel_version(root: Path) -> str:
    found = sorted(p.name for p in (root / "lib/modules").iterdir())
    if not found:
        raise LabError("the kernel package installed no modules")
    return found[-1]


def _extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """The ELF kernel inside a bzImage: the first zstd frame that decompresses to one."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\x28\xb5\x2f\xfd")
    while start >= 0:
        res = subprocess.run(["zstd", "-dcq"], input=data[start:], capture_output=True, check=False)
        if res.stdout[:4] == b"\x7fELF":
            out.write_bytes(res.stdout)
            return
        start = data.find(b"\x28\xb5\x2f\xfd", start + 1)
    raise LabError(f"no zstd-compressed ELF kernel found in {vmlinuz}")


def _module_order(root: Path, kver: str, wanted: list[str]) -> list[str]:
    """Module files (relative to the modules dir) for wanted, dependencies first."""
    moddir = root / "lib/modules" / kver
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def add(mod: str) -> None:
        for dep in deps.get(mod, []):
            add(dep)
        if mod not in order:
            order.append(mod)

    for name in wanted:
        if name not in by_name:
            continue   # built into the kernel
        add(by_name[name])
    return order


def _build_initrd(root: Path, kver: str, out: Path) -> None:
    """busybox, the modules for the disks, and an init that mounts the root (vda) and the
    config disk (vdb: the checkout and this VM's own files) and hands over to vm_init.py."""
    work = out.with_suffix(".d")
    (work / "bin").mkdir(parents=True)
    for d in ("dev", "proc", "sys", "newroot", "mod"):
        (work / d).mkdir()
    shutil.copy(root / "usr/bin/busybox", work / "bin/busybox")   # static: no libraries needed
    mods = []
    for i, rel in enumerate(_module_order(root, kver, vm_recipe.INITRD_MODULES)):
        src = root / "lib/modules" / kver / rel
        name = f"{i:02d}-{src.name.split('.ko')[0]}.ko"
        raw = src.read_bytes()
        if src.name.endswith(".xz"):
            raw = subprocess.run(["xz", "-dc"], input=raw, capture_output=True, check=True).stdout
        elif src.name.endswith(".zst"):
            raw = subprocess.run(["zstd", "-dcq"], input=raw, capture_output=True, check=True).stdout
        (work / "mod" / name).write_bytes(raw)
        mods.append(name)
    (work / "init").write_text(f"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs devtmpfs /dev
$B mount -t proc proc /proc
for m in {' '.join(mods)}; do $B insmod /mod/$m; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 1000 ]; do $B usleep 10000; i=$((i+1)); done
$B mount -t ext4 -o rw,noatime /dev/vda /newroot || {{ echo "lab initrd: cannot mount /dev/vda"; exec $B sh; }}
$B mount -t ext4 -o ro,noatime /dev/vdb /newroot/opt/livemig || {{ echo "lab initrd: no config disk"; exec $B sh; }}
$B mount --move /dev /newroot/dev
$B umount /proc
exec $B switch_root /newroot /usr/bin/python3 /opt/livemig/tests/lab/vm_init.py
""")
    os.chmod(work / "init", 0o755)
    listing = subprocess.run(["find", "."], cwd=work, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=work, input=listing,
                          capture_output=True, check=True).stdout
    with gzip.open(out, "wb", compresslevel=1) as f:
        f.write(cpio)
    shutil.rmtree(work)
