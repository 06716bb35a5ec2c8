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
- **journal streams**: a service's stdout and stderr are streams to journald, which CRIU
  cannot dump (their other end is journald's): the dump names them external
  (--external unix[INODE]) and the target's restore is given a stream of its own host's
  journal for each (--inherit-fd), opened with the header systemd itself writes, so the
  copy's lines are logged for its unit there.
- **adopt** (the target, once the copy runs whole): the unit starts with a runtime drop-in
  that makes its start a no-op whose main process is the restored root (Type=forking and
  a PID file), then the drop-in goes: from there on the unit is as defined, and its main
  process the copy; `systemctl stop` stops it, and Restart= restarts it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

from . import proc, unixsockets
from .errors import LivemigError, Phase, PreflightError
from .wire.protocol import JournalStream, Unit

RUNTIME_UNITS = Path("/run/systemd/system")     # systemd's runtime drop-ins: gone at a reboot
MOVING = "50-livemig-moving.conf"       # the source's, from the freeze to the end of the move
ADOPTING = "50-livemig-adopting.conf"   # the target's, for the start that adopts the copy
JOURNAL_STDOUT = "/run/systemd/journal/stdout"
_SERVICE = re.compile(r"^[A-Za-z0-9:_.@-][A-Za-z0-9:_.@\\-]{0,240}\.service$")
# Where a unit's definition may be written on the target: systemd's own directories alone.
_DEFINITIONS = ("/etc/systemd/system/", "/usr/lib/systemd/system/", "/lib/systemd/system/")
# Who else supervises what runs in a cgroup: a move would fight them (their restart, their kill).
# (a cgroup of theirs, by its name: kubepods.slice, docker-ID.scope or /docker/ID, crio-ID.scope, ...)
_ID = r"[0-9a-f]{12,64}"
_FOREIGN = [(re.compile(r"kubepods\b.*"), "Kubernetes (the kubelet)"),
            (re.compile(rf"docker|docker-{_ID}\.scope"), "docker"),
            (re.compile(rf"crio-(conmon-)?{_ID}\.scope"), "CRI-O"),
            (re.compile(rf"containerd\.service|cri-containerd-{_ID}\.scope"), "containerd")]
_SYSLOG_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
                      "authpriv", "ftp", "", "", "", "", "local0", "local1", "local2", "local3", "local4",
                      "local5", "local6", "local7")


def checked(name: str) -> str:
    """name, if it is a service's plain name: it goes into paths and systemctl's argv."""
    if not _SERVICE.match(name):
        raise LivemigError(f"refusing unit name {name!r}: not a service's plain name", phase=Phase.PREFLIGHT)
    return name


def systemd_here() -> bool:
    """Is this host's init systemd (sd_booted(3)'s own test)?"""
    return os.path.isdir("/run/systemd/system")


def cgroup_of(pid: int) -> str:
    """pid's cgroup in the unified hierarchy ("" where it has none)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:     # gone: the dump will say so
        return ""
    return next((line[3:] for line in lines if line.startswith("0::")), "")


def refuse_foreign(pid: int, what: str) -> None:
    """PreflightError if another supervisor runs pid (its cgroups say whose): never forced."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:     # gone: the dump will say so
        return
    found = foreign(text)
    if found:
        who, path = found
        raise PreflightError(f"{what} is run by {who} (its cgroup: {path}), which would start it again, or "
                             "kill the moved copy: livemig does not move what another supervisor owns",
                             phase=Phase.PREFLIGHT, hint=f"move it with {who}'s own tools, or run it outside {who}")


def foreign(cgroups: str) -> tuple[str, str] | None:
    """Who else supervises what is in these cgroups (/proc/PID/cgroup's text), and the cgroup
    that says so; None when no one does."""
    for line in cgroups.splitlines():
        path = line.split(":", 2)[-1]
        for name, who in _FOREIGN:
            if any(name.fullmatch(part) for part in path.split("/")):
                return who, path
    return None


async def _show(name: str, *props: str) -> dict[str, str]:
    res = await proc.run(["systemctl", "show", name, *(f"--property={p}" for p in props)])
    return dict(line.split("=", 1) for line in res.text.splitlines() if "=" in line)


# --- the source ------------------------------------------------------------------------------------
async def find(root: int, pids: list[int]) -> Unit | None:
    """The service that runs the tree at root, to be handed over; None when none does (or no
    systemd runs here). PreflightError when the tree is only part of its unit."""
    path = cgroup_of(root)
    name = path.rsplit("/", 1)[-1]
    if not systemd_here() or not name.endswith(".service"):
        return None
    props = await _show(name, "MainPID", "FragmentPath", "DropInPaths", "UnitFileState")
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
    return Unit(name, files, props.get("UnitFileState") == "enabled")


def _procs(path: str) -> list[int]:
    try:
        return [int(x) for x in Path(f"/sys/fs/cgroup{path}/cgroup.procs").read_text().split()]
    except (OSError, ValueError):   # no such cgroup (a v1-only host): nothing more to find
        return []


