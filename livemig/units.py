"""A workload systemd runs moves as the unit it is (issue 35): both halves are here.

A tree that is a service's main process, its cgroup the service's own, is systemd's: killed
at the commit, the unit's Restart= would start a fresh copy here while the moved one runs
there; and on the target nothing would supervise the copy, nor stop it with the unit.

- **find** (the source's preflight): whose tree this is. A service's (its root the unit's
  main process, and no process of the unit outside the tree) is handed over: its definition
  (fragment and drop-ins) travels in case the target lacks it. Kubernetes, docker and
  containerd run theirs under their own supervision, which a move would fight: refused,
  and --force does not pass that.
- **hold** (the source, just before the freeze): a runtime drop-in says the unit ends
  without a restart, and that the SIGKILL which ends the source's copy is a success: the
  unit goes inactive, not failed. A rollback takes it away again (unhold); so does the end
  of the move (let_go), which also disables the unit here if it was enabled, so that a
  reboot does not start a second copy.
- **install** (the target, before its restore): the definition, where the target has no
  such unit. CRIU restores the tree into the cgroup it had, /system.slice/NAME, which is
  the unit's here too.
- **its journal**: a service's stdout and stderr are streams to journald, which journal.py
  carries across, logged for the unit there.
- **adopt** (the target, once the copy runs whole): the unit starts with a runtime drop-in
  that makes its start a no-op whose main process is the restored root (Type=forking and
  a PID file), then the drop-in goes: from there on the unit is as defined, and its main
  process the copy; `systemctl stop` stops it, and Restart= restarts it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from pathlib import Path

from . import host, proc
from .errors import LivemigError, Phase, PreflightError
from .options import WAITS
from .wire.protocol import Unit

RUNTIME_UNITS = Path("/run/systemd/system")     # systemd's runtime drop-ins: gone at a reboot
MOVING = "50-livemig-moving.conf"       # the source's, from the freeze to the end of the move
ADOPTING = "50-livemig-adopting.conf"   # the target's, for the start that adopts the copy
MASKED = "masked:"      # install's note of a unit it unmasked (in place of a path it wrote)
_SERVICE = re.compile(r"^[A-Za-z0-9:_.@-][A-Za-z0-9:_.@\\-]{0,240}\.service$")
# Where a unit's definition may be written on the target: systemd's own directories alone.
_DEFINITIONS = ("/etc/systemd/system/", "/usr/lib/systemd/system/", "/lib/systemd/system/",
                "/etc/containers/systemd/", "/usr/share/containers/systemd/")     # (Quadlet's .container files)
# Who else supervises what runs in a cgroup: a move would fight them (their restart, their kill).
# (a cgroup of theirs, by its name: kubepods.slice, docker-ID.scope or /docker/ID, crio-ID.scope, ...)
_ID = r"[0-9a-f]{12,64}"
_FOREIGN = [(re.compile(r"kubepods\b.*"), "Kubernetes (the kubelet)"),
            (re.compile(rf"docker|docker-{_ID}\.scope"), "docker"),
            (re.compile(rf"crio-(conmon-)?{_ID}\.scope"), "CRI-O"),
            (re.compile(rf"containerd\.service|cri-containerd-{_ID}\.scope"), "containerd")]
_USER_MANAGER = re.compile(r"user@(\d+)\.service")     # a user's own systemd (systemctl --user): its units'
#                                                          services are under it, and it restarts them
def checked(name: str) -> str:
    """name, if it is a service's plain name: it goes into paths and systemctl's argv."""
    if not _SERVICE.match(name):
        raise LivemigError(f"refusing unit name {name!r}: not a service's plain name", phase=Phase.PREFLIGHT)
    return name


def systemd_here() -> bool:
    """Is this host's init systemd (sd_booted(3)'s own test)?"""
    return os.path.isdir("/run/systemd/system")


def _unified() -> Path:
    """Where the unified cgroup hierarchy is mounted (a systemd host's /sys/fs/cgroup)."""
    return host.cgroup_mount() or Path("/sys/fs/cgroup")


def refuse_foreign(pid: int, what: str) -> None:
    """PreflightError if another supervisor runs pid (its cgroups say whose): never forced."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:     # gone: the dump will say so
        return
    found = foreign(text)
    if found:
        who, path = found
        hint = ("livemig hands over system services only: run it as one, or outside any unit, to move it"
                if who.startswith("the systemd of user") else f"move it with {who}'s own tools, or run it outside {who}")
        raise PreflightError(f"{what} is run by {who} (its cgroup: {path}), which would start it again, or "
                             "kill the moved copy: livemig does not move what another supervisor owns",
                             phase=Phase.PREFLIGHT, hint=hint)


def foreign(cgroups: str) -> tuple[str, str] | None:
    """Who else supervises what is in these cgroups (/proc/PID/cgroup's text), and the cgroup
    that says so; None when no one does."""
    for line in cgroups.splitlines():
        path = line.split(":", 2)[-1]
        parts = path.split("/")
        for name, who in _FOREIGN:
            if any(name.fullmatch(part) for part in parts):
                return who, path
        for i, part in enumerate(parts):
            user = _USER_MANAGER.fullmatch(part)
            if user and any(p.endswith(".service") for p in parts[i + 1:]):
                return f"the systemd of user {user[1]} (systemctl --user)", path
    return None


async def show(name: str, *props: str) -> dict[str, str]:
    res = await proc.run(["systemctl", "show", name, *(f"--property={p}" for p in props)])
    return dict(line.split("=", 1) for line in res.text.splitlines() if "=" in line)


# --- the source ------------------------------------------------------------------------------------
async def find(root: int, pids: list[int]) -> Unit | None:
    """The service that runs the tree at root, to be handed over; None when none does (or no
    systemd runs here). PreflightError when the tree is only part of its unit."""
    path = host.cgroup_of(root) or ""
    name = path.rsplit("/", 1)[-1]
    if not systemd_here() or not name.endswith(".service"):
        return None
    props = await show(name, "MainPID", "FragmentPath", "DropInPaths", "UnitFileState")
    main = int(props.get("MainPID") or 0)
    if main != root:
        raise PreflightError(f"PID {root} is one of {name}'s processes, not its main one"
                             + (f" (PID {main})" if main else "") + ": a part of a unit cannot be moved "
                             "without the rest", phase=Phase.PREFLIGHT,
                             hint=f"move the unit's main process, which takes its whole tree: livemig move --pid {main}"
                             if main else f"start {name} again and move its main process")
    others = sorted(set(_procs(path)) - set(pids))
    if others:
        raise PreflightError(f"{name} runs PID {others[0]} too, outside the tree of PID {root}: the unit cannot "
                             "be moved without it", phase=Phase.PREFLIGHT)
    files = {}
    for f in [props.get("FragmentPath", ""), *props.get("DropInPaths", "").split()]:
        if f and not f.startswith("/run/") and os.path.isfile(f):
            files[f] = Path(f).read_text()
    return Unit(name, files, props.get("UnitFileState") == "enabled", cgroup=path)


async def find_container(name: str, container: str, conmon: int) -> Unit | None:
    """The Quadlet that runs podman's container (podman's label names the unit): handed over
    with its .container file. None where no systemd runs here (the label is then a leftover);
    PreflightError for a unit livemig cannot hand over (not a Quadlet's, or not running it)."""
    if not systemd_here():
        return None
    checked(name)
    props = await show(name, "MainPID", "SourcePath", "ControlGroup", "ActiveState")
    if int(props.get("MainPID") or 0) != conmon:
        raise PreflightError(f"container {container} is labelled as {name}'s (PODMAN_SYSTEMD_UNIT), but {name} "
                             f"is {props.get('ActiveState') or 'unknown'} with another main process: livemig "
                             "cannot tell which unit it would start again", phase=Phase.PREFLIGHT)
    source = props.get("SourcePath", "")
    if not source.endswith(".container") or not source.startswith(_DEFINITIONS) or not os.path.isfile(source):
        raise PreflightError(f"container {container} is run by {name}, which no Quadlet file defines (a `podman "
                             "generate systemd` unit?): livemig hands over only a Quadlet's container",
                             phase=Phase.PREFLIGHT, hint=f"define it as a Quadlet (a .container file), or stop {name} "
                                                         "and run the container apart from it to move it")
    return Unit(name, {source: Path(source).read_text()}, enabled=True, cgroup=props.get("ControlGroup", ""),
                container=container)


def _procs(path: str) -> list[int]:
    try:
        return [int(x) for x in (_unified() / path.lstrip("/") / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):   # no such cgroup (a v1-only host): nothing more to find
        return []


# The argv that runs a program in a cgroup from its first instruction: python makes the cgroup
# and writes itself into its procs ("0": the writer), then execs the program, which inherits
# it. Until its deadline it tries again: systemd removes the cgroup a unit left as it ends
# (ENOENT, or ENODEV for one on its way out), and a rollback restores into it just then.
_IN_CGROUP = """import os, sys, time
cgroup, until, every, argv = sys.argv[1], time.monotonic() + float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
while True:
    try:
        os.makedirs(cgroup, exist_ok=True)
        os.write(os.open(cgroup + "/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC), b"0")
        break
    except OSError as e:
        if e.errno not in (2, 19) or time.monotonic() > until:
            raise
        time.sleep(every)
os.execvp(argv[0], argv)
"""


async def stopped(name: str) -> None:
    """Once the unit's stop is over (its ExecStopPost run, what was left in its cgroup killed),
    within WAITS.unit_cgroup: a rollback restores a Quadlet's container into that cgroup, where
    a stop still under way would kill it."""
    deadline = time.monotonic() + WAITS.unit_cgroup
    while (await show(checked(name), "ActiveState")).get("ActiveState") in ("deactivating", "activating") \
            and time.monotonic() < deadline:
        await asyncio.sleep(WAITS.unit_cgroup_poll)


def in_cgroup(cgroup: str, argv: list[str]) -> list[str]:
    """argv run in cgroup (a path in the unified hierarchy, made if missing): a Quadlet's
    container restored into its unit's cgroup, as the unit itself would have started it."""
    if not cgroup.startswith("/") or ".." in cgroup.split("/"):
        raise LivemigError(f"refusing the cgroup {cgroup!r}", phase=Phase.RESTORE)
    return [sys.executable, "-c", _IN_CGROUP, str(_unified() / cgroup.lstrip("/")), str(WAITS.unit_cgroup),
            str(WAITS.unit_cgroup_poll), *argv]


async def hold(unit: Unit) -> None:
    """From the freeze on, the unit ends without a restart when the source's copy is killed."""
    d = RUNTIME_UNITS / f"{unit.name}.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / MOVING).write_text("# livemig: this unit's workload is moving to another host\n"
                            "[Service]\nRestart=no\nSuccessExitStatus=SIGKILL 137\n")
    await _reload(Phase.FINAL_DUMP)


async def unhold(unit: Unit) -> list[str]:
    """The unit as it was (a rollback: its workload runs on here); warnings for what was not."""
    _remove_dropin(unit.name, MOVING)
    try:
        await _reload(Phase.ROLLBACK)
    except LivemigError as e:
        return [f"{unit.name} may not restart its workload until systemd reloads: {e.message}"]
    return []


async def let_go(unit: Unit, target: str) -> list[str]:
    """Once the move is done: the unit here is inactive, as defined again, and disabled if it
    was enabled (it runs on target now). Warnings for what could not be done."""
    warnings = []
    _remove_dropin(unit.name, MOVING)
    try:
        await _reload(Phase.COMMIT)
        if unit.container:      # a Quadlet's unit is generated: it cannot be disabled, only masked
            await proc.run(["systemctl", "mask", "--quiet", unit.name])
        elif unit.enabled:
            await proc.run(["systemctl", "disable", "--quiet", unit.name])
        state = (await show(unit.name, "ActiveState")).get("ActiveState", "")
        if state not in ("inactive", ""):
            warnings.append(f"{unit.name} is {state} here after its workload moved to {target}")
    except LivemigError as e:
        warnings.append(f"{unit.name} here: {e.message}")
    return warnings


async def settled(name: str, moved: bool, target: str) -> str:
    """`livemig recover`'s, once it settled a move whose coordinator vanished while it held
    the unit: the unit as the workload now stands (here, or moved to target), said."""
    unit = Unit(checked(name), enabled=moved)      # (moved: disabled here, whether it was enabled or not)
    if not moved:
        said = await unhold(unit)
        return f"; {name} here runs it as before" + "".join(f" ({w})" for w in said)
    said = await let_go(unit, target)
    return (f"; {name} here let go of it (inactive, and disabled if it was enabled), and on {target} the copy "
            f"runs outside the unit: `systemctl start {name}` there would start a second copy"
            + "".join(f" ({w})" for w in said))


def _remove_dropin(name: str, dropin: str) -> None:
    d = RUNTIME_UNITS / f"{name}.d"
    (d / dropin).unlink(missing_ok=True)
    try:
        d.rmdir()
    except OSError:     # other drop-ins there, not ours: they stay
        pass


async def _reload(phase: str) -> None:
    try:
        await proc.run(["systemctl", "daemon-reload"])
    except LivemigError as e:
        raise LivemigError(f"systemctl daemon-reload: {e.message}", phase=phase) from None


# --- the target ------------------------------------------------------------------------------------
async def state(name: str) -> str:
    """How the unit name is here: "no systemd", "absent" (no definition), "masked" (a move
    took it away from here), or its ActiveState."""
    if not name:
        return ""
    checked(name)
    if not systemd_here():
        return "no systemd"
    props = await show(name, "LoadState", "ActiveState")
    load = props.get("LoadState")
    return {"not-found": "absent", "masked": "masked"}.get(load or "", props.get("ActiveState", "unknown"))


async def install(unit: Unit) -> list[str]:
    """The unit's definition written where the source had it, if this host has no such unit:
    the paths written (for uninstall). A unit a move masked here (a Quadlet's) is unmasked."""
    here = await state(checked(unit.name))
    if here == "masked":
        await proc.run(["systemctl", "unmask", "--quiet", unit.name], phase=Phase.RESTORE)
        await _reload(Phase.RESTORE)
        return [MASKED + unit.name]
    if here != "absent":
        return []
    written: list[str] = []
    try:
        for path, text in unit.files.items():
            norm = os.path.normpath(path)
            if norm != path or not path.startswith(_DEFINITIONS):
                raise LivemigError(f"a unit's definition is not one to write: {path!r}", phase=Phase.RESTORE)
            for d in reversed([p for p in Path(path).parents if not p.exists()]):
                d.mkdir(mode=0o755)
                written.append(str(d))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            written.append(path)
            with os.fdopen(fd, "w") as out:
                out.write(text)
        await _reload(Phase.RESTORE)
    except (OSError, LivemigError) as e:
        await uninstall(written)
        raise LivemigError(f"cannot write {unit.name}'s definition here: {e}", phase=Phase.RESTORE) from None
    return written


async def uninstall(written: list[str]) -> None:
    """What install wrote goes (the restore was undone): a unit it unmasked is masked again."""
    for path in reversed(written):
        if path.startswith(MASKED):
            await proc.run(["systemctl", "mask", "--quiet", path.removeprefix(MASKED)], check=False)
            continue
        try:
            os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
        except OSError:     # gone already, or a directory with other files now: left
            continue
    if written:
        await _reload(Phase.ROLLBACK)


async def adopt(unit: Unit, pid: int, work: Path) -> list[str]:
    """The unit takes the running copy (its root pid; a Quadlet's container: its conmon,
    podman.adoptable) as its main process. Never raises: the copy runs whatever this says, and what could not be done
    is said (warnings)."""
    pidfile = work / "adopted.pid"
    checked(unit.name)
    d = RUNTIME_UNITS / f"{unit.name}.d"
    try:
        pidfile.write_text(f"{pid}\n")
        d.mkdir(parents=True, exist_ok=True)
        true = shutil.which("true") or "/bin/true"
        (d / ADOPTING).write_text("# livemig: this start adopts the workload moved here\n[Service]\n"
                                  "Type=forking\nExecCondition=\nExecStartPre=\nExecStart=\n"
                                  f"ExecStart={true}\nExecStartPost=\nPIDFile={pidfile}\nGuessMainPID=no\n")
        await _reload(Phase.COMMIT)
        await proc.run(["systemctl", "start", unit.name])
    except (OSError, LivemigError) as e:
        return [f"the copy runs, but {unit.name} did not take it: {e}"]
    finally:
        _remove_dropin(unit.name, ADOPTING)
    warnings = []
    try:
        await _reload(Phase.COMMIT)
        if unit.enabled and not unit.container:     # (a Quadlet's is generated: its [Install] enables it)
            await proc.run(["systemctl", "enable", "--quiet", unit.name])
        main = int((await show(unit.name, "MainPID")).get("MainPID") or 0)
        if main != pid:
            warnings.append(f"{unit.name}'s main process is PID {main}, not the copy's {pid}")
    except (LivemigError, ValueError) as e:
        warnings.append(f"{unit.name}: {e}")
    return warnings
