"""Shell completion scripts, made from the command line's own parser by shtab, so that they
never drift from it; hosts and containers complete from what this machine knows."""

from __future__ import annotations

import argparse

# What a HOST (or a container) may be: ~/.ssh/config's hosts, the known hostnames, and
# the containers runc, crun and podman run here. Each function gets the word so far.
PREAMBLE = {
    "bash": r"""
_livemig_hosts() {
  { compgen -A hostname -- "$1"
    awk 'tolower($1) == "host" { for (i = 2; i <= NF; i++) if ($i !~ /[*?!]/) print $i }' \
        ~/.ssh/config 2>/dev/null | grep -- "^$1"; } | sort -u
}
_livemig_workloads() {
  { runc list -q; crun list -q; podman ps --format '{{.Names}}'; } 2>/dev/null | grep -- "^$1"
  _livemig_hosts "$1"
}
""",
}
HOSTS = {"bash": "_livemig_hosts", "zsh": "_hosts"}
WORKLOADS = {"bash": "_livemig_workloads", "zsh": "_hosts"}


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    # only the completion command needs it
    import shtab
    for action in _actions(parser):
        if action.dest in ("host", "hosts"):
            action.complete = HOSTS
        elif action.dest == "names":      # move's [CTR] HOST
            action.complete = WORKLOADS
    return shtab.complete(parser, shell=shell, preamble=PREAMBLE.get(shell, ""))


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
