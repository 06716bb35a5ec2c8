"""What the workload's namespaces and users let CRIU do, checked before the freeze: each of
these would fail the dump or the restore after it, the workload frozen for nothing.

- A System V shared memory segment moves only with its IPC namespace (the tree's own).
- A task of another user is dumped only by a root with CAP_SYS_RESOURCE.
- A tree in a user namespace of its own is restored from inside it: no lazy pages where the
  target forbids an unprivileged userfaultfd, and no TCP repair in the host's network.
"""

from __future__ import annotations

import dataclasses
import os

from .. import host, proc
from ..errors import Phase, PreflightError
from ..wire.protocol import HostFacts


def refuse_sysv_shm_without_its_ipc_namespace(pids: list[int]) -> None:
    """A process tree that maps a System V shared memory segment (PostgreSQL does, always)
    moves only in an IPC namespace of its own: CRIU dumps a segment with its namespace, and
    refuses one in the host's (cr-dump.c, check_sysvipc_map_dump), once the workload is
    frozen. Said before anything is touched."""
    for pid in pids:
        try:
            if host.own_namespace(pid, "ipc"):
                continue
            mapped = any(name.startswith("/SYSV") for *_, name in proc.mappings(pid))
        except OSError:     # it exited meanwhile: nothing of it to dump
            continue
        if mapped:
            raise PreflightError(f"PID {pid} maps a System V shared memory segment of this host's IPC namespace, "
                                 "which CRIU moves only with an IPC namespace of the tree's own",
                                 phase=Phase.PREFLIGHT,
                                 hint="start the workload in one (unshare --ipc, or a container), then move it")


def in_a_user_namespace(requested: str, remote: HostFacts, connected: bool) -> tuple[HostFacts, str]:
    """A workload in a user namespace of its own (host.own_user_ns). CRIU's restore makes its
    tasks' resources from inside that namespace, where they lack the host's capabilities:
    - a lazy restore opens a userfaultfd there (uffd.c, setup_uffd), which only a host with
      vm.unprivileged_userfaultfd=1 lets it: elsewhere lazy pages are off for it (post-copy,
      a fill, pre-copy by hashes, which ends in one), and a mode that needs them is refused;
    - its established TCP connections (connected: moved with --tcp-established, in the host's
      network namespace) are repaired there (TCP_REPAIR needs CAP_NET_ADMIN over the host's
      network): refused.
    Both would fail after the freeze. The facts as they then stand, and what to say."""
    if connected:
        raise PreflightError("the workload is in a user namespace of its own but in this host's network, "
                             "and holds established TCP connections: CRIU's restore repairs them from inside "
                             "its namespace, where TCP repair is not allowed", phase=Phase.PREFLIGHT,
                             hint="close them first (or move it without --tcp-established: they are closed), "
                                  "or run it in a network namespace of its own")
    if remote.unprivileged_uffd:
        return remote, ""
    why = ("the workload is in a user namespace of its own, where CRIU's restore cannot open a "
           "userfaultfd on the target (its vm.unprivileged_userfaultfd is 0), so it has no lazy pages")
    if requested in ("postcopy", "hybrid"):
        raise PreflightError(f"{requested} needs lazy pages, and {why}", phase=Phase.PREFLIGHT,
                             hint="move it in stop-and-copy (--mode stopcopy), or set vm.unprivileged_userfaultfd=1 "
                                  "on the target")
    return dataclasses.replace(remote, features={**remote.features, "uffd-noncoop": False}), why


CAP_SYS_RESOURCE = 24       # include/uapi/linux/capability.h


def refuse_other_users_without_cap_sys_resource(pids: list[int]) -> None:
    """CRIU reads each task's rlimits with prlimit(), which on a task of another user needs
    CAP_SYS_RESOURCE over its user namespace (check_prlimit_permission): a root without it (a
    container's, or a sandbox's) dumps only tasks of its own uid and gid, or in a user namespace
    it made. Otherwise the dump fails after the freeze ("Can't get rlimit"): refused before."""
    if host.capable(CAP_SYS_RESOURCE):
        return
    for pid in pids:
        try:
            uids, gids = host.user_ids(pid)
            own_ns = host.own_namespace(pid, "user")
        except OSError:     # it exited meanwhile: nothing of it to dump
            continue
        if not own_ns and (uids, gids) != ({os.getuid()}, {os.getgid()}):
            raise PreflightError(f"PID {pid} runs as uid {', '.join(map(str, sorted(uids)))} and gid "
                                 f"{', '.join(map(str, sorted(gids)))}, and livemig here lacks CAP_SYS_RESOURCE, "
                                 "without which CRIU cannot read the limits of another user's task",
                                 phase=Phase.PREFLIGHT,
                                 hint="run livemig with CAP_SYS_RESOURCE (a full root), or the workload as "
                                      "livemig's user")
