"""python -m tests.lab up [--hosts N] [--kind vm | --init systemd] | exec NAME -- CMD [ARGS...] | down | demo | rootfs

  up      bring the lab up (idempotent) and print it as one JSON object;
          --kind vm: QEMU VMs booting trixie's kernel (soft-dirty: pre-copy works there);
          --init systemd: namespaced hosts whose PID 1 is systemd (for moves of systemd units)
  exec    run CMD inside host NAME, stdin/stdout/stderr passed through; exits with CMD's code
  down    take everything away: processes, mounts, namespaces, links, cgroups
  demo    bring the lab up, move a counting workload from a to b, print the downtime
  rootfs  build the cached rootfs (and with --vm the VM image) if missing, and print the paths
  wheels  fetch the wheels an offline pipx install needs (tests/test_install.py), if missing
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import down, hosts, rootfs, up
from .netns import INITS
from .proc import LabError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exec"]:
        return _exec(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="bring the lab up and print it as JSON")
    p_up.add_argument("--hosts", type=int, default=2, metavar="N")
    p_up.add_argument("--kind", choices=["netns", "vm"], default="netns")
    p_up.add_argument("--init", choices=INITS, default="lab",
                      help="the hosts' PID 1: lab-init (sshd and a reaper) or systemd")
    sub.add_parser("exec", help="run a command inside a host: exec NAME -- CMD [ARGS...]")
    sub.add_parser("down", help="take the lab down, leaving nothing behind")
    p_demo = sub.add_parser("demo", help="move a counting workload from a to b and print the downtime")
    p_demo.add_argument("--mib", type=int, default=256, help="workload memory (default 256)")
    p_demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p_rootfs = sub.add_parser("rootfs", help="build the cached rootfs if missing and print its path")
    p_rootfs.add_argument("--vm", action="store_true", help="and the VM lab's image")
    sub.add_parser("wheels", help="fetch the wheels the install test needs, if missing, and print their paths")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            print(json.dumps(up(args.hosts, args.kind, args.init).public()))
        elif args.cmd == "down":
            problems = down()
            for p in problems:
                print(f"lab: {p}", file=sys.stderr)
            return 1 if problems else 0
        elif args.cmd == "demo":
            from .demo import demo
            return demo(mib=args.mib, keep=args.keep)
        elif args.cmd == "rootfs":
            print(rootfs.ensure())
            if args.vm:
                from . import vmimage
                print(vmimage.ensure())
        elif args.cmd == "wheels":
            from . import wheels
            print("\n".join(map(str, wheels.ensure())))
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    return 0


def _exec(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m tests.lab exec NAME -- CMD [ARGS...]", file=sys.stderr)
        return 2
    name, cmd = argv[0], argv[2:]
    state = hosts.State.load()
    if not state or not state.alive():
        print("lab: the lab is not up (python -m tests.lab up)", file=sys.stderr)
        return 1
    try:
        host = state.host(name)
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
    from . import cgroups
    cgroups.join(list(host.cgroup_procs))
    # Leak nothing of the caller into the host (see hosts.popen).
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    full = hosts.enter_argv(state, host, cmd)
    os.execvp(full[0], full)


if __name__ == "__main__":
    sys.exit(main())
