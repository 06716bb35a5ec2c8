"""The livemig command line: arguments in, the API called, results printed. No migration logic.

Each command imports only the side it runs, at its start: the agent (started on the target
for every move) never loads the source's side, and `--version`, `config` and completion load
neither (the source's side with asyncssh costs some 40 ms more at every start)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
from dataclasses import replace
from pathlib import Path

from . import config, contract, criu, display, logs
from .errors import ExitCode, LivemigError, UsageError
from .interrupts import Terminated, run
from .options import Mode
from .report import CheckReport, CheckRow, Recovered
from .version import __version__

EXAMPLES = """examples:
  livemig move web1 host-b                       move the container web1 (podman, runc or crun) to host-b
  livemig move --pid 4242 host-b                 move process 4242 and its children to host-b
  livemig move --pid 4242 --mode stopcopy --json host-b
  livemig move --dry-run web1 host-b             what would happen: the mode, why, expected downtime
  livemig move web1 host-b --name web1-b         move it, named web1-b there
  livemig clone web1 host-b host-c --count 2     two running replicas of web1 on each host (podman)
  livemig check host-b                           can host-b take workloads from here?
  livemig recover                                after a move that could not finish (exit code 7), or was killed
  livemig completion bash > /etc/bash_completion.d/livemig
"""
CLONE_EXAMPLES = """examples:
  livemig clone web1 host-b                      a replica named web1-clone on host-b
  livemig clone web1 host-b --count 3            web1-clone-1, -2 and -3 on host-b
  livemig clone web1 host-b host-c --keep-name   a replica named web1 on host-b and one on host-c
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="livemig", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Live-migrate running containers and process trees to another host with CRIU.")
    ap.add_argument("--version", action="version", version=f"livemig {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mv = sub.add_parser("move", help="move a container or a process tree to another host",
                        usage="livemig move [options] (CTR | --pid PID) HOST",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    mv.add_argument("names", nargs="+", metavar="[CTR] HOST",
                    help="the container's name or ID (unless --pid), then the target: an ssh host "
                         "name (your ~/.ssh/config applies)")
    mv.add_argument("--pid", type=int, help="move the process tree rooted at PID instead of a container")
    mv.add_argument("--runtime", choices=["podman", "runc", "crun"],
                    help="the container's runtime (default: whichever knows the container)")
    mv.add_argument("--mode", choices=[m.value for m in Mode],
                    help="strategy (default auto: hybrid where the kernel tracks dirty pages, "
                         "else stop-and-copy)")
    mv.add_argument("--max-downtime", type=float, metavar="SECONDS",
                    help="a promise: the move is refused before the freeze (exit code 10) when its downtime "
                         "would be longer (default: none; pre-copy aims at 0.3 s, and a longer one is told)")
    mv.add_argument("--max-rounds", type=int, help="pre-copy rounds at most (default 8)")
    mv.add_argument("--no-throttle", action="store_true",
                    help="no auto-converge: never slow the workload's CPU when pre-copy does not converge")
    mv.add_argument("--no-fill", action="store_true",
                    help="stop-and-copy writes the pages as image files that the restore reads back: "
                         "slower, but the copy is whole before it runs, and the source's copy is gone "
                         "the moment it does (by default they go into the target's memory, and into "
                         "the copy while it runs, the source's copy waiting, stopped, until then)")
    mv.add_argument("--compression-level", type=int, help="zstd level on the wire (default 1)")
    mv.add_argument("--max-bandwidth", metavar="RATE",
                    help="bytes a second the move sends at most, over all its streams together: pre-copy, "
                         "the final pages, post-copy (its faults first), image files, bundles; K, M, G are "
                         "powers of 1024, e.g. 50M or 1G (default: no cap)")
    mv.add_argument("--reconnect-timeout", type=float, metavar="SECONDS",
                    help="once the target's copy runs, how long to reach the target again if the link "
                         "breaks, the copy waiting on its missing pages meanwhile, before that copy is "
                         "given up (default 300)")
    mv.add_argument("--tcp-established", action="store_true", help="move established TCP connections")
    mv.add_argument("--file-locks", action="store_true",
                    help="move the file locks the tree holds (flock, fcntl): CRIU's --file-locks on both hosts")
    mv.add_argument("--shell-job", action="store_true",
                    help="the tree was started from a terminal: refused, as its terminal cannot follow it")
    mv.add_argument("--image-root",
                    help="where private image directories go, on both hosts (default /var/lib/livemig)")
    mv.add_argument("--name", help="the container's name on the target (default: the same name)")
    mv.add_argument("--force", action="store_true",
                    help="go on past must-match mismatches (podman version, network stack, kernel...) "
                         "that can only make the restore fail, which rolls back")
    mv.add_argument("--dry-run", action="store_true",
                    help="run the preflight, measure the link, print the plan (mode and why, expected "
                         "rounds and downtime) and stop: nothing is dumped or changed")
    _report_flags(mv)

    cl = sub.add_parser("clone", help="start running replicas of a podman container on other hosts",
                        usage="livemig clone [options] CTR HOST [HOST...]",
                        description="Checkpoint a running podman container once, leaving it running, and "
                                    "restore replicas of it (same memory, same state) on each HOST. All or "
                                    "nothing: if one replica fails, none is left.",
                        epilog=CLONE_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cl.add_argument("container", metavar="CTR", help="the running podman container's name or ID")
    cl.add_argument("hosts", nargs="+", metavar="HOST", help="where replicas go: ssh host names")
    cl.add_argument("--name", help="the replicas' name (default CTR-clone); with --count, NAME-1..NAME-N")
    cl.add_argument("--count", type=int, default=1, help="replicas on each host (default 1)")
    cl.add_argument("--keep-name", action="store_true", help="one replica per host, under CTR's own name")
    cl.add_argument("--runtime", choices=["podman"], help="the container's runtime (only podman clones)")
    cl.add_argument("--compression-level", type=int, help="zstd level on the wire (default 1)")
    cl.add_argument("--force", action="store_true", help="go on past must-match mismatches, as for move")
    cl.add_argument("--image-root")
    _report_flags(cl)

    ck = sub.add_parser("check", help="run the preflight checks against a host, touching nothing",
                        epilog="example:\n  livemig check host-b", formatter_class=argparse.RawDescriptionHelpFormatter)
    ck.add_argument("host", help="the target: an ssh host name")
    ck.add_argument("--mode", choices=[m.value for m in Mode])
    ck.add_argument("--image-root")
    ck.add_argument("--json", action="store_true", help="print the checks as JSON")

    cf = sub.add_parser("config", help="print the effective defaults and where each comes from",
                        epilog="The file is $LIVEMIG_CONFIG, else ~/.config/livemig/config.toml; each "
                               "setting may also come from LIVEMIG_<NAME> (e.g. LIVEMIG_MAX_DOWNTIME=0.5), "
                               "and flags override both.\n\nexamples:\n  livemig config\n"
                               "  LIVEMIG_MODE=stopcopy livemig config --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cf.add_argument("--json", action="store_true", help="print them as JSON")

    rc = sub.add_parser("recover", help="settle moves that failed past their final dump, on this (the source) host",
                        description="A move whose livemig was killed past its final dump, or whose post-copy "
                                    "lost its target, may leave the workload stopped here or on the target. "
                                    "recover finds each such move and lets exactly one copy run on: for "
                                    "post-copy the target's if it had every page, else this one; for "
                                    "stop-and-copy the target's if this one was already given up, else this one.",
                        epilog="examples:\n  livemig recover\n  livemig recover --target-lost    "
                               "the target host is gone for good: resume the workload here",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rc.add_argument("--target-lost", action="store_true",
                    help="the target host is gone for good (and its copy with it): resume here without asking")
    rc.add_argument("--image-root")
    rc.add_argument("--json", action="store_true", help="print what was settled as JSON")

    co = sub.add_parser("completion", help="print a shell completion script",
                        epilog="examples:\n  livemig completion bash > /etc/bash_completion.d/livemig\n"
                               "  livemig completion zsh > \"${fpath[1]}/_livemig\"",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    co.add_argument("shell", choices=["bash", "zsh"])

    ag = sub.add_parser("agent", help="the target side, started by `livemig move` over ssh")
    ag.add_argument("--image-root", default="/var/lib/livemig")
    return ap


def _report_flags(sub: argparse.ArgumentParser) -> None:
    """What a command that reports (move, clone) prints, and how much on failure."""
    sub.add_argument("--json", action="store_true", help="print only the report, as JSON")
    sub.add_argument("-v", "--verbose", "--debug", action="store_true", dest="verbose",
                     help="on failure, also print the lines of CRIU's logs that explain it")


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
        return _move(args)
    except KeyboardInterrupt:       # move and clone say what was put back; check and recover are run again
        print("livemig: interrupted", file=sys.stderr)
        if getattr(args, "json", False):
            print(contract.failure(args.command, "interrupted", "", ExitCode.INTERRUPTED))
        return ExitCode.INTERRUPTED
    # (SIGTERM: Terminated, a LivemigError that each command's own handler prints as
    # "livemig: terminated" and turns into 143, as this one did before.)


def _command_in(argv: list[str]) -> str:
    """The command argv names, for a --json failure before its arguments parse."""
    command = next((a for a in argv if a in contract.BODIES), "")
    return "move --dry-run" if command == "move" and "--dry-run" in argv else command


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
    # this command's side only (see the module's doc)
    from .source.migration import check
    try:
        options = _settings(mode=args.mode, image_root=args.image_root).options
        rows, mode, why = run(check(args.host, options))
    except LivemigError as e:
        return _failed(args, "check", e)
    ok = all(r.ok for r in rows)
    code = ExitCode.MOVED if ok else ExitCode.PREFLIGHT
    if args.json:
        found = CheckReport(args.host, ok, mode, why, [CheckRow(r.name, r.ok, r.detail, r.hint) for r in rows])
        print(contract.document("check", dataclasses.asdict(found), code))
    else:
        width = max(len(r.name) for r in rows)
        for r in rows:
            say(f"{'ok ' if r.ok else 'FAIL'} {r.name:<{width}}  {r.detail}" +
                (f"  ({r.hint})" if not r.ok and r.hint else ""))
    return code


def _recover(args) -> int:
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


def _move(args) -> int:
    # this command's side only (see the module's doc)
    from .source.migration import migrate, plan
    wanted = 1 if args.pid is not None else 2
    if len(args.names) != wanted:
        said = "move takes " + ("HOST after --pid PID" if wanted == 1 else "a container and a HOST (or --pid PID HOST)")
        return _failed(args, _command_in(["move", "--dry-run"] if args.dry_run else ["move"]),
                       UsageError(said))
    what = args.pid if args.pid is not None else args.names[0]
    host = args.names[-1]
    view = display.for_cli(args.json)

    def call():
        options = replace(_settings(mode=args.mode, max_downtime=args.max_downtime, max_rounds=args.max_rounds,
                                    throttle=False if args.no_throttle else None,
                                    fill=False if args.no_fill else None,
                                    compression_level=args.compression_level, image_root=args.image_root,
                                    max_bandwidth=args.max_bandwidth,
                                    reconnect_timeout=args.reconnect_timeout).options,
                          runtime=args.runtime, name=args.name, force=args.force,
                          criu=criu.Options(tcp_established=args.tcp_established, shell_job=args.shell_job,
                                            file_locks=args.file_locks))
        return (plan if args.dry_run else migrate)(what, host, options, progress=view)
    return _report(args, "move --dry-run" if args.dry_run else "move", call, view,
                   "nothing was changed" if args.dry_run else _undone)


def _undone(report) -> str:
    """What an interrupted move left, from its report."""
    if report is not None and report.outcome == "failed":      # stopped before the workload was touched
        return "nothing was changed, the workload runs on the source"
    return "rolled back, the workload runs on the source"


def _clone(args) -> int:
    # this command's side only (see the module's doc)
    from .source.clone import clone
    view = display.for_cli(args.json)

    def call():
        options = replace(_settings(compression_level=args.compression_level, image_root=args.image_root).options,
                          runtime=args.runtime, force=args.force)
        return clone(args.container, args.hosts, options, name=args.name, count=args.count,
                     keep_name=args.keep_name, progress=view)
    return _report(args, "clone", call, view, "no replica is left; the original runs on")


def _report(args, command: str, call, view, interrupted) -> int:
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
        where = report.failed_phase if report is not None and report.failed_phase else ""
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
    if args.json:
        print(contract.document(command, report.to_dict(), ExitCode.MOVED))   # JSON escapes every control character
    else:
        say(report.summary())
    return ExitCode.MOVED


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
