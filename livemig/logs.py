"""CRIU's logs of a move that failed, kept when its images go.

A failed move's work directory is deleted (its memory images hold secrets), but CRIU's
logs are what explains the failure: each side copies them to <image root>/logs/<ID>-<side>,
private like the images (they name files, sockets and addresses), and the newest SIZES.logs_kept
failures' logs stay. `livemig move -v` prints their error lines.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import criu
from .options import SIZES


def keep(work: Path, image_root: str, name: str) -> Path | None:
    """Copy every CRIU log under work into <image_root>/logs/<name>; None if there was none,
    or if they cannot be kept (a full disk: the failure being told may be just that)."""
    try:
        return _keep(work, Path(image_root) / "logs", name)
    except OSError:     # see above: the failure is told all the same, without its logs
        return None


def _keep(work: Path, root: Path, name: str) -> Path | None:
    found = sorted(p for p in work.rglob("*.log") if p.is_file() and not p.is_symlink()) if work.is_dir() else []
    if not found:
        return None
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest = root / name
    dest.mkdir(mode=0o700, exist_ok=True)
    for log in found:
        # pre-1/dump.log and final/dump.log both matter: the directory goes into the name
        rel = log.relative_to(work)
        target = dest / "-".join(rel.parts)
        shutil.copyfile(log, target)
        os.chmod(target, 0o600)
    _prune(root)
    return dest


def _prune(root: Path) -> None:
    kept = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in kept[SIZES.logs_kept:]:
        shutil.rmtree(old, ignore_errors=True)     # what stays of it goes at the next prune


def excerpt(directory: Path, per_log: int = 5) -> list[str]:
    """The error lines of each kept log that has any, as `file: line`, cause first."""
    out = []
    for log in sorted(directory.glob("*.log")):
        for line in criu.log_errors(log.read_text(errors="replace"), limit=per_log):
            out.append(f"{log.name}: {line}")
    return out
