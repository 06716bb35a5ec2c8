"""The command line's words: every command, its flags and their help, as argparse reads
them (cli.py runs what they ask; completion.py writes shell completion from them)."""

from __future__ import annotations

import argparse

from .options import Mode
from .version import __version__
from .wire.protocol import spoken

EXAMPLES = """examples:
  livemig move web1 host-b                       move the container web1 (podman, runc or crun) to host-b
  livemig move --pid 4242 host-b                 move process 4242 and its children to host-b
  livemig move --pid 4242 --mode stopcopy --json host-b
  livemig move --dry-run web1 host-b             what would happen: the mode, why, expected downtime
  livemig move web1 host-b --name web1-b         move it, named web1-b there
  livemig clone web1 host-b host-c --count 2     two running replicas of web1 on each host (podman)
  livemig drain --to host-b,host-c               every container here off to host-b and host-c
  livemig check host-b                           can host-b take workloads from here?
  livemig recover                                after a move that could not finish (exit code 7), or was killed
  livemig completion bash > /etc/bash_completion.d/livemig
"""
DRAIN_EXAMPLES = """examples:
  livemig drain --to host-b,host-c               every container here to host-b and host-c
  livemig drain --to host-b --pid 4242 --only web1   web1 and the tree of process 4242
  livemig drain --to host-b,host-c --dry-run     the plan: where each would go, and its expected downtime
  livemig drain --to host-b,host-c --parallel 2 --max-bandwidth 100M --json
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
    # the protocol's versions too: two hosts' livemig take each other where they speak one in common
    ap.add_argument("--version", action="version", version=f"livemig {__version__} ({spoken()})")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mv = sub.add_parser("move", help="move a container or a process tree to another host",
                        usage="livemig move [options] (CTR | --pid PID) HOST",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    mv.add_argument("names", nargs="+", metavar="[CTR] HOST",
                    help="the container's name or ID (unless --pid), then the target as ssh takes it: "
                         "[user@]host or ssh://[user@]host[:port] (~/.ssh/config and /etc/ssh/ssh_config apply)")
    _port_flag(mv)
    mv.add_argument("--pid", type=int, help="move the process tree rooted at PID instead of a container")
    mv.add_argument("--runtime", choices=["podman", "runc", "crun"],
                    help="the container's runtime (default: whichever knows the container)")
    _moving_flags(mv)
    mv.add_argument("--move-address", action="append", metavar="ADDR/PREFIX",
                    help="a service address that moves with the workload: off this host after the freeze, onto "
                         "the target's interface on its subnet before the restore, announced there (gratuitous "
                         "ARP, unsolicited neighbour advertisement); put back here by a rollback. Repeatable")
    mv.add_argument("--shell-job", action="store_true",
                    help="the tree was started from a terminal: refused, as its terminal cannot follow it")
    mv.add_argument("--name", help="the container's name on the target (default: the same name)")
    _report_flags(mv)

    cl = sub.add_parser("clone", help="start running replicas of a podman container on other hosts",
                        usage="livemig clone [options] CTR HOST [HOST...]",
                        description="Checkpoint a running podman container once, leaving it running, and "
                                    "restore replicas of it (same memory, same state) on each HOST. All or "
                                    "nothing: if one replica fails, none is left.",
                        epilog=CLONE_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cl.add_argument("container", metavar="CTR", help="the running podman container's name or ID")
    cl.add_argument("hosts", nargs="+", metavar="HOST",
                    help="where replicas go: [user@]host or ssh://[user@]host[:port], as for move")
    _port_flag(cl)
    cl.add_argument("--name", help="the replicas' name (default CTR-clone); with --count, NAME-1..NAME-N")
    cl.add_argument("--count", type=int, default=1, help="replicas on each host (default 1)")
    cl.add_argument("--keep-name", action="store_true", help="one replica per host, under CTR's own name")
    cl.add_argument("--runtime", choices=["podman"], help="the container's runtime (only podman clones)")
    cl.add_argument("--compression-level", metavar="LEVEL", help="zstd level on the wire, 1 to 19 (default: zstd's, 3)")
    cl.add_argument("--force", action="store_true", help="go on past must-match mismatches, as for move")
    cl.add_argument("--image-root")
    _report_flags(cl)

    dr = sub.add_parser("drain", help="move every workload off this host, several at once (before maintenance)",
                        usage="livemig drain --to HOST[,HOST...] [options]",
                        description="Move every container podman, runc and crun run on this host (or those named "
                                    "with --only), and every process tree named with --pid, to the targets given: "
                                    "each workload's preflight against each target first, then a placement by the "
                                    "targets' free memory and CPUs, then the moves, --parallel at once, smallest "
                                    "first, within one --max-bandwidth budget. A workload no target can take stays, "
                                    "said in one line; one move failing does not stop the others. Interrupted, the "
                                    "moves under way roll back, and `livemig drain` run again goes on. Exit code 0 "
                                    "only if everything asked for is off this host (else 11).",
                        epilog=DRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    dr.add_argument("--to", required=True, metavar="HOST[,HOST...]",
                    help="the targets, as ssh takes them, separated by commas")
    _port_flag(dr)
    dr.add_argument("--only", nargs="+", action="extend", default=[], metavar="NAME",
                    help="only these containers (by name or ID)")
    dr.add_argument("--except", nargs="+", action="extend", default=[], dest="exclude", metavar="NAME",
                    help="every container but these")
    dr.add_argument("--pid", nargs="+", action="extend", default=[], type=int, metavar="PID",
                    help="process trees to move too, each by its root's PID")
    dr.add_argument("--parallel", type=int, metavar="N",
                    help="moves at once, at most (default: one per CPU of this host)")
    dr.add_argument("--order", choices=["smallest", "largest"],
                    help="which move first (default smallest: most workloads are off this host soonest, and it is "
                         "empty no later, as measured)")
    _moving_flags(dr, budget=True)
    _report_flags(dr)

    ck = sub.add_parser("check", help="run the preflight checks against a host, touching nothing",
                        epilog="example:\n  livemig check host-b", formatter_class=argparse.RawDescriptionHelpFormatter)
    ck.add_argument("host", help="the target: [user@]host or ssh://[user@]host[:port], as for move")
    _port_flag(ck)
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
    rc.add_argument("--list", action="store_true",
                    help="only list what recover would settle, and where each move stands: nothing is touched")
    rc.add_argument("--image-root")
    rc.add_argument("--json", action="store_true", help="print what was settled (or listed) as JSON")

    co = sub.add_parser("completion", help="print a shell completion script",
                        epilog="examples:\n  livemig completion bash > /etc/bash_completion.d/livemig\n"
                               "  livemig completion zsh > \"${fpath[1]}/_livemig\"",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    co.add_argument("shell", choices=["bash", "zsh"])

    ag = sub.add_parser("agent", help="the target side, started by `livemig move` over ssh")
    ag.add_argument("--image-root", default="/var/lib/livemig")
    return ap


def _moving_flags(sub: argparse.ArgumentParser, budget: bool = False) -> None:
    """How a move goes: move's flags, which a drain gives each of its moves (budget: --max-bandwidth
    is the drain's, shared among its moves)."""
    sub.add_argument("--mode", choices=[m.value for m in Mode],
                     help="strategy (default auto: hybrid where the kernel tracks dirty pages (soft-dirty) and "
                          "both hosts have userfaultfd; else pre-copy, by page hashes where there is no "
                          "soft-dirty; else stop-and-copy; the plan and the report say which and why)")
    sub.add_argument("--max-downtime", type=float, metavar="SECONDS",
                     help="a promise: the move is refused before the freeze (exit code 10) when its downtime "
                          "would be longer (default: none; pre-copy aims at 0.3 s, and a longer one is told)")
    sub.add_argument("--max-rounds", type=int, help="pre-copy rounds at most (default 8)")
    sub.add_argument("--no-throttle", action="store_true",
                     help="no auto-converge: never slow the workload's CPU when pre-copy does not converge")
    sub.add_argument("--no-fill", action="store_true",
                     help="stop-and-copy writes the pages as image files that the restore reads back: "
                          "slower, but the copy is whole before it runs, and the source's copy is gone "
                          "the moment it does (by default they go into the target's memory, and into "
                          "the copy while it runs, the source's copy waiting, stopped, until then)")
    sub.add_argument("--no-write-protect", action="store_true",
                     help="where the kernel has no soft-dirty, pre-copy by page hashes rather than by "
                          "userfaultfd write-protection: nothing is run in the workload's processes, but "
                          "every round and the final pass read all of its memory")
    sub.add_argument("--no-replay", action="store_true",
                     help="with --tcp-established: what clients send while the workload is frozen is not kept for "
                          "the copy that runs next, and waits for their retransmission (by default it is given "
                          "to that copy as it resumes, and answered then)")
    sub.add_argument("--compression-level", metavar="LEVEL",
                     help="zstd level on the wire, 1 to 19 (default auto: chosen per move from the link's rate "
                          "and this CPU's, on a sample of the workload's memory)")
    sub.add_argument("--max-bandwidth", metavar="RATE",
                     help=("bytes a second all the drain's moves send at most, together: each move under way "
                           "gets an equal share, rewritten as moves start and end" if budget else
                           "bytes a second the move sends at most, over all its streams together: pre-copy, "
                           "the final pages, post-copy (its faults first), image files, bundles")
                     + "; K, M, G are powers of 1024, e.g. 50M or 1G (default: no cap)")
    sub.add_argument("--reconnect-timeout", type=float, metavar="SECONDS",
                     help="once the target's copy runs, how long to reach the target again if the link "
                          "breaks, the copy waiting on its missing pages meanwhile, before that copy is "
                          "given up (default 300)")
    sub.add_argument("--tcp-established", action="store_true",
                     help="move established TCP connections (with --move-address for those of a tree in the "
                          "host's network: its clients keep their connections)")
    sub.add_argument("--file-locks", action="store_true",
                     help="move the file locks the tree holds (flock, fcntl): CRIU's --file-locks on both hosts")
    sub.add_argument("--carry-files-max", metavar="SIZE",
                     help="a process tree's files the target lacks (a log, a pid file) are carried over while it "
                          "is frozen, up to SIZE bytes together (K, M, G; default 64M); more refuse the move "
                          "before the freeze, naming them")
    sub.add_argument("--trial", action="store_true",
                     help="before anything is frozen for the move, the images of a process tree (or a runc "
                          "container) without its pages (a freeze of some 100 ms per GiB) are restored on the "
                          "target in namespaces of their own, stopped, and thrown away: what CRIU's restore "
                          "would trip on there refuses the move with CRIU's reason (--dry-run tries it too, "
                          "unless the workload holds over 64 MiB of shared memory)")
    sub.add_argument("--image-root",
                     help="where private image directories go, on both hosts (default /var/lib/livemig)")
    sub.add_argument("--force", action="store_true",
                     help="go on past must-match mismatches (podman version, network stack, kernel...) "
                          "that can only make the restore fail, which rolls back")
    sub.add_argument("--dry-run", action="store_true",
                     help="run the preflight, measure the link, print the plan (mode and why, expected "
                          "rounds and downtime) and stop: nothing is dumped or changed")


def _port_flag(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("-p", "--port", type=int, help="the target's ssh port (default: the ssh config's, or 22)")
    sub.add_argument("--no-bootstrap", action="store_true",
                     help="run the livemig installed on the target (by default the target runs this one, "
                          "brought over ssh where it is not there yet: it needs only Python 3.11, zstandard, "
                          "xxhash and CRIU)")


def _report_flags(sub: argparse.ArgumentParser) -> None:
    """What a command that reports (move, clone) prints, and how much on failure."""
    sub.add_argument("--json", action="store_true", help="print only the report, as JSON")
    sub.add_argument("-v", "--verbose", "--debug", action="store_true", dest="verbose",
                     help="on failure, also print the lines of CRIU's logs that explain it")
