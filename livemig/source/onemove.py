"""One move of a drain, in a process of its own (drain.py starts it with
`python -m livemig.source.onemove`): the request on stdin, as JSON ({"what", "target",
"options": Options.to_dict(), "parent": the drain's PID, "key": the workload's in the
drain's record}); on stdout exactly what `livemig move --json` prints, and its exit code.
Once it moved, the drain's record says so (drain.DONE), written here so that a drain killed
meanwhile still knows. Not a command users run: the drain's way of running `livemig move`
with every option it was given, those no flag sets too.

It dies with its drain: the drain's death (killed outright) sends it a SIGINT, which rolls
its move back as Ctrl-C does (or, past its commit, lets it end as moved); a drain run again
finds the workload here, or on its target."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys

from .. import cli, contract
from ..errors import ExitCode
from ..options import Options

PR_SET_PDEATHSIG = 1


def main() -> int:
    asked = json.load(sys.stdin)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)
        if os.getppid() != asked["parent"]:
            raise KeyboardInterrupt      # it died before the line above: as if it had died after
        options = Options.from_dict(asked["options"])
        # this side only, as the CLI's commands load theirs (cli.py's doc)
        from .drain import remember
        from .migration import migrate
        code = cli.reported(argparse.Namespace(json=True, verbose=False), "move",
                            lambda: migrate(asked["what"], asked["target"], options), None, cli.undone)
        if code == ExitCode.MOVED:
            remember(options.image_root, asked["key"], asked["target"])
        return code
    except KeyboardInterrupt:      # before the move began (run() catches those after): nothing was touched
        print(contract.failure("move", "interrupted before it began", "", ExitCode.INTERRUPTED))
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
