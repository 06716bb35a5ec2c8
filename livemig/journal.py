"""A tree's streams to journald, carried across a move (issue 35): both halves are here.

A service's stdout and stderr are Unix streams to journald (/run/systemd/journal/stdout),
which CRIU cannot dump: their other end is journald's, outside the tree ("Can't dump half of
stream unix connection"). The source's dump names them external (--external unix[INODE]);
the target's restore is given, in each one's place, a stream of its own host's journal
(--inherit-fd), opened as systemd opens a service's: with the header that says what each
line is logged as (identifier, unit, priority, level prefix). The copy's lines go on in the
target's journal, for the same unit. Any other stream whose other end is outside the tree is
refused before the freeze (unixsockets.py finds them).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from . import unixsockets
from .errors import LivemigError, Phase, PreflightError
from .units import show
from .wire.protocol import JournalStream, Unit

JOURNAL_STDOUT = "/run/systemd/journal/stdout"
_SYSLOG_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
                      "authpriv", "ftp", "", "", "", "", "local0", "local1", "local2", "local3", "local4",
                      "local5", "local6", "local7")



# --- the source ------------------------------------------------------------------------------------
async def streams(pids: list[int], unit: Unit | None) -> list[JournalStream]:
    """The tree's streams to journald, said as its unit has them logged; PreflightError for
    any other stream whose other end is outside the tree (CRIU cannot dump half of one)."""
    try:
        outward = unixsockets.outward(pids)
    except OSError:     # no sock_diag here: CRIU's dump says, as it did before this check
        return []
    props = await show(unit.name, "SyslogIdentifier", "SyslogLevel", "SyslogFacility",
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



# --- the target ------------------------------------------------------------------------------------
def opened(streams: list[JournalStream]) -> list[socket.socket]:
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
