"""The restore: CRIU's (a process tree) or a container runtime's (runc, crun, podman),
from an image directory here, the copy left stopped until Resume. Lazy: with post-copy's
(or a fill's) pages still to come (postcopy.py).

Stopped from the start, a container as a tree: CRIU stops every task it restored
(SIGSTOP, --leave-stopped) before it lets go of them, so that not one instruction of the
workload runs here before the Resume. No runtime takes that flag, but every `criu swrk`
one starts reads the configuration file that CRIU_CONFIG_FILE names (runc and crun pass
their environment on; podman passes it to conmon, conmon to its runtime): the restore's
own, in the work directory, says "leave-stopped". Its tasks stopped, the container is
then paused too (cgroup freezer), so that its runtime says what it is (`runc state`:
paused); Resume thaws it and continues its tasks (SIGCONT, copy.py), but those the
workload had stopped itself (a shell's stopped job), which the images say (criu.stopped_tasks;
a podman checkpoint's archive holds them too).

Before, a runtime restored its container running and the pause came after: the workload
ran here, before the commit, for as long as the runtime took to exit and `pause` to freeze
it (and with lazy pages up to WAITS.lazy_pause more, while a task waited for a page). The
lab's tests that hold a move just after its restore, in tests/test_containers.py and
tests/test_podman.py,
    test_a_container_never_runs_on_the_target_before_its_resume
    test_a_podman_container_never_runs_on_the_target_before_its_resume
saw a container counting flat out count on there: podman's 873 counts at 22,000 a second,
some 40 ms; runc's (lazy) and crun's rewrote their count file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import sys
import tarfile
import time
from pathlib import Path

from .. import carried, criu, proc, runtimes, service_address, units
from .. import journal as journal_streams
from .. import trial as trial_restore
from ..errors import LivemigError, Phase
from ..options import WAITS
from ..runtimes import oci_networks, podman, podman_networks, quiet
from ..wire import protocol as p
from .copy import Copy
from .failures import AgentFailure, checked_name, failing_as, logged_errors
from .guard import Guard

LEAVE_STOPPED = "leave-stopped.conf"     # the runtimes' CRIU configuration file, in the work directory


async def restore(msg: p.Restore, d: Path, work: Path, copy: Copy, guard: Guard | None,
                  lazy: bool, parents: dict[str, str] | None = None) -> tuple[proc.Result, list[str], float]:
    """Restore from d: the copy's new root in copy.roots. The command's result, its argv
    (a failed pause's, if the runtime's pause failed) and the time it took. parents: a podman
    container's networks -> their interfaces here, if the preflight read them."""
    pidfile = work / f"restored-{len(copy.roots)}.pid"
    copy.holds_workload |= not msg.replica
    if msg.move_addresses:      # where the tree's sockets are bound, before CRIU binds them again
        try:
            await copy.put_addresses({service_address.parse(a): checked_name(d, "interface")
                                      for a, d in msg.move_addresses.items()}, work.name, msg.tcp_established)
        except LivemigError as e:
            raise AgentFailure(Phase.RESTORE, f"cannot put the service address on: {e.message}") from None
    if msg.carried:     # where CRIU's restore opens them (the source's alone)
        try:
            copy.carried += carried.place(work / checked_name(msg.carried, "image directory"))
        except LivemigError as e:
            raise AgentFailure(Phase.RESTORE, e.message) from None
    c = msg.container
    env = None
    journal: list[socket.socket] = []
    if c is not None:
        if c.runtime not in runtimes.CONTAINER_RUNTIMES:
            raise AgentFailure(Phase.RESTORE, f"unknown runtime {c.runtime!r}")
        checked_name(c.id, "container name")
        if await runtimes.known(c):   # never touch a container of someone else's
            raise AgentFailure(Phase.RESTORE, f"{c.runtime} already has a container {c.id} here")
        asked = criu.Options(tcp_established=msg.tcp_established, file_locks=msg.file_locks)
        # its established connections asked for on the runtime's command line too: runc and crun
        # set that CRIU option themselves, so the configuration file alone cannot
        argv = runtimes.restore_command(c, d, pidfile, lazy, criu.Options(tcp_established=msg.tcp_established))
        if msg.unit is not None and c.runtime == "podman":      # a Quadlet's: into its unit's cgroup
            argv = _in_unit(msg.unit, d, argv)
        # on the link at its own address once restored: quiet until it runs, then announced
        # (runtimes/quiet.py), its connections moved or not: the copy's MAC is not the source's,
        # and a peer's neighbour entry would send there for tens of seconds; a runc or crun
        # container's own network made again as it is restored (oci_networks.py)
        quieting = c.runtime == "podman" and bool(c.networks) or bool(c.own_network and c.own_network.links)
        try:
            network = (oci_networks.at_restore(work, c) if c.own_network
                       else quiet.at_post_restore(work) if quieting else "")
        except LivemigError as e:
            raise AgentFailure(Phase.RESTORE, e.message) from None
        env = proc.environ(**criu.configured(work / LEAVE_STOPPED, criu.restored_config(asked) + network))
        copy.containers.append(c)
        if guard is not None:
            guard.tell("container", c.runtime, c.id)
        if quieting:
            await _hush(copy, c, guard, parents)
    else:
        try:
            journal = journal_streams.opened(msg.journal_streams)
        except LivemigError as e:
            raise AgentFailure(Phase.RESTORE, e.message) from None
        argv = criu.restore(str(d), str(pidfile), lazy=lazy,
                            opts=criu.Options(tcp_established=msg.tcp_established, file_locks=msg.file_locks),
                            extra=tuple(journal_streams.restore_flags(msg.journal_streams, journal)))
    if guard is not None:
        # where CRIU, or runc and crun, write the copy's root's PID (podman writes none): a
        # container too is killed through its cgroup and by signals, its runtime hung or gone
        guard.tell("pidfile", str(pidfile))
    t0 = time.monotonic()
    try:
        with failing_as(Phase.RESTORE, f"cannot restore with {argv[0]}"):
            res = await proc.run(argv, check=False, env=env, leaves_daemon=c is not None,   # podman leaves conmon
                                 started=copy.restore_started, pass_fds=[sk.fileno() for sk in journal])
    finally:
        copy.restore_ended()
        for sk in journal:      # the copy holds its own now (or the restore failed)
            sk.close()
    if c is not None and res.returncode == 0:
        # Its tasks are stopped: paused too, its runtime says so (and a runtime that did
        # not pass CRIU the configuration file on leaves it running no longer than this).
        pause = runtimes.control(c, "pause")
        paused = await _pause(pause, lazy)
        if paused.returncode != 0:
            res, argv = paused, pause
        if c.runtime == "podman" and (found := await podman.inspect(c.id)):
            copy.roots.append(int(found["State"]["Pid"]))
    seconds = time.monotonic() - t0
    if pidfile.exists():
        copy.roots.append(int(pidfile.read_text().strip()))
    if c is not None and quieting and copy.roots:
        copy.quiet.append(copy.roots[-1])     # quiet since within its restore: open at its Resume
    return res, argv, seconds