async def journal_streams(pids: list[int], unit: Unit | None) -> list[JournalStream]:
    """The tree's streams to journald, said as its unit has them logged; PreflightError for
    any other stream whose other end is outside the tree (CRIU cannot dump half of one)."""
    try:
        outward = unixsockets.outward(pids)
    except OSError:     # no sock_diag here: CRIU's dump says, as it did before this check
        return []
    props = await _show(unit.name, "SyslogIdentifier", "SyslogLevel", "SyslogFacility",
                        "SyslogLevelPrefix") if unit and outward else {}
    streams = []
    for mine, theirs in outward:
        if theirs.name != JOURNAL_STDOUT:
            raise PreflightError(f"the workload holds a Unix stream connection to "
                                 f"{theirs.name or 'an unnamed socket'} (its other end is outside the tree): "
                                 "CRIU cannot dump half of a connection", phase=Phase.PREFLIGHT,
                                 hint="move the process at its other end in the same tree, or have the "
                                      "workload close it")
        streams.append(JournalStream(mine.inode, props.get("SyslogIdentifier") or _identifier(pids[0]),
                                     unit.name if unit else "", _priority(props),
                                     props.get("SyslogLevelPrefix", "yes") != "no"))
    return streams


def _identifier(pid: int) -> str:
    """What systemd logs a service's lines as when it names no SyslogIdentifier: its program's name."""
    try:
        return os.path.basename(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode())
    except (OSError, UnicodeDecodeError):   # gone, or a name that is not text: journald's own fallback
        return "unknown"


def _priority(props: dict[str, str]) -> int:
    level, facility = props.get("SyslogLevel", "info"), props.get("SyslogFacility", "daemon")
    return ((_SYSLOG_FACILITIES.index(facility) if facility in _SYSLOG_FACILITIES else 3) << 3) | \
        (_SYSLOG_LEVELS.index(level) if level in _SYSLOG_LEVELS else 6)


def dump_flags(streams: list[JournalStream]) -> list[str]:
    return [f"--external=unix[{s.inode}]" for s in streams]


async def hold(unit: Unit) -> None:
    """From the freeze on, the unit ends without a restart when the source's copy is killed."""
    d = RUNTIME_UNITS / f"{unit.name}.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / MOVING).write_text("# livemig: this unit's workload is moving to another host\n"
                            "[Service]\nRestart=no\nSuccessExitStatus=SIGKILL\n")
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
        if unit.enabled:
            await proc.run(["systemctl", "disable", "--quiet", unit.name])
        state = (await _show(unit.name, "ActiveState")).get("ActiveState", "")
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
    """How the unit name is here: "no systemd", "absent" (no definition), or its ActiveState."""
    if not name:
        return ""
    checked(name)
    if not systemd_here():
        return "no systemd"
    props = await _show(name, "LoadState", "ActiveState")
    return "absent" if props.get("LoadState") == "not-found" else props.get("ActiveState", "unknown")


async def install(unit: Unit) -> list[str]:
    """The unit's definition written where the source had it, if this host has no such unit:
    the paths written (for uninstall)."""
    if await state(checked(unit.name)) != "absent":
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
    """What install wrote goes (the restore was undone)."""
    for path in reversed(written):
        try:
            os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
        except OSError:     # gone already, or a directory with other files now: left
            continue
    if written:
        await _reload(Phase.ROLLBACK)


def open_streams(streams: list[JournalStream]) -> list[socket.socket]:
    """A stream of this host's journal for each, opened as systemd opens a service's: the
    header (identifier, unit, priority, level prefix, forwarding) first, and read-shut."""
    opened: list[socket.socket] = []
    try:
        for s in streams:
            sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            opened.append(sk)
            sk.connect(JOURNAL_STDOUT)
            sk.shutdown(socket.SHUT_RD)
            sk.sendall(f"{s.identifier}\n{s.unit}\n{s.priority}\n{int(s.level_prefix)}\n0\n0\n0\n".encode())
    except OSError as e:
        for sk in opened:
            sk.close()
        raise LivemigError(f"cannot open a stream to this host's journal ({JOURNAL_STDOUT}): {e}",
                           phase=Phase.RESTORE) from None
    return opened


def restore_flags(streams: list[JournalStream], opened: list[socket.socket]) -> list[str]:
    return [f"--inherit-fd=fd[{sk.fileno()}]:socket:[{s.inode}]" for s, sk in zip(streams, opened, strict=True)]


async def adopt(unit: Unit, pid: int, work: Path) -> list[str]:
    """The unit takes the running copy (root pid) as its main process. Never raises: the copy
    runs whatever this says, and what could not be done is said (warnings)."""
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
        if unit.enabled:
            await proc.run(["systemctl", "enable", "--quiet", unit.name])
        main = int((await _show(unit.name, "MainPID")).get("MainPID") or 0)
        if main != pid:
            warnings.append(f"{unit.name}'s main process is PID {main}, not the copy's {pid}")
    except (LivemigError, ValueError) as e:
        warnings.append(f"{unit.name}: {e}")
    return warnings
