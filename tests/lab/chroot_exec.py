"""chroot_exec.py ROOT CMD... -- run CMD chrooted into ROOT with /proc, /dev and /tmp.

Run it inside a private mount namespace (rootfs.chroot does so with unshare),
so the mounts vanish with it and the machine's mount table never sees them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel


def main() -> None:
    root, argv = sys.argv[1], sys.argv[2:]
    kernel.mount("proc", f"{root}/proc", "proc")
    kernel.mount("/dev", f"{root}/dev", None, kernel.MS_BIND | kernel.MS_REC)
    kernel.mount("tmpfs", f"{root}/tmp", "tmpfs")
    os.chroot(root)
    os.chdir("/")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()
