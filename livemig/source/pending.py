"""`livemig recover --list`: what `livemig recover` would settle on this host, and where each
move stands, read and left as it is (no host is reached, nothing resumed, nothing deleted).

What recover would do with a move past its final dump depends on the target's verdict, which
only asking the target tells: the list says what is known here (the source's copy as it
stands now, whether the move's livemig lives, whether and how long ago the target's copy was
told to run), and recover asks the rest.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from ..errors import LivemigError
from ..options import Options
from ..recoverreport import Pending
from ..runtimes.held import HeldCopy
from . import throttle
from .recovery import RECORD, _scan


def _at(path: Path) -> str:
    return datetime.fromtimestamp(os.stat(path).st_mtime, UTC).isoformat(timespec="milliseconds")


async def pending(options: Options) -> list[Pending]:
    found = []
    for path in sorted(Path(options.image_root).glob(f"*-source/{throttle.FILE}")):
        what = throttle.left(path.parent)
        if what is not None and not (path.parent / RECORD).exists():
            found.append(Pending(path.parent.name.removesuffix("-source"), "", what, "pre-copy",
                                 "running, slowed by auto-converge until recover lifts it", False, 0.0, _at(path)))
    for work, rec in _scan(options.image_root):
        mid = work.name.removesuffix("-source")
        if isinstance(rec, LivemigError):
            found.append(Pending(mid, "", "a workload", "unknown", rec.message, False, 0.0, _at(work / RECORD)))
            continue
        stage = ("post-copy or a fill" if rec.lazy else
                 "stop-and-copy, the source's copy given up" if rec.committed else "stop-and-copy")
        here = HeldCopy.told(await rec.source_copy.standing())
        found.append(Pending(mid, rec.target, rec.source_copy.what, stage, here, rec.coordinator_alive(),
                             rec.target_ran_for(), _at(work / RECORD)))
    return found
