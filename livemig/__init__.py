"""livemig: live-migrate running containers and process trees between hosts with CRIU.

The Python API, for failover scripts:

    import asyncio, livemig
    report = asyncio.run(livemig.migrate(4242, "host-b", livemig.Options(mode=livemig.Mode.STOPCOPY)))
    print(report.downtime_seconds)

migrate() returns a Report, or raises a LivemigError whose .phase names the
phase that failed and whose .exit_code is the CLI's; the workload then runs on
the source.
"""

__version__ = "0.1.0"

from .errors import (ConnectionFailed, DumpError, ExitCode, LivemigError, PreflightError,  # noqa: E402
                     RestoreError, UsageError)
from .options import Mode, Options  # noqa: E402
from .report import Report, RoundReport  # noqa: E402


async def migrate(pid: int, host: str, options: Options = Options(), *, progress=None) -> Report:
    """Move the process tree rooted at pid to host (an ssh host name)."""
    from .coordinator import migrate as _migrate
    return await _migrate(pid, host, options, progress=progress)


__all__ = ["migrate", "Options", "Mode", "Report", "RoundReport", "LivemigError", "UsageError",
           "PreflightError", "ConnectionFailed", "DumpError", "RestoreError", "ExitCode"]
