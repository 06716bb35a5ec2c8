"""livemig: live-migrate running containers and process trees between hosts with CRIU.

The Python API, for failover scripts:

    import asyncio, livemig
    report = asyncio.run(livemig.migrate("web1", "host-b"))          # a runc or crun container
    report = asyncio.run(livemig.migrate(4242, "host-b", livemig.Options(mode=livemig.Mode.STOPCOPY)))
    print(report.downtime_seconds)

migrate() returns a Report, or raises a LivemigError whose .phase names the
phase that failed and whose .exit_code is the CLI's; the workload then runs on
the source. The one exception is Unresolved (exit code 7): post-copy lost its
target, the workload waits stopped on the source, and `livemig recover` settles it.
Options(max_downtime=0.5) is a promise: a move that would stand the workload still longer is
refused before the freeze (DowntimeRefused, exit code 10), its .report's
expected_downtime_seconds saying how long it would have been.

    report = asyncio.run(livemig.clone("web1", ["host-b", "host-c"], count=2))   # podman replicas
    report = asyncio.run(livemig.drain(["host-b", "host-c"]))       # everything off this host
    print(report.empty, [(m.workload, m.target, m.outcome) for m in report.moves])

progress=, if given, is called with each event of livemig.progress as the move goes:
ModeChosen, RoundDone (a pre-copy round, with its bandwidth, dirty rate and the downtime
it promises), Throttled (auto-converge slowed the workload: Options.throttle), Stepping
(a phase begins), Sending (bytes so far, a few times a second), Running (the target
runs), Fetching (post-copy's pages so far)...

    asyncio.run(livemig.migrate("web1", "host-b", progress=print))
"""

from .drainreport import DrainEarlier, DrainLeft, DrainMove, DrainPlacement, DrainReport
from .errors import (
    ConnectionFailed,
    DowntimeRefused,
    DumpError,
    ExitCode,
    LivemigError,
    PreflightError,
    RestoreError,
    Unresolved,
    UsageError,
    WorkloadExited,
)
from .interrupts import Terminated, terminable
from .options import Mode, Options
from .progress import Callback
from .recoverreport import Pending, Settled
from .report import (
    CheckReport,
    CheckRow,
    CloneReport,
    Plan,
    Replica,
    Report,
    RoundReport,
    ThrottleStep,
)
from .version import __version__

_DEFAULTS = Options()      # every default of Options (frozen: one instance serves every call)


async def migrate(what: int | str, host: str, options: Options = _DEFAULTS, *, progress: Callback | None = None) -> Report:
    """Move a workload to host ([user@]host or ssh://[user@]host[:port], as ssh takes it):
    what is a PID (the process tree rooted there) or a container's name or ID (runc or crun;
    Options.runtime to say which). A SIGTERM meanwhile rolls it back and raises Terminated
    (exit_code 143), unless the program handles SIGTERM itself."""
    # loaded at first use: `import livemig` stays light for the agent and the guard, which import the package first
    from .source.migration import migrate as _migrate
    return await terminable(_migrate(what, host, options, progress=progress))


async def check(host: str, options: Options = _DEFAULTS) -> CheckReport:
    """The preflight's checks against host, touching nothing: `livemig check`'s report (.ok
    False: a check failed, its row says which and how to fix it). Raises a LivemigError
    when host cannot be asked (ConnectionFailed)."""
    # loaded at first use: `import livemig` stays light for the agent and the guard, which import the package first
    from .source.migration import check as _check
    rows, mode, why = await _check(host, options)
    return CheckReport(host, all(r.ok for r in rows), mode, why, [CheckRow(r.name, r.ok, r.detail, r.hint) for r in rows])


async def recover(options: Options = _DEFAULTS, *, target_lost: bool = False) -> list[Settled]:
    """`livemig recover`: settle every move on this host that its livemig left unfinished
    (killed, or post-copy's target lost), so that exactly one copy runs on; target_lost:
    the operator's word that the target is gone for good."""
    # loaded at first use: `import livemig` stays light for the agent and the guard, which import the package first
    from .source.recovery import recover as _recover
    from .source.session import ssh_connector
    return await _recover(options, ssh_connector(options), target_lost=target_lost)


async def pending(options: Options = _DEFAULTS) -> list[Pending]:
    """`livemig recover --list`: what recover() would settle, and where each move stands;
    nothing is touched."""
    # loaded at first use: `import livemig` stays light for the agent and the guard, which import the package first
    from .source.pending import pending as _pending
    return await _pending(options)


async def plan(what: int | str, host: str, options: Options = _DEFAULTS, *, progress: Callback | None = None) -> Plan:
    """What migrate() would do, changing nothing: its preflight passes (else the same
    LivemigError), the link is measured, and the Plan holds the mode, why, and the
    expected rounds and downtime."""
    # loaded at first use: `import livemig` stays light for the agent and the guard, which import the package first
    from .source.migration import plan as _plan
    return await terminable(_plan(what, host, options, progress=progress))


async def clone(what: str, hosts: list[str], options: Options = _DEFAULTS, *, name: str | None = None,
                count: int = 1, keep_name: bool = False,
                progress: Callback | None = None) -> CloneReport:
    """Running replicas of the podman container what on each of hosts, from one checkpoint
    that leaves it running: count per host, named NAME or NAME-1..N (NAME: name, else
    what-clone; keep_name: what). Returns a CloneReport, or raises a LivemigError (then no
    replica is left anywhere)."""
    # loaded at first use: `import livemig` stays light for the agent and the guard, which import the package first
    from .source.clone import clone as _clone
    return await terminable(_clone(what, hosts, options, name=name, count=count, keep_name=keep_name,
                                   progress=progress))


async def drain(targets: list[str], options: Options = _DEFAULTS, *, only: list[str] | None = None,
                exclude: list[str] | None = None, pids: list[int] | None = None, parallel: int | None = None,
                order: str = "smallest", dry_run: bool = False, progress: Callback | None = None) -> DrainReport:
    """`livemig drain`: every container podman, runc and crun run here (only: those named;
    exclude: all but those), and the process trees rooted at pids, moved to targets, parallel
    at once (None: one per CPU here), "smallest" (the default) or "largest" first, within one
    Options.max_bandwidth budget shared among the moves under way. Returns a DrainReport whose
    .empty says whether everything asked for left this host (each move's report inside, a
    failed move's too: one failing does not stop the others); dry_run: the plan alone. Raises
    a LivemigError for what stops it before any move (UsageError: a name that is not here);
    interrupted, the moves under way roll back, and a drain run again goes on."""
    # loaded at first use: `import livemig` stays light for the agent and the guard, which import the package first
    from .source.drain import drain as _drain
    from .source.placement import DrainOrder
    return await terminable(_drain(targets, options, only=only or (), exclude=exclude or (), pids=pids or (),
                                   parallel=parallel, order=DrainOrder(order), dry_run=dry_run, progress=progress))


__all__ = [
    "CheckReport",
    "CheckRow",
    "CloneReport",
    "ConnectionFailed",
    "DowntimeRefused",
    "DrainEarlier",
    "DrainLeft",
    "DrainMove",
    "DrainPlacement",
    "DrainReport",
    "DumpError",
    "ExitCode",
    "LivemigError",
    "Mode",
    "Options",
    "Pending",
    "Plan",
    "PreflightError",
    "Replica",
    "Report",
    "RestoreError",
    "RoundReport",
    "Settled",
    "Terminated",
    "ThrottleStep",
    "Unresolved",
    "UsageError",
    "WorkloadExited",
    "__version__",
    "check",
    "clone",
    "drain",
    "migrate",
    "pending",
    "plan",
    "recover",
]
