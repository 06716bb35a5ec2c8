"""How each post-copy ended on this host, kept after the agent is gone (ID.verdict in the
image root): the source's `livemig recover` asks for it when its coordinator never learnt it.

The states: "serving" (post-copy under way), "whole" (the copy has every page and runs),
"killed" (the copy is gone: the source's copy is the workload), "running" (a
stop-and-copy's copy was resumed), "none" (no file).
"""

from __future__ import annotations

import errno
from pathlib import Path

from .. import workdirs
from ..errors import Phase
from ..wire import protocol as p
from .failures import AgentFailure, checked_name

VERDICT_ROOM = 1024


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

    def write(self, migration_id: str, state: str, detail: str = "", phase: str = Phase.POSTCOPY) -> None:
        """Durable before it returns. Each file keeps VERDICT_ROOM bytes, so that a verdict
        still lands when the disk has filled up since the first (a copy declared whole, but
        not written so, would run beside the source's copy resumed for want of a verdict)."""
        path = self.path(migration_id)
        record = f"{state}\n{detail}\n".encode()[:VERDICT_ROOM - 1]
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

    def read(self, migration_id: str) -> tuple[str, str]:
        try:
            state, _, detail = self.path(migration_id).read_text().partition("\n")
        except FileNotFoundError:
            return "none", ""
        return state, detail.strip()

    def forget(self, migration_id: str) -> None:
        self.path(migration_id).unlink(missing_ok=True)

    # --- asked by a fresh agent, for `livemig recover` ------------------------------------
    async def ask(self, msg: p.AskVerdict) -> p.Verdict:
        state, detail = self.read(checked_name(msg.migration_id, "migration id"))
        return p.Verdict(msg.migration_id, state, detail)

    async def forget_asked(self, msg: p.ForgetVerdict) -> p.Done:
        self.forget(checked_name(msg.migration_id, "migration id"))
        return p.Done()
