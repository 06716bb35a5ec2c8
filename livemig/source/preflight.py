"""The preflight checks: pure comparisons of the two hosts' facts, one row per check.

`livemig move` stops at the first failed row, before touching the source;
`livemig check` prints them all. Before any of them, refuse_tree turns away a process
tree that must never move, before either host is touched.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from .. import addresses, carried, criu, host, proc, service_address
from ..errors import Phase, PreflightError
from ..runtimes import oci_networks, podman_networks
from ..wire.protocol import Container, HostFacts
from . import policy


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    on_target: bool = True      # the problem is on the target (else here)
    forceable: bool = False     # --force may go on: a mismatch that fails, if at all, in the
                                # restore, which rolls back (never after the commit)


def _v(version: list[int]) -> str:
    return ".".join(map(str, version)) or "none"


def _usable(version: list[int]) -> bool:
    return bool(version) and tuple(version) >= criu.MIN_VERSION


def _criu_hint(version: list[int]) -> str:
    least = f"install CRIU {_v(list(criu.MIN_VERSION))} or newer (4.2 is the one proven)"
    return (f"{least}: CRIU 3.x cannot dump on recent kernels (\"Unexpected rt vDSO area bounds\")"
            if version else least)


def carry(remote: HostFacts, most: int) -> tuple[HostFacts, list[str], int]:
    """The tree's files the target lacks, carried where they fit in most bytes together
    (carried.py): the facts as they stand once they are, what is carried, and its bytes.
    More than most: none is, and the check refuses the move, saying what would have to be."""
    if not remote.files_missing:
        return remote, [], 0
    found = carried.sizes(remote.files_missing)
    total = sum(found.values())
    if len(found) < len(remote.files_missing) or total > most:
        return remote, [], total
    return dataclasses.replace(remote, files_missing=[]), sorted(found), total


def _missing(paths: list[str]) -> str:
    return (f"the workload uses {carried.named(paths)}, which the target lacks: CRIU's restore opens "
            "each by its path, and would fail after the freeze")


def resized_rows(here: dict[str, int], there: dict[str, int]) -> list[Check]:
    """The tree's files the target has at another size than here (here: host.reopened_files' sizes,
    there: the target's file_sizes): CRIU's restore checks the size of each file it opens
    again, and fails after the freeze. A file whose size here changed since it was first
    read is left out: one that grows while the workload runs cannot be judged (on storage
    both hosts share, it is the same file, read at two moments)."""
    now = host.file_sizes(list(here))
    differ = sorted((f, size, there[f]) for f, size in here.items()
                    if f in there and there[f] != size and now.get(f) == size)
    if not differ:
        return []
    shown = "; ".join(f"{f}: {size} bytes here, {other} there" for f, size, other in differ[:3])
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    return [Check("file sizes on target", False,
                  f"the workload uses files the target has at another size ({shown}{more}): CRIU's restore "
                  "checks the size of each file it opens again, and would fail after the freeze",
                  "make them the same on both hosts (the same versions of its programs and libraries, or "
                  "storage both hosts share), or move it to a host where they are")]


def compare(local: HostFacts, remote: HostFacts, requested_mode: str, *,
            pids: list[int] | None = None, need_bytes: int = 0,
            container: Container | None = None, held: list[addresses.Bound] | None = None,
            keeps_connections: bool = False) -> tuple[list[Check], str, str]:
    """Every check, in the order a user should fix them; and the strategy (or "") and why."""
    rows = [
        Check("criu here", _usable(local.criu_version), f"CRIU {_v(local.criu_version)}",
              _criu_hint(local.criu_version), on_target=False),
        Check("criu on target", _usable(remote.criu_version), f"CRIU {_v(remote.criu_version)}",
              _criu_hint(remote.criu_version)),
    ]
    if local.criu_version and remote.criu_version:
        rows.append(Check("criu versions", tuple(remote.criu_version) >= tuple(local.criu_version),
                          f"target {_v(remote.criu_version)}, source {_v(local.criu_version)}",
                          "the target's CRIU must be at least the source's"))
    rows.append(Check("architecture", remote.arch == local.arch, f"target {remote.arch}, source {local.arch}"))
    if container is not None:
        rows += _container_rows(local, remote, container)
        rows += [Check("podman network", *row) for row in podman_networks.judged(
            container.id, local.podman_networks, remote.podman_networks, keeps_connections)]
        rows += [Check("container network", *row) for row in oci_networks.judged(container, remote.parents_missing)]
    memory_needed = need_bytes
    try:
        mode, why = policy.choose_mode(requested_mode, local.features, remote.features,
                                       container.runtime if container else "process")
        if mode == "precopy" and not local.features.get("mem_dirty_track"):
            # by page hashes: the target holds what pre-copy sent beside the copy it fills (shadow.py)
            if remote.mem_available >= 2 * need_bytes or requested_mode == "precopy":
                memory_needed = 2 * need_bytes
            else:
                mode, why = "stopcopy", ("pre-copy by page hashes would need the memory twice over on the "
                                         f"target ({2 * need_bytes >> 20} MiB; {remote.mem_available >> 20} MiB "
                                         "available)")
        rows.append(Check("strategy", True, f"{mode}: {why}"))
    except policy.ModeUnavailable as e:
        mode, why = "", ""
        rows.append(Check("strategy", False, e.message, on_target=False))
    for name in sorted(local.features):
        rows.append(Check(f"feature {name}", True,
                          f"here {'yes' if local.features[name] else 'no'}, "
                          f"target {'yes' if remote.features.get(name) else 'no'}"))
    if pids is not None and container is None:
        rows.append(Check("PIDs free on target", not remote.pids_taken,
                          "all free" if not remote.pids_taken else
                          f"PIDs {', '.join(map(str, remote.pids_taken))} are in use",
                          "a process tree restores onto its own PIDs; free them, or move it in a "
                          "container (its own PID namespace)"))
    if held:
        # (addresses.py) its sockets rebind where they were: a host without the address fails the restore
        missing = [b for b in held if not addresses.binds_here(b, remote.addresses, remote.nonlocal_bind)]
        free = [b for b in missing if b.freebind]
        rows.append(Check("addresses on target", not missing,
                          f"the workload listens on {_where(missing)}, which the target does not have" +
                          (f" ({_where(free)} set to bind anywhere (IP_FREEBIND), but CRIU binds an IPv4 "
                           "socket before it sets that again)" if free else "") if missing
                          else f"the workload listens on {_where(held)}, which the target can bind too",
                          "bind its sockets to the wildcard address (0.0.0.0 or ::), or add the address on the "
                          "target (and take it off here)" +
                          ("; or let the target bind IPv4 sockets anywhere (sysctl net.ipv4.ip_nonlocal_bind=1)"
                           if free else "")))
    if remote.files_missing:
        rows.append(Check("files on target", False, _missing(remote.files_missing),
                          "make them on the target at the same paths (a log, a pid file, a directory), keep "
                          "them on storage both hosts share, or raise --carry-files-max to carry them"))
    if remote.locks_taken:
        rows.append(Check("locked files free on target", False,
                          f"the workload holds a lock on {', '.join(remote.locks_taken)}, which is locked on the "
                          "target too (a file both hosts share, or one a process there locks): its restore "
                          "would wait for it for ever, the source's copy holding it until then",
                          "release the lock before the move, or keep the file on storage of the source's own"))
    if remote.ports_taken:
        rows.append(Check("ports free on target", False,
                          f"the workload holds {carried.named(remote.ports_taken)}, which the target has taken: CRIU's "
                          "restore binds each port again, and would fail after the freeze",
                          "stop what holds them on the target, or move the workload to a host where they are free"))
    if remote.mount_sources_missing:
        rows.append(Check("mount sources on target", False,
                          f"the container binds in {carried.named(remote.mount_sources_missing)}, which the target "
                          "lacks: its restore mounts each, and would fail after the freeze",
                          "make them on the target at the same paths, or keep them on storage both hosts share"))
    room = remote.free_bytes >= need_bytes
    rows.append(Check("room for images", room,
                      f"{remote.free_bytes >> 20} MiB free" + (f", {need_bytes >> 20} MiB needed" if need_bytes else "")
                      if room else f"no room for the images: {remote.free_bytes >> 20} MiB free in the image root, "
                                   f"{need_bytes >> 20} MiB needed",
                      "free some, or point --image-root at a larger file system (on both hosts)"))
    memory = remote.mem_available >= memory_needed
    rows.append(Check("memory", memory,
                      f"{remote.mem_available >> 20} MiB available" +
                      (f", {memory_needed >> 20} MiB needed" if memory_needed else "") if memory
                      else f"not enough memory: {remote.mem_available >> 20} MiB available, "
                           f"{memory_needed >> 20} MiB needed"))
    return rows, mode, why


def connections_closed(connections: list[tuple[str, int, str, int]], shown: int = 3) -> str:
    """What a move without --tcp-established does to the workload's established TCP
    connections (addresses.connected), said before anything is touched."""
    n = len(connections)
    named = ", ".join(f"{_where([(ip, port)])} with {_where([(peer, peer_port)])}"
                      for ip, port, peer, peer_port in sorted(connections)[:shown])
    return (f"the workload holds {n} established TCP connection{'s' if n != 1 else ''} ({named}"
            f"{f', and {n - shown} more' if n > shown else ''}): the moved copy's ends are closed, so "
            "the other ends see them close with nothing more said, and must connect again (move it "
            "with --tcp-established to keep them, and with --move-address where they are made to an "
            "address of this host's)")


def _where(held: list[tuple[str, int]] | list[addresses.Bound]) -> str:
    return ", ".join(f"[{b[0]}]:{b[1]}" if ":" in b[0] else f"{b[0]}:{b[1]}" for b in held)


def _container_rows(local: HostFacts, remote: HostFacts, c: Container) -> list[Check]:
    rt = c.runtime
    taken = remote.names_taken or ([c.id] if remote.container_exists else [])
    rows = [Check("same kernel", local.kernel == remote.kernel,
                  f"target {remote.kernel}, source {local.kernel}",
                  "the seeds' container migration wants the same kernel on both hosts", forceable=True),
            Check(f"{rt} on target", bool(remote.runtime_version),
                  f"{rt} {remote.runtime_version or 'not installed'}", f"install {rt} there"),
            Check("container name free on target", not taken,
                  f"{rt} there already has a container {', '.join(taken)}" if taken
                  else f"no {c.id} there", "remove it there, or choose another name (--name)")]
    if rt == "podman":
        rows.append(Check("image on target", True, "present" if remote.image_present
                          else f"{c.image[:12]} will be sent first (podman save / load)"))
        for key, here in local.runtime_facts.items():
            there = remote.runtime_facts.get(key, "")
            rows.append(Check(f"same {key}", here == there, f"target {there or 'none'}, source {here or 'none'}",
                              f"podman restores a checkpoint only where the {key} matches", forceable=True))
    else:
        rows.append(Check("bundle on target", remote.bundle in ("absent", "shared"),
                          {"absent": f"{c.bundle} will be copied",
                           "shared": f"{c.bundle} is shared storage: not copied"}.get(
                              remote.bundle, f"{c.bundle} exists there and is not this one"),
                          "remove it there (livemig copies the bundle), or share it"))
    return rows


def enforce(rows: list[Check], target: str, force: bool = False) -> list[str]:
    """Raise the first failed row as the error to show; with force, a forceable failure is a
    warning instead. Returns the warnings."""
    warnings = []
    for row in rows:
        if row.ok:
            continue
        if force and row.forceable:
            warnings.append(f"forced past a failed check: {row.name}: {row.detail}")
            continue
        hint = row.hint + ("; or --force to go on" if row.forceable else "") if row.hint else None
        raise PreflightError(f"{row.name}: {row.detail}" if row.forceable else row.detail,
                             host=target if row.on_target else None, hint=hint)
    return warnings


PF_KTHREAD = 0x00200000     # /proc/PID/stat's flags: a kernel thread (include/linux/sched.h)


def refuse_tree(root: int) -> None:
    """A process tree (--pid root) that must never move is refused, in one line, before
    anything is made or reached: the host's init, the kernel's threads (kthreadd, PID 2 in
    the host's PID namespace, and its children), and the processes this livemig runs under
    (its shell, the sshd of its session...), which CRIU would find holding livemig itself
    only after their whole memory had crossed."""
    if root == 1:
        raise PreflightError("PID 1 is this host's init: it cannot move",
                             phase=Phase.PREFLIGHT, hint="name the process tree to move with --pid, or the container")
    fields = proc.stat_fields(root)
    if fields and int(fields[6]) & PF_KTHREAD:
        raise PreflightError(f"PID {root} is a kernel thread: only user processes move", phase=Phase.PREFLIGHT)
    if root in _ancestors(os.getpid()):
        raise PreflightError(f"PID {root} cannot move: livemig runs under it (livemig itself, its shell, "
                             "its ssh session...)",
                             phase=Phase.PREFLIGHT, hint="start the workload apart (setsid, a service) and move that")


async def addresses_to_move(moving: tuple[str, ...], pids: list[int]) -> dict[str, str]:
    """Each --move-address and the interface here that has it; refused, before anything is
    touched, where one is not on this host, or the workload has a network of its own."""
    if moving and addresses.own_network(pids):
        raise PreflightError("--move-address moves an address of this host's network, and the workload is in a "
                             "network namespace of its own, whose addresses its runtime gives it",
                             phase=Phase.PREFLIGHT, hint="move it without --move-address")
    found = {}
    for address in moving:
        if not (device := await service_address.holding(address)):
            raise PreflightError(f"--move-address {address}: this host does not have "
                                 f"{ipaddress.ip_interface(address).ip}", phase=Phase.PREFLIGHT,
                                 hint="name an address `ip address` shows here, with its prefix")
        found[address] = device
    return found


def moved_address_rows(found: dict[str, str], remote: HostFacts) -> tuple[list[Check], HostFacts]:
    """A row for each address that moves; and remote as it will be, with them (for the
    check that the tree's sockets bind there: addresses on target)."""
    rows = []
    for address, here in found.items():
        iface = ipaddress.ip_interface(address)
        there = remote.subnet_devices.get(address, "")
        if str(iface.ip) in remote.addresses:
            rows.append(Check("moved address", False, f"the target already has {iface.ip}",
                              "take it off there first: two hosts would answer for it"))
        elif not there:
            rows.append(Check("moved address", False, f"the target has no interface on {iface.network}, where "
                              f"{iface.ip} belongs", "move it to a host on that subnet, or give the prefix "
                              "the address has on its subnet"))
        else:
            rows.append(Check("moved address", True, f"{address}: from {here} here to {there} on the target"))
    moved = [str(ipaddress.ip_interface(a).ip) for a in found]
    return rows, dataclasses.replace(remote, addresses=sorted({*remote.addresses, *moved}))


def refuse_traced(pids: list[int]) -> None:
    """A tree with a traced task (a debugger, strace) is refused: CRIU holds every task by
    ptrace to dump it, and a task has one tracer at most, so its dump would fail with the
    workload frozen. Said before anything is touched, naming the tracer."""
    for pid in pids:
        for tid in proc.threads(pid):
            if tracer := proc.tracer(tid):
                raise PreflightError(f"PID {pid} is traced by PID {tracer} (a debugger or strace): CRIU cannot "
                                     "dump a traced task", phase=Phase.PREFLIGHT,
                                     hint="detach the tracer, then move it")


UNDUMPABLE = {"anon_inode:[userfaultfd]": "a userfaultfd", "anon_inode:[io_uring]": "an io_uring instance"}


def refuse_undumpable_handles(pids: list[int]) -> None:
    """A tree holding a userfaultfd or an io_uring instance is refused: CRIU dumps neither
    (an anonymous inode it does not know: criu/files.c), and would fail with the workload
    frozen; and one whose mapped memfd its restore cannot seal again (refuse_sealed_mapped_memfds).
    Said before anything is touched."""
    for pid, fd, name in proc.fds(pids):
        if what := UNDUMPABLE.get(name):
            raise PreflightError(f"PID {pid} holds {what} (fd {fd}), which CRIU cannot checkpoint",
                                 phase=Phase.PREFLIGHT, hint="move it once it no longer uses one")
    refuse_sealed_mapped_memfds(pids)


def refuse_sealed_mapped_memfds(pids: list[int]) -> None:
    """A tree that maps a memfd sealed against writes (F_SEAL_WRITE) is refused: CRIU's restore
    maps it before it seals it again, and the seal then fails ("Cannot apply seals on memfd:
    Device or resource busy", criu/memfd.c), after the freeze. Said before anything is touched."""
    for pid in pids:
        try:
            mapped = [(a, b, name) for a, b, perms, name in proc.mappings(pid)
                      if perms[3] == "s" and name.startswith("/memfd:")]
        except OSError:     # it exited meanwhile: nothing of it to restore
            continue
        for a, b, name in mapped:
            try:
                fd = os.open(f"/proc/{pid}/map_files/{a:x}-{b:x}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:     # unmapped meanwhile
                continue
            try:
                sealed = host.seals(fd)
            finally:
                os.close(fd)
            if sealed & fcntl.F_SEAL_WRITE:
                raise PreflightError(f"PID {pid} maps a memfd sealed against writes ({name.removesuffix(' (deleted)')}), "
                                     "which CRIU's restore cannot seal again once it has mapped it",
                                     phase=Phase.PREFLIGHT, hint="move it once it no longer maps one")


def refuse_locks_unasked(locked: list[str], file_locks: bool) -> None:
    """A tree that holds file locks (flock, fcntl; locked: host.locked_files) moves only with
    --file-locks: CRIU refuses to dump it otherwise, once the workload is frozen. Said
    before anything is touched."""
    if locked and not file_locks:
        raise PreflightError(f"the tree holds {len(locked)} file lock{'s' if len(locked) != 1 else ''} (flock, "
                             f"fcntl: {', '.join(locked)}), which CRIU moves only when asked to",
                             phase=Phase.PREFLIGHT, hint="move it with --file-locks")


def refuse_stopped_in_a_frozen_cgroup(pids: list[int]) -> None:
    """A container's task that the workload stopped (SIGSTOP, job control) cannot be dumped
    where its runtime freezes the container through a cgroup v1 freezer: CRIU's ptrace
    attach waits for the stopped task to trap, and a frozen task never does, so the dump
    hangs with the workload frozen (plain `runc checkpoint` too: CRIU 4.2.1, kernel 6.18).
    Refused before anything is touched. A process tree is frozen by ptrace alone, and its
    stopped tasks move stopped."""
    for pid in pids:
        if proc.state(pid) == "T" and _v1_freezer(pid):
            raise PreflightError(f"PID {pid} of the container is stopped (SIGSTOP or job control), and its "
                                 "runtime freezes it through a cgroup v1 freezer, in which CRIU cannot dump a "
                                 "stopped task (its dump would never end)", phase=Phase.PREFLIGHT,
                                 hint=f"continue it first: kill -CONT {pid}")


def _v1_freezer(pid: int) -> bool:
    """Is pid in a cgroup v1 freezer hierarchy (a "freezer" line in /proc/PID/cgroup)?"""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:     # gone: nothing of it to freeze
        return False
    return any("freezer" in line.split(":")[1].split(",") for line in lines if line.count(":") >= 2)


def _ancestors(pid: int) -> list[int]:
    """pid and its parents, up to init."""
    chain = []
    while pid > 0 and pid not in chain:
        chain.append(pid)
        fields = proc.stat_fields(pid)
        pid = int(fields[1]) if fields else 0
    return chain
