"""The commit point: CRIU's action script, and the coordinator's end of it.

CRIU runs the script at every step of a dump. At "pre-dump" (just before it
freezes the workload) the script tells us, so that downtime is measured from
there. At "post-dump" (every image written, every page acknowledged, the
workload still frozen) it waits for our verdict: exit 0 and CRIU kills the
source; exit non-zero and CRIU resumes it. When the coordinator is gone, the
script asks the journal instead: only a migration recorded as committed
(the target holds the restored tree) lets the source die.

The recovery record's commit mark (source/recovery.py) is written before the journal
says "committed", never after: a coordinator killed between the two leaves a mark that
claims a commit CRIU never got (CRIU resumes the source), never a source killed that
no record knows was given up. `livemig recover` reads the journal as the script does
(committed()), so that it does what CRIU did, whatever the mark claims.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from ..workdirs import write_synced

JOURNAL = "journal"
COMMITTED = "committed"     # the journal's word that lets CRIU kill the source (the script's, below)

# It runs with the tree frozen at post-dump: started isolated and without site (-IS), on
# _socket rather than socket, it takes 17 ms rather than 30 (measured on the lab's hosts).
SCRIPT = '''\
import os, sys, _socket
action = os.environ.get("CRTOOLS_SCRIPT_ACTION", "")
if action not in ("pre-dump", "post-dump"):
    sys.exit(0)
verdict = b""
try:
    s = _socket.socket(_socket.AF_UNIX)
    s.connect(os.environ["LIVEMIG_HOOK_SOCKET"])
    s.sendall(action.encode() + b"\\n")
    verdict = s.recv(1) if action == "post-dump" else b"0"
except OSError:    # the coordinator is gone: the journal decides, below
    pass
if not verdict:
    try:
        with open(os.environ["LIVEMIG_JOURNAL"]) as f:
            verdict = b"0" if f.read().startswith("committed") else b"1"
    except OSError:
        verdict = b"1"
sys.exit(0 if verdict == b"0" else 1)
'''


def journal(work: Path) -> str | None:
    """The journal a final dump in work left (its first line), None if it has none: what
    CRIU's script read once the coordinator was gone (only the coordinator writes it)."""
    try:
        return (work / JOURNAL).read_text().partition("\n")[0]
    except FileNotFoundError:
        return None


def committed(state: str | None) -> bool:
    """Did a journal reading state let CRIU kill the source? As the script decides: no
    journal, or anything but "committed", and CRIU resumes it."""
    return state is not None and state.startswith(COMMITTED)


class HookServer:
    def __init__(self, work: Path):
        self.script = work / "criu-hook"
        self.socket = work / "hook.sock"
        self.journal = work / JOURNAL
        loop = asyncio.get_running_loop()
        self.post_dump: asyncio.Future = loop.create_future()
        self.frozen_at = 0.0
        self.rolled_back = False
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None

    @classmethod
    async def start(cls, work: Path) -> HookServer:
        self = cls(work)
        fd = os.open(self.script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(f"#!{sys.executable} -IS\n{SCRIPT}")
        self._write_journal("dumping\n")
        self._server = await asyncio.start_unix_server(self._on_connect, path=str(self.socket))
        os.chmod(self.socket, 0o600)
        return self

    def environment(self) -> dict[str, str]:
        return {"LIVEMIG_HOOK_SOCKET": str(self.socket), "LIVEMIG_JOURNAL": str(self.journal)}

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        action = (await reader.readline()).decode().strip()
        if action == "pre-dump":
            self.frozen_at = time.monotonic()
            writer.close()
        elif action == "post-dump" and self.rolled_back:
            writer.write(b"1")        # given up before the dump was done: CRIU resumes the tree
            writer.close()
        elif action == "post-dump" and not self.post_dump.done():
            self._writer = writer     # held open: the verdict goes back on it
            self.post_dump.set_result(time.monotonic())
        else:
            writer.close()

    @property
    def waiting(self) -> bool:
        return self._writer is not None

    def commit(self) -> None:
        """CRIU kills the source: the journal says so first, for a coordinator killed before
        the verdict's byte is out (the record's commit mark is on disk already)."""
        self._write_journal(f"{COMMITTED}\n")
        self._verdict(b"0")

    def proceed(self) -> None:
        """Let a lazy dump go on to serve pages: it leaves the source stopped, not killed."""
        self._write_journal("serving\n")
        self._verdict(b"0")

    def mark_committed(self) -> None:
        self._write_journal(f"{COMMITTED}\n")

    def rollback(self) -> None:
        """Now, or when the dump gets there: a lazy dump writes no page before its post-dump
        step, so nothing else would stop it on its way."""
        self.rolled_back = True
        self._write_journal("rolled back\n")
        self._verdict(b"1")

    def _verdict(self, byte: bytes) -> None:
        if self._writer is not None:
            self._writer.write(byte)
            self._writer.close()
            self._writer = None

    def _write_journal(self, state: str) -> None:
        # whole or not at all for the script that reads it; its directory is not synced (as
        # workdirs.replace would): the journal matters only to this boot's CRIU, and to this
        # boot's `livemig recover` (after a restart the source's copy is gone, whatever it says)
        tmp = self.journal.with_suffix(".tmp")
        write_synced(tmp, state.encode())
        os.replace(tmp, self.journal)

    async def close(self) -> None:
        if self._server:
            self._server.close()
