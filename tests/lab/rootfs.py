"""The lab's shared Debian trixie root filesystem, built once and cached by recipe.

Every lab host mounts it read-only as the lower layer of its own overlay, so it
is built once per recipe (about two minutes cold) and reused by every lab run.
The cache lives outside the repository, in LIVEMIG_LAB_CACHE (default
/var/cache/livemig-lab), as rootfs-<key>/ where key is a hash of recipe.py and of this file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from . import recipe
from .proc import LabError, out, run

CACHE = Path(os.environ.get("LIVEMIG_LAB_CACHE", "/var/cache/livemig-lab"))
_DONE = ".livemig-rootfs-complete"


def recipe_key() -> str:
    """The recipe and this builder: change either and the rootfs is rebuilt."""
    h = hashlib.sha256(Path(recipe.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def path() -> Path:
    return CACHE / f"rootfs-{recipe_key()}"


def ready() -> bool:
    return (path() / _DONE).is_file()


def ensure(log=sys.stderr) -> Path:
    """Return the cached rootfs for the current recipe, building it when missing."""
    dest = path()
    if ready():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.monotonic()
    print(f"lab: building the trixie rootfs {dest.name} (a few minutes, once per recipe)", file=log, flush=True)
    _debootstrap(tmp)
    _install_packages(tmp)
    _configure(tmp)
    version = _criu_version(tmp)
    (tmp / _DONE).write_text(f"criu {'.'.join(map(str, version))}\nbuilt in {time.monotonic() - t0:.0f} s\n")
    tmp.rename(dest)
    _prune(keep=dest)
    print(f"lab: rootfs ready in {time.monotonic() - t0:.0f} s", file=log, flush=True)
    return dest


def _debootstrap(root: Path) -> None:
    # Only the bare base: debootstrap's resolver cannot satisfy virtual
    # packages (python3-cryptography's cffi API range); apt can.
    print(f"lab: debootstrap {recipe.SUITE} (its log: {root}/debootstrap/debootstrap.log)",
          file=sys.stderr, flush=True)
    run(["debootstrap", "--variant=minbase", recipe.SUITE, root, recipe.MIRROR], timeout=1800)


def _install_packages(root: Path) -> None:
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    srcs = root / "etc/apt/sources.list.d/sid.sources"
    pin = root / "etc/apt/apt.conf.d/99livemig-default-release"
    srcs.write_text(f"Types: deb\nURIs: {recipe.MIRROR}\nSuites: sid\nComponents: main\n"
                    "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    pin.write_text(f'APT::Default-Release "{recipe.SUITE}";\n')
    # No daemon a package's postinst would start (redis, postgres) runs in the build: one
    # left running there holds the rootfs, and the lab's hosts start what a test needs.
    no_daemons = root / "usr/sbin/policy-rc.d"
    no_daemons.write_text("#!/bin/sh\nexit 101\n")
    no_daemons.chmod(0o755)
    try:
        # The mirror we reach may be a snapshot whose sid Release has expired.
        chroot(root, ["apt-get", "-q", "-o", "Acquire::Check-Valid-Until=false", "update"])
        chroot(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                      *recipe.PACKAGES, *(f"{p}/sid" for p in recipe.SID_PACKAGES)])
    finally:
        srcs.unlink(missing_ok=True)
        pin.unlink(missing_ok=True)
        no_daemons.unlink(missing_ok=True)
    chroot(root, ["apt-get", "clean"])
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    (root / "etc/resolv.conf").write_text("")


def _configure(root: Path) -> None:
    etc = root / "etc"
    (etc / "criu").mkdir(exist_ok=True)
    for name in recipe.CRIU_CONFIG_FILES:
        (etc / "criu" / name).write_text(recipe.CRIU_CONFIG)
    # Each lab host gets its own host key at lab start; none may be shared.
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    for d in ("img", "var/lib/containers", "opt/livemig"):
        (root / d).mkdir(parents=True, exist_ok=True)


def _criu_version(root: Path) -> tuple[int, ...]:
    text = chroot(root, ["criu", "--version"])
    for line in text.splitlines():
        if line.startswith("Version:"):
            version = tuple(int(x) for x in line.split()[1].split("."))
            if version < recipe.CRIU_MIN_VERSION:
                raise LabError(f"rootfs has criu {line.split()[1]}, the lab needs "
                               f"{'.'.join(map(str, recipe.CRIU_MIN_VERSION))} or newer")
            return version
    raise LabError(f"cannot read criu's version: {text.strip()!r}")


def chroot(root: Path, argv: list[str]) -> str:
    """Run argv chrooted into root, with /proc and /dev, on the machine's network."""
    helper = Path(__file__).with_name("chroot_exec.py")
    return out(["unshare", "--mount", "--propagation", "private", "--",
                sys.executable, helper, root, *argv], timeout=1800)


def _prune(keep: Path) -> None:
    for old in CACHE.glob("rootfs-*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
