"""How each post-copy ended on this host, kept after the agent is gone (ID.verdict in the
image root): the source's `livemig recover` asks for it when its coordinator never learnt it.

The states: "serving" (post-copy under way), "whole" (the copy has every page and runs),
"killed" (the copy is gone before it ever ran: the source's copy is the workload), "lost"
(the copy is gone after it ran: what it did and answered would be undone by the source's,
which runs again only by the operator's word), "running" (a stop-and-copy's copy was
resumed), "none" (no file). Whether a "serving" copy has run is in its writer's line
("ran"), written before it is resumed: the one who ends it, the agent or its guard, says
"lost" rather than "killed" then (gone_state).

Each verdict says who wrote it, in its last line: the boot (a verdict of an earlier boot
speaks of a copy that went with the restart) and the writer's PID. What its copy is (its
processes, named for good) is noted beside it (ID.copy) once known, and not synced: it
names processes of this boot alone, and is read only to see whether they still run
(orphans.py asks both before answering `livemig recover`).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from .. import proc, workdirs
from ..errors import Phase
from .failures import AgentFailure

VERDICT_ROOM = 1024
NOTED = ("serving", "running")      # the states whose copy is noted (ID.copy), to see whether it runs


class VerdictUnwritten(AgentFailure, OSError):
    """A verdict that could not be written (an OSError too: the disk's own reason)."""

    def __init__(self, phase: str, path: Path, e: OSError):
        AgentFailure.__init__(self, phase, f"cannot write the verdict {path}: {e.strerror or e}")
        self.errno, self.strerror, self.filename = e.errno, e.strerror, str(path)


class Verdicts:
    """One small file per migration in the image root (ID.verdict), no memory in it; written
    before anything it describes can be seen, and forgotten once the coordinator knows."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, migration_id: str) -> Path:
        return self.root / f"{migration_id}.verdict"

    def _copy_path(self, migration_id: str) -> Path:
        return self.root / f"{migration_id}.copy"

    def write(self, migration_id: str, state: str, detail: str = "", phase: str = Phase.POSTCOPY,
              ran: bool = False) -> None:
        """Durable before it returns. Each file keeps VERDICT_ROOM bytes, so that a verdict
        still lands when the disk has filled up since the first (a copy declared whole, but
        not written so, would run beside the source's copy resumed for want of a verdict)."""
        path = self.path(migration_id)
        writer = json.dumps({"boot": proc.boot_id(), "pid": os.getpid(), **({"ran": True} if ran else {})})
        detail = " ".join(detail.split("\n"))[:VERDICT_ROOM // 2]     # one line; room left for the writer's
        record = f"{state}\n{detail}\n{writer}\n".encode()[:VERDICT_ROOM - 1]
        record = record.ljust(VERDICT_ROOM - 1) + b"\n"     # read back stripped
        try:
            workdirs.replace(path, record)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
                raise VerdictUnwritten(phase, path, e) from e
            try:
                workdirs.write_synced(path, record, 0)      # in place: the room it kept
            except OSError as again:
                raise VerdictUnwritten(phase, path, again) from again
        if state not in NOTED:
            self._copy_path(migration_id).unlink(missing_ok=True)     # its copy is settled: no more to note

    def read(self, migration_id: str) -> tuple[str, str]:
        state, detail, _ = self.read_all(migration_id)
        return state, detail

    def gone_state(self, migration_id: str) -> str:
        """What a copy ended before it had every page is: "lost" if it ran (its verdict said
        so before it was resumed), else "killed"."""
        return "lost" if self.read_all(migration_id)[2].get("ran") else "killed"

    def read_all(self, migration_id: str) -> tuple[str, str, dict]:
        """(state, detail, who wrote it: {"boot", "pid"}, {} if it does not say)."""
        try:
            lines = self.path(migration_id).read_text().split("\n")
        except FileNotFoundError:
            return "none", "", {}
        state, detail = lines[0], lines[1].strip() if len(lines) > 1 else ""
        try:
            writer = json.loads(lines[2])
        except (IndexError, ValueError):     # written by an older livemig, or cut short: nobody named
            writer = {}
        return state, detail, writer if isinstance(writer, dict) else {}

    def note_copy(self, migration_id: str, copy: dict) -> None:
        """What the copy is (runtimes.held.HeldCopy's fields), beside its verdict. Whole or not
        at all, but not synced: a restart ends the processes it names, and this note with them."""
        path = self._copy_path(migration_id)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(copy).encode())
            os.replace(tmp, path)
        except OSError:
            # a full disk: whether the copy still runs is then not told (noted_copy: None),
            # never told wrong, and the move goes on
            tmp.unlink(missing_ok=True)

    def noted_copy(self, migration_id: str) -> dict | None:
        try:
            noted = json.loads(self._copy_path(migration_id).read_text())
        except (OSError, ValueError):     # never noted (or lost with a restart): not known
            return None
        return noted if isinstance(noted, dict) else None

    def forget(self, migration_id: str) -> None:
        self.path(migration_id).unlink(missing_ok=True)
        self._copy_path(migration_id).unlink(missing_ok=True)
