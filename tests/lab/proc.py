"""The one way the lab runs commands on the machine: argument lists, stderr kept."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says what and why."""


def run(argv: Sequence[object], *, check: bool = True, input: bytes | None = None,
        timeout: float | None = 120) -> subprocess.CompletedProcess:
    """Run argv with its output captured; on failure raise LabError with its stderr."""
    args = [str(a) for a in argv]
    try:
        res = subprocess.run(args, input=input, timeout=timeout,
                             capture_output=True, check=False)
    except FileNotFoundError as e:
        raise LabError(f"{args[0]}: not installed ({e.strerror})") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(args[:3])}...: timed out after {timeout} s") from None
    if check and res.returncode != 0:
        err = (res.stderr or res.stdout or b"").decode(errors="replace").strip()
        tail = "\n".join(err.splitlines()[-15:])
        raise LabError(f"{' '.join(args[:4])}... exited {res.returncode}" + (f":\n{tail}" if tail else ""))
    return res


def out(argv: Sequence[object], **kw) -> str:
    return run(argv, **kw).stdout.decode(errors="replace")
