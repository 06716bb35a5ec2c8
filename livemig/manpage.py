"""livemig(1), written from the command line's own parser (arguments.py), so that it never
drifts from it: `python -m livemig.manpage > livemig.1`. docs/livemig.1 is its output, and a
unit test checks that it still is."""

from __future__ import annotations

import argparse
import sys

from .arguments import build_parser
from .config import SETTINGS
from .errors import EXIT_CODES_SAID

DATE = "2026-12"     # the page's date: it changes with what it says, not with each build


def _roff(text: str) -> str:
    """Plain text made safe for roff: a backslash doubled, a line starting with . or ' escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in (".", "'") else line for line in text.splitlines())


def _option(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
        takes = "" if action.nargs == 0 else f" \\fI{_roff(str(action.metavar or action.dest.upper()))}\\fR"
        return names + takes
    return f"\\fI{_roff(str(action.metavar or action.dest))}\\fR"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return _roff(text)


def _commands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            said = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (sub, said.get(name, "")) for name, sub in action.choices.items()}
    return {}


def page(parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser()
    out = [f'.TH LIVEMIG 1 "{DATE}" "livemig" "User Commands"',
           ".SH NAME", "livemig \\- " + _roff(parser.description or ""),
           ".SH SYNOPSIS", "\\fBlivemig\\fR \\fICOMMAND\\fR [\\fIoptions\\fR] ...",
           ".SH DESCRIPTION",
           _roff("A move freezes the workload only for its switchover: pre-copy rounds, post-copy or "
                 "stop-and-copy, as the hosts allow (--mode). A move that fails leaves the workload running "
                 "on the source; `livemig recover` settles one its livemig could not finish. Targets are "
                 "named as ssh names them: [user@]host or ssh://[user@]host[:port]."),
           ".SH COMMANDS"]
    for name, (sub, said) in _commands(parser).items():
        if name == "agent":
            continue     # started by livemig on the target, never by hand
        out += [f".SS {_roff(name)}", _roff(said), ".PP", "Usage: " + _roff(sub.format_usage().strip()
                                                                             .removeprefix("usage: "))]
        if sub.description:
            out += [".PP", _roff(sub.description)]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            out += [".TP", _option(action), _help(action)]
        if sub.epilog:
            out += [".PP", ".nf", _roff(sub.epilog.strip()), ".fi"]
    out += [".SH EXIT STATUS"]
    for code, said in EXIT_CODES_SAID.items():
        out += [".TP", f"\\fB{int(code)}\\fR", _roff(said)]
    out += [".SH ENVIRONMENT", ".TP", "\\fBLIVEMIG_\\fINAME\\fR",
            _roff("each setting below, over the config file's and under the flags': " + ", ".join(
                f"LIVEMIG_{k.upper()} ({what})" for k, (_, what) in SETTINGS.items()) + ".")]
    out += [".SH FILES", ".TP", "\\fI~/.config/livemig/config.toml\\fR",
            _roff("the settings (`livemig config` prints them, where each comes from)."),
            ".TP", "\\fI/var/lib/livemig\\fR",
            _roff("the image root (--image-root), on both hosts: private work directories (0700), deleted "
                  "after each move, and the CRIU logs of the last failed moves (logs/)."),
            ".TP", ("\\fI~/.ssh/config\\fR, \\fI/etc/ssh/ssh_config\\fR, \\fI~/.ssh/known_hosts\\fR, "
                    "\\fI/etc/ssh/ssh_known_hosts\\fR"),
            _roff("how targets are reached; a host key not known there is refused.")]
    out += [".SH SEE ALSO", "\\fBcriu\\fR(8), \\fBssh_config\\fR(5), \\fBrunc\\fR(8), \\fBpodman\\-container\\-checkpoint\\fR(1)"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page())
