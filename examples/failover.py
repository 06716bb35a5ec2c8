"""Evacuate this host before maintenance, with livemig's Python API.

    python3 failover.py --to host-b --to host-c web1 db1 4242

Each workload (a container's name, or a PID for a process tree) goes to the first target
that takes it: a target that cannot be reached, whose preflight refuses it, or over whose
link the workload would stand still longer than --max-downtime promises, is passed over for
the next one; any other failure stops there, with the workload still running
here (livemig rolls back). One JSON line per workload on stdout. Exit status 0 when every
workload moved, else livemig's exit code of the last failure (see the README).
"""

import argparse
import asyncio
import json
import sys

import livemig

TRY_NEXT = {livemig.ExitCode.CONNECTION, livemig.ExitCode.PREFLIGHT, livemig.ExitCode.DOWNTIME}


async def move_one(name: str, targets: list[str], options: livemig.Options) -> int:
    """Move one workload to the first target that takes it; livemig's exit code."""
    what = int(name) if name.isdigit() else name
    code = int(livemig.ExitCode.USAGE)   # no target at all
    for target in targets:
        try:
            report = await livemig.migrate(what, target, options)
        except livemig.LivemigError as e:
            print(json.dumps({"workload": name, "target": target, "moved": False,
                              "phase": e.phase, "error": str(e), "exit_code": int(e.exit_code)}), flush=True)
            code = int(e.exit_code)
            if e.exit_code in TRY_NEXT:
                continue
            return code
        print(json.dumps({"workload": name, "target": target, "moved": True, "mode": report.mode,
                          "downtime_ms": round(report.downtime_seconds * 1000)}), flush=True)
        return 0
    return code


async def evacuate(workloads: list[str], targets: list[str], options: livemig.Options) -> int:
    status = 0
    for name in workloads:
        status = await move_one(name, targets, options) or status
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--to", action="append", required=True, metavar="HOST", help="a target, in order of preference")
    ap.add_argument("--max-downtime", type=float, metavar="SECONDS",
                    help="a promise: a move that would stand the workload still longer is refused, before "
                         "the freeze, and the next target tried (default: none)")
    ap.add_argument("workloads", nargs="+", metavar="CTR|PID")
    a = ap.parse_args()
    return asyncio.run(evacuate(a.workloads, a.to, livemig.Options(max_downtime=a.max_downtime)))


if __name__ == "__main__":
    sys.exit(main())
