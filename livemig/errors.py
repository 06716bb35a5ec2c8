"""The errors livemig raises, each naming the phase that failed, and the exit codes they map to.

Exit codes are part of the interface that failover scripts rely on: they never change meaning.

Every exception class livemig defines derives from LivemigError, wherever it lives (the
page machinery's in pages/, the wire's in wire/): one `except LivemigError` sees them all,
and the CLI turns each into its exit code. An error raised where the phase is not known
(pages/, wire/, most of proc.py) leaves phase None; the migration names it with the phase
under way when it reaches it (record_failure). The classes used inside one mechanism (a
uffd's Busy, say) keep the default exit code, FAILED: what a user saw had one escaped
before they were LivemigErrors (Python's own exit status 1).
"""

from __future__ import annotations

from asyncio import CancelledError
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .drainreport import DrainReport
    from .report import CloneReport, Report


class ExitCode(IntEnum):
    """What each means: EXIT_CODES_SAID, below (the man page and the README say the same)."""
    MOVED = 0
    FAILED = 1
    USAGE = 2
    PREFLIGHT = 3
    CONNECTION = 4
    DUMP = 5
    RESTORE = 6
    UNRESOLVED = 7
    EXITED = 8
    TARGET_LOST = 9
    DOWNTIME = 10
    NOT_EMPTY = 11
    INTERRUPTED = 130
    TERMINATED = 143


EXIT_CODES_SAID = {
    ExitCode.MOVED: "the workload runs on the target, and only there (check: every check passed)",
    ExitCode.FAILED: "an unexpected failure; the workload runs on the source",
    ExitCode.USAGE: "bad arguments: nothing was touched",
    ExitCode.PREFLIGHT: "a check failed before the source was touched",
    ExitCode.CONNECTION: "the target could not be reached, or was lost on the way; rolled back",
    ExitCode.DUMP: "CRIU could not checkpoint the workload; it runs on the source",
    ExitCode.RESTORE: "the target could not restore; rolled back, it runs on the source",
    ExitCode.UNRESOLVED: ("post-copy lost the target, or a rollback could not run the workload again: the source's "
                          "copy waits, stopped; `livemig recover` settles it"),
    ExitCode.EXITED: "the workload exited by itself during the move: it runs nowhere, as it chose",
    ExitCode.TARGET_LOST: ("the target's copy ran, then was lost: the source's waits, stopped, as of its final dump; "
                           "only `livemig recover --target-lost` runs it again (what the other did is lost)"),
    ExitCode.DOWNTIME: ("the downtime would be over --max-downtime: refused before the freeze; it runs on the "
                        "source (the report's expected_downtime_seconds, and the error's hint: what it takes)"),
    ExitCode.NOT_EMPTY: ("drain: something asked for is still on this host, each such workload's line in the "
                         "report saying why (no target takes it, or its move failed); the rest moved"),
    ExitCode.INTERRUPTED: "Ctrl-C: rolled back, it runs on the source",
    ExitCode.TERMINATED: "SIGTERM: rolled back, as for Ctrl-C",
}


class Phase:
    """The phases of a migration, in order; the names used in errors, reports and logs."""
    PREFLIGHT = "preflight"
    TRIAL = "trial restore"     # the workload's images restored on the target, thrown away (trial.py)
    PRECOPY = "pre-copy"
    FINAL_DUMP = "final dump"
    TRANSFER = "transfer"
    RESTORE = "restore"
    FILL = "fill"           # pre-copy by hashes: the rest of the pages into the copy, from the target's memory
    COMMIT = "commit"
    POSTCOPY = "post-copy"
    ROLLBACK = "rollback"


class LivemigError(Exception):
    """A failure to report in one line; exit_code says which class it is. phase: the phase
    that failed (Phase's names), None until someone who knows it names it."""

    exit_code = ExitCode.FAILED

    def __init__(self, message: str, *, phase: str | None = None, host: str | None = None,
                 hint: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.message, self.phase, self.host, self.hint, self.detail = message, phase, host, hint, detail
        self.report: Report | CloneReport | DrainReport | None = None   # the move's (or clone's) so far, if it got that far

    def __str__(self) -> str:
        where = " ".join(x for x in (self.phase, f"on {self.host}" if self.host else None) if x)
        text = f"{where}: {self.message}" if where else self.message
        return f"{text} ({self.hint})" if self.hint else text


class UsageError(LivemigError):
    exit_code = ExitCode.USAGE


class PreflightError(LivemigError):
    exit_code = ExitCode.PREFLIGHT


class DowntimeRefused(LivemigError):
    """--max-downtime cannot be kept: the move stops before the freeze (source/downtime.py)."""
    exit_code = ExitCode.DOWNTIME


class ConnectionFailed(LivemigError):
    exit_code = ExitCode.CONNECTION


class StreamsRefused(ConnectionFailed):
    """The target's sshd refuses the agent's data streams (streamlocal forwarding): every
    move needs them, so `livemig check` says so in a row of its own. OpenSSH refuses them
    as it fails to reach a socket that is not there ("open failed"), so where the agent
    runs a refusal is told as this."""

    HINT = ("set `AllowStreamLocalForwarding yes` in the target's /etc/ssh/sshd_config (the default; "
            "`DisableForwarding yes`, or a Match block, turns it off) and reload sshd; a key restricted "
            "in root's authorized_keys there (`restrict`) needs `port-forwarding` among its options")

    def __init__(self, message: str, **kw):
        kw.setdefault("hint", self.HINT)
        super().__init__(message, **kw)


class DumpError(LivemigError):
    exit_code = ExitCode.DUMP


class RestoreError(LivemigError):
    exit_code = ExitCode.RESTORE


class Unresolved(LivemigError):
    """Post-copy failed and the target could not say whether its copy is gone: the source's
    copy stays stopped until `livemig recover` learns it (never two copies running)."""
    exit_code = ExitCode.UNRESOLVED


class TargetLost(LivemigError):
    """The target's copy ran, then went before it had every page: the source's copy, stopped
    since its final dump, never runs again by livemig's own choice (answers the target's copy
    gave would be given again); only the operator's word does it (recover --target-lost)."""
    exit_code = ExitCode.TARGET_LOST


class WorkloadExited(LivemigError):
    """The workload ended by itself while it was being moved: nothing of it runs anywhere,
    and that is its own doing; the target holds nothing of it either."""
    exit_code = ExitCode.EXITED


class CommandFailed(LivemigError):
    """A command exited non-zero; detail holds the end of its stderr."""


class ProtocolError(LivemigError):
    """The peer said something the protocol does not allow."""


def record_failure(e: BaseException, phase: str, report: Report | CloneReport) -> None:
    """Note on report (a move's or a clone's) what failed, and in which phase; and tie the
    error to the phase and the report, for the user and for --json."""
    # the error's own phase, where it has one: the message and the report say the same
    report.failed_phase = e.phase if isinstance(e, LivemigError) and e.phase else phase
    if isinstance(e, LivemigError):
        report.error = str(e)
        e.phase = e.phase or phase
        e.report = report
    else:
        report.error = "interrupted" if isinstance(e, (KeyboardInterrupt, CancelledError)) else repr(e)
        # an interrupt's report, too, is printed (--json): the CLI finds it on the exception,
        # which is Python's own (KeyboardInterrupt, CancelledError), hence no declared attribute
        e.report = report  # type: ignore[attr-defined]
