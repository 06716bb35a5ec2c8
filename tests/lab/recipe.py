"""What the lab's shared root filesystem is made of.

This module is data only. Its bytes and rootfs.py's make the cache key of the
built rootfs, so a change to either rebuilds it.
"""

SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"

# From trixie itself. The Python libraries are Debian's, so livemig runs in a
# host on the system python3 with nothing fetched from PyPI at lab start.
PACKAGES = [
    "openssh-server", "openssh-client",
    "python3", "python3-asyncssh", "python3-zstandard",
    "python3-uvloop", "python3-rich", "python3-shtab", "python3-xxhash",
    "runc", "crun",
    "podman", "conmon", "netavark", "aardvark-dns", "catatonit",
    "iproute2", "procps", "psmisc", "zstd", "busybox-static", "iputils-ping",
    "kmod", "ca-certificates", "netbase",
    "pipx",     # the README's install, proven on trixie's Python (tests/test_install.py)
    "redis-server",     # a real service whose clients keep their connection (tests/test_service_address.py)
    "postgresql",       # a real database, and pgbench its clients (tests/test_database.py)
]

# trixie's criu 4.1.1 cannot dump a process that holds a TCP socket on kernels
# >= 6.16 (criu #2705/#2718); sid's 4.2.x can. Everything else is trixie's but
# nftables: sid's criu needs sid's libnftables1, which trixie's nftables refuses.
SID_PACKAGES = ["criu", "libcriu2", "python3-pycriu", "nftables"]
CRIU_MIN_VERSION = (4, 2)

# runc and crun checkpoint with CRIU's network lock, which defaults to
# iptables; the rootfs has nftables only.
CRIU_CONFIG = "network-lock nftables\n"
CRIU_CONFIG_FILES = ["default.conf", "runc.conf", "crun.conf"]
