"""An OCI bundle (config.json and the root filesystem) carried to the target.

Like memory, files are pre-copied: the whole tree goes while the container runs;
then, with the container frozen, only what changed since (mtime or ctime) and the
list of what was deleted. tar does the file-system work (owners, modes, xattrs,
links, sparse files); the bytes cross zstd-compressed on a data stream.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CommandFailed
from ..wire import streams

_TAR_OPTIONS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse"]


def listing(root: Path) -> set[str]:
    """Every path under root, relative, without following links: what the target will have."""
    found = set()
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        for name in dirs + files:
            found.add(os.path.normpath(os.path.join(rel, name)))
    return found


def mounts_under(root: Path) -> list[str]:
    """Mount points inside root: a tree with mounts in it is not ours to delete."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(prefix):
                found.append(point)
    return found


async def send(root: Path, writer, level: int = 1, newer_than: float | None = None) -> streams.Meter:
    """tar of root (only files changed after newer_than, when given) onto writer, compressed."""
    argv = ["tar", "-C", str(root), *_TAR_OPTIONS, "-cpf", "-"]
    if newer_than is not None:
        # a second of slack: file times may be coarser than our clock
        argv += [f"--newer=@{int(newer_than) - 1}"]
    return await streams.send_output([*argv, "."], writer, level)


async def receive(reader, root: Path) -> int:
    """Extract the tar stream from reader into root; the raw bytes received."""
    return await streams.receive_into(reader, ["tar", "-C", str(root), *_TAR_OPTIONS, "-xpf", "-"])


def remove_deleted(root: Path, deleted: list[str]) -> None:
    """Remove the paths (relative to root) that the source deleted since the first copy."""
    for rel in sorted(deleted, key=len, reverse=True):   # children before their directory
        path = os.path.normpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not path.startswith(str(root).rstrip("/") + "/"):
            raise CommandFailed(f"refusing to delete {rel!r}: outside the bundle")
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)
        except FileNotFoundError:     # not here either: nothing to delete
            pass