async def _hush(copy: Copy, c: p.Container, guard: Guard | None, parents: dict[str, str] | None) -> None:
    """The copy off the link from before its link exists until its Resume (quiet.hush), the
    guard told, should this agent die first."""
    try:
        if parents is None and not c.own_network:
            parents = {n.name: n.interface for n in await podman_networks.defined(c.networks)}
        for parent, address in quiet.hushes_of(c, parents or {}):
            copy.hushed.append(await quiet.hush(parent, address))
            if guard is not None:
                guard.tell("hush", copy.hushed[-1])
    except LivemigError as e:       # it is restored all the same, as before there were hushes: said
        print(f"livemig agent: {c.id} could not be kept off the link during its restore: {e.message}",
              file=sys.stderr)


def _in_unit(unit: p.Unit, d: Path, argv: list[str]) -> list[str]:
    """A Quadlet's container's restore (argv), run in its unit's cgroup, its checkpoint's cgroup
    parent cleared (podman.without_cgroup_parent), as the unit itself would have started it."""
    try:
        podman.without_cgroup_parent(d / podman.ARCHIVE)
        return units.in_cgroup(unit.cgroup, argv)
    except (OSError, tarfile.TarError, ValueError, LivemigError) as e:
        raise AgentFailure(Phase.RESTORE, f"cannot restore into {unit.name}'s cgroup: {e}") from None


