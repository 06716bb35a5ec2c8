"""The livemig command line: arguments in, the API called, results printed. No migration logic.

Each command imports only the side it runs, at its start: the agent (started on the target
for every move) never loads the source's side, and `--version`, `config` and completion load
neither (the source's side with asyncssh costs some 40 ms more at every start)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from dataclasses import replace
from pathlib import Path

from . import config, contract, criu, display, logs
from .arguments import build_parser
from .errors import ExitCode, LivemigError, UsageError
from .interrupts import Terminated, run
from .options import Options
from .recoverreport import Listed, Recovered
from .wire.transports.destination import Destination


def _destination(host: str, port: int | None) -> str:
    """The target, with --port folded in (ssh://host:port): a move's record keeps it, so that
    `livemig recover` reaches the same host the same way. Bad input: UsageError."""
    to = Destination.parse(host)
    return to.with_port(port).text if port is not None else host


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        if e.code and "--json" in argv:     # argparse said why on stderr, with the usage
            print(contract.failure(_command_in(argv), "bad arguments (the usage, on stderr, says which)",
                                   "usage", ExitCode.USAGE))
        return int(e.code or 0) and ExitCode.USAGE
    if args.command == "agent":
        # this command's side only (see the module's doc)
        from .target import agent
        return asyncio.run(agent.main(args.image_root))
    if args.command == "config":
        return _config(args)
    if args.command == "completion":
        # this command's side only (see the module's doc)
        from . import completion
        print(completion.script(build_parser(), args.shell))
        return ExitCode.MOVED
    try:
        if args.command == "check":
            return _check(args)
        if args.command == "clone":
            return _clone(args)
        if args.command == "recover":
            return _recover(args)
        if args.command == "drain":
            return _drain(args)
        return _move(args)
    except KeyboardInterrupt:       # move and clone say what was put back; check and recover are run again
        print("livemig: interrupted", file=sys.stderr)
        if getattr(args, "json", False):
            print(contract.failure(_command_in(argv), "interrupted", "", ExitCode.INTERRUPTED))
        return ExitCode.INTERRUPTED
    # (SIGTERM: Terminated, a LivemigError that each command's own handler prints as
    # "livemig: terminated" and turns into 143, as this one did before.)


def _command_in(argv: list[str]) -> str:
    """The command argv names, for a --json failure before its arguments parse."""
    command = next((a for a in argv if a in contract.BODIES), "")
    for flag in ("--dry-run", "--list"):
        if f"{command} {flag}" in contract.BODIES and flag in argv:
            return f"{command} {flag}"
    return command


def _failed(args, command: str, e: LivemigError) -> int:
    """A command's error, before it had a report: its line on stderr, and with --json its object."""
    say(f"livemig: {e}", err=True)
    if args.json:
        # check is the preflight alone
        phase = e.phase or ("preflight" if command == "check" else "")
        print(contract.failure(command, e.message, phase, e.exit_code, e.host, e.hint))
    return e.exit_code


def say(text: str, err: bool = False) -> None:
    """Print text that may hold what another host said (its errors, CRIU's log lines, names),
    escaped for the terminal (display.escaped)."""
    print(display.escaped(text), file=sys.stderr if err else sys.stdout)


def _check(args) -> int:
    # the API's, which loads the source's side (see the module's doc)
    from . import check
    try:
        options = _settings(mode=args.mode, image_root=args.image_root, bootstrap=_no(args.no_bootstrap)).options
        found = run(check(_destination(args.host, args.port), options))
    except LivemigError as e:
        return _failed(args, "check", e)
    code = ExitCode.MOVED if found.ok else ExitCode.PREFLIGHT
    if args.json:
        print(contract.document("check", dataclasses.asdict(found), code))
    else:
        width = max(len(r.name) for r in found.checks)
        for r in found.checks:
            say(f"{'ok ' if r.ok else 'FAIL'} {r.name:<{width}}  {r.detail}" +
                (f"  ({r.hint})" if not r.ok and r.hint else ""))
    return code


def _listed(args) -> int:
    # the API's, which loads the source's side (see the module's doc)
    from . import pending
    try:
        found = run(pending(_settings(image_root=args.image_root).options))
    except LivemigError as e:
        return _failed(args, "recover --list", e)
    if args.json:
        print(contract.document("recover --list", dataclasses.asdict(Listed(found)), ExitCode.MOVED))
    elif not found:
        print("nothing to recover here")
    for x in [] if args.json else found:
        ran = f"; the target's copy was told to run {x.target_ran_seconds:.0f} s ago" if x.target_ran_seconds else ""
        alive = "; its livemig still runs" if x.livemig_alive else ""
        say(f"{x.migration_id}: {x.workload}" + (f", moving to {x.target}" if x.target else "")
            + f", {x.stage}: here {x.here}{ran}{alive} (as of {x.recorded_at})")
    return ExitCode.MOVED


def _recover(args) -> int:
    if args.list:
        if args.target_lost:
            return _failed(args, "recover --list", UsageError("--list touches nothing: not with --target-lost"))
        return _listed(args)
    # this command's side only (see the module's doc)
    from .source.recovery import recover
    from .source.session import ssh_connector
    try:
        options = _settings(image_root=args.image_root).options
        settled = run(recover(options, ssh_connector(options), target_lost=args.target_lost))
    except LivemigError as e:
        return _failed(args, "recover", e)
    if any(x.outcome == "unresolved" for x in settled):
        code = ExitCode.UNRESOLVED
    elif any(x.outcome == "target lost" for x in settled):
        code = ExitCode.TARGET_LOST      # the operator's word is wanted (--target-lost)
    else:
        code = ExitCode.FAILED if any(x.outcome == "lost" for x in settled) else ExitCode.MOVED
    if args.json:
        print(contract.document("recover", dataclasses.asdict(Recovered(settled)), code))
    elif not settled:
        print("nothing to recover here")
    for x in [] if args.json else settled:
        say(f"{x.outcome}: {x.workload}, moving to {x.target} ({x.migration_id}): {x.detail}")
    return code


def _no(flag: bool) -> bool | None:
    """A --no-X flag as a setting: False when given, else not given (the config's, or the default)."""
    return False if flag else None


def _settings(**flags) -> config.Config:
    """The config file and LIVEMIG_* variables, then the flags given (None: not given)."""
    return config.load().with_flags(**flags)


def _config(args) -> int:
    try:
        cfg = config.load()
    except LivemigError as e:
        return _failed(args, "config", e)
    if args.json:
        print(contract.document("config", {
            "file": str(cfg.file) if cfg.file else None,
            "settings": {k: {"value": cfg.value(k), "from": cfg.sources[k]} for k in config.SETTINGS}}, ExitCode.MOVED))
        return ExitCode.MOVED
    print(config.as_toml(cfg, config.default_path()))
    return ExitCode.MOVED


def _moving(args, **more) -> Options:
    """The options a move takes from its flags (move's, and a drain's for each of its moves)."""
    return replace(_settings(mode=args.mode, max_downtime=args.max_downtime, max_rounds=args.max_rounds,
                             throttle=_no(args.no_throttle), fill=_no(args.no_fill),
                             write_protect=_no(args.no_write_protect), replay=_no(args.no_replay),
                             compression_level=args.compression_level,
                             image_root=args.image_root, max_bandwidth=args.max_bandwidth,
                             bootstrap=_no(args.no_bootstrap), carry_files_max=args.carry_files_max,
                             trial=True if args.trial else None,
                             reconnect_timeout=args.reconnect_timeout, **more).options,
                   force=args.force, criu=criu.Options(tcp_established=args.tcp_established,
                                                       shell_job=getattr(args, "shell_job", False),
                                                       file_locks=args.file_locks))


def _drain(args) -> int:
    # this command's side only (see the module's doc)
    from .source.drain import drain
    from .source.placement import DrainOrder
    command = "drain --dry-run" if args.dry_run else "drain"
    try:
        targets = [_destination(h, args.port) for h in args.to.split(",") if h.strip()]
    except LivemigError as e:
        return _failed(args, command, e)
    view = None if args.json else display.Lines()

    def call():
        return drain(targets, _moving(args), only=args.only, exclude=args.exclude, pids=args.pid,
                     parallel=args.parallel, order=DrainOrder(args.order or "smallest"), dry_run=args.dry_run,
                     progress=view)
    return reported(args, command, call, None, "the moves under way rolled back; those done stay done: "
                    "`livemig drain` again goes on", done=lambda r: ExitCode.MOVED if r.empty else ExitCode.NOT_EMPTY)


def _move(args) -> int:
    # this command's side only (see the module's doc)
    from .source.migration import migrate, plan
    wanted = 1 if args.pid is not None else 2
    if len(args.names) != wanted:
        said = "move takes " + ("HOST after --pid PID" if wanted == 1 else "a container and a HOST (or --pid PID HOST)")
        return _failed(args, _command_in(["move", "--dry-run"] if args.dry_run else ["move"]),
                       UsageError(said))
    what = args.pid if args.pid is not None else args.names[0]
    view = display.for_cli(args.json)

    def call():
        host = _destination(args.names[-1], args.port)
        options = replace(_moving(args, move_addresses=args.move_address), runtime=args.runtime, name=args.name)
        return (plan if args.dry_run else migrate)(what, host, options, progress=view)
    return reported(args, "move --dry-run" if args.dry_run else "move", call, view,
                   "nothing was changed" if args.dry_run else undone)


def undone(report) -> str:
    """What an interrupted move left, from its report."""
    if report is not None and report.outcome == "failed":      # stopped before the workload was touched
        return "nothing was changed, the workload runs on the source"
    return "rolled back, the workload runs on the source"


def _clone(args) -> int:
    # this command's side only (see the module's doc)
    from .source.clone import clone
    view = display.for_cli(args.json)

    def call():
        options = replace(_settings(compression_level=args.compression_level, image_root=args.image_root,
                                    bootstrap=_no(args.no_bootstrap)).options,
                          runtime=args.runtime, force=args.force)
        return clone(args.container, [_destination(h, args.port) for h in args.hosts], options, name=args.name, count=args.count,
                     keep_name=args.keep_name, progress=view)
    return reported(args, "clone", call, view, "no replica is left; the original runs on")


def reported(args, command: str, call, view, interrupted, done=lambda report: ExitCode.MOVED) -> int:
    """Run call() (a migration, its plan or a clone) under view (None: nothing shown while it
    runs) and print its report or its error (with --json, the report, or a Failure where
    there is none: a dry run's is a move's that never was). interrupted: what an interrupt
    left, said as such (or a function of the report that says it)."""
    try:
        with view or contextlib.nullcontext():
            report = run(call())
    except (KeyboardInterrupt, Terminated) as e:     # first: Terminated is a LivemigError too
        what, code = ("terminated", ExitCode.TERMINATED) if isinstance(e, Terminated) else \
            ("interrupted", ExitCode.INTERRUPTED)
        report = getattr(e, "report", None)
        where = getattr(report, "failed_phase", "") or ""      # (a drain's is its moves')
        said = interrupted(report) if callable(interrupted) else interrupted
        say(f"livemig: {where}{': ' if where else ''}{what}: {said}", err=True)
        if args.json:
            print(contract.document(command, report.to_dict(), code) if report is not None and command != "move --dry-run"
                  else contract.failure(command, f"{what}: {said}", where, code))
        return code
    except LivemigError as e:
        say(f"livemig: {e}", err=True)
        if args.json:
            print(contract.document(command, e.report.to_dict(), e.exit_code)
                  if e.report is not None and command != "move --dry-run"
                  else contract.failure(command, e.message, e.phase, e.exit_code, e.host, e.hint))
        else:
            _explain(e, args.verbose)
        return e.exit_code
    code = done(report)
    if args.json:
        print(contract.document(command, report.to_dict(), code))   # JSON escapes every control character
    else:
        say(report.summary())
    return code


def _explain(e: LivemigError, verbose: bool) -> None:
    """Under the error's line: where CRIU's logs were kept; with -v, what in them (and in
    the failing command's output) explains it."""
    kept = getattr(e.report, "logs", None) or []
    if verbose:
        for line in (e.detail or "").splitlines():
            say(f"  {line}", err=True)
        for where in kept:
            host, _, path = where.partition(":")
            if e.report is not None and host == e.report.source and Path(path).is_dir():   # the target's: there, and in detail
                for line in logs.excerpt(Path(path)):
                    say(f"  {line}", err=True)
    if kept:
        say(f"  CRIU's logs: {', '.join(kept)}" + ("" if verbose else " (-v prints what in them explains it)"),
            err=True)