def stopped_in(msg: p.Restore, d: Path) -> set[int]:
    """The tasks the workload had stopped itself, as the images in d say (their PIDs in the
    dump); AgentFailure if they cannot be read: a copy whose stopped tasks are not known
    would have them continued with the rest."""
    try:
        if msg.container is not None and msg.container.runtime == "podman":
            return podman.stopped_tasks(d)
        return criu.stopped_tasks(d)
    except (OSError, ValueError, tarfile.TarError) as e:
        raise AgentFailure(Phase.RESTORE, f"the images do not say which tasks were stopped: {e}") from None


def failure(res: proc.Result, argv: list[str], d: Path, work: Path) -> AgentFailure:
    """Why the restore from d failed: the copy's network not made again (an action script of
    quiet.py's, in work), CRIU's log, else the command's stderr."""
    errors = logged_errors(d / "restore.log")
    what = " ".join(argv[:2])
    if said := quiet.failed(work):
        return AgentFailure(Phase.RESTORE, f"the container's own network could not be made here: {said}",
                            "\n".join(errors))
    return AgentFailure(Phase.RESTORE, errors[0] if errors else
                        f"{what} exited {res.returncode}: {proc.why(res.stderr)}", "\n".join(errors))


async def _pause(argv: list[str], lazy: bool) -> proc.Result:
    """Pause a container just restored (argv: its runtime's pause). Its tasks, stopped,
    freeze at once. Were one running (a runtime that kept the configuration file from
    CRIU) and waiting inside the kernel for a missing lazy page, it could not freeze until
    the page lands, and a cgroup v1 freezer gives up after a few hundred ms ("unable to
    freeze", thawing again): the page is on its way, so try again for a while before
    calling the restore failed."""
    deadline = time.monotonic() + (WAITS.lazy_pause if lazy else 0)
    while True:
        res = await proc.run(argv, check=False)
        if res.returncode == 0 or time.monotonic() >= deadline:
            return res
        await asyncio.sleep(WAITS.lazy_pause_poll)


async def trial(msg: p.TrialRestore, work: Path) -> p.TrialRestored:
    """A trial restore of image directory msg.dir (trial.py), thrown away with the directory:
    what the source alone has placed for it and taken away after it. Whether CRIU could restore
    it is the answer; only what keeps the trial from being tried at all is an AgentFailure."""
    d = work / checked_name(msg.dir, "image directory")
    # (checked before anything: the directory goes at the end, whatever happened)
    packed = work / checked_name(msg.carried, "image directory") if msg.carried else None
    placed: list[str] = []
    try:
        if packed is not None:
            try:
                placed = carried.place(packed)
            except LivemigError as e:
                raise AgentFailure(Phase.TRIAL, e.message) from None
        name, asked = f"livemig-trial-{work.name}", criu.Options(tcp_established=msg.tcp_established,
                                                                 file_locks=msg.file_locks)
        with failing_as(Phase.TRIAL, "cannot try the restore"):
            if msg.container is None:
                outcome = await trial_restore.attempt(d, name, asked, addresses=msg.addresses, sockets=msg.sockets,
                                                      journal_inodes=msg.journal_inodes)
            else:       # as restore() restores it, under the trial's name
                c = dataclasses.replace(msg.container, id=name)
                argv = runtimes.restore_command(c, d, work / f"{name}.pid", False,
                                                criu.Options(tcp_established=msg.tcp_established))
                env = proc.environ(**criu.configured(work / f"trial-{LEAVE_STOPPED}", criu.restored_config(asked)))
                outcome = await trial_restore.attempt_container(d, name, argv, env, runtime=c.runtime,
                                                                addresses=msg.addresses)
    finally:
        carried.remove(placed)
        trial_restore.images_gone(d)
        if packed is not None:
            shutil.rmtree(packed, ignore_errors=True)
    return outcome
