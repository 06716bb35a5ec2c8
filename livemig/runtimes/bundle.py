"""An OCI bundle (config.json and the root filesystem) carried to the target.

Like memory, files are pre-copied: the whole tree goes while the container runs;
then, with the container frozen, only what changed since (mtime or ctime) and the
list of what was deleted. tar does the file-system work (owners, modes, xattrs,
links, sparse files); the bytes cross zstd-compressed on a data stream.

The container owns the tree's contents, and changes them while the first pass reads
them: what was deleted is what that pass's tar says it archived (its index) less what
is there once the container stopped, never a listing made before or after it. The
target removes those paths beneath the bundle through directory descriptors, never
following a link (a directory the container swapped for a link to /etc names
/etc), and before it extracts the second pass: a directory replaced by a link or a
file must be gone before tar can put that in its place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
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


def mount_sources(root: Path) -> list[str]:
    """The host paths the bundle's config.json binds into the container, outside the bundle
    (which is carried whole): its volumes, which the target must have."""
    try:
        mounts = json.loads((root / "config.json").read_text()).get("mounts") or []
    except (OSError, ValueError):     # no config to read: the runtime's own restore says why
        return []
    inside = str(root).rstrip("/") + "/"
    return sorted({m["source"] for m in mounts
                   if (m.get("type") == "bind" or {"bind", "rbind"} & set(m.get("options") or []))
                   and str(m.get("source", "")).startswith("/") and not m["source"].startswith(inside)})


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


async def send(root: Path, writer, level: int = 1, newer_than: float | None = None,
               index: Path | None = None, running: bool = False) -> streams.Meter:
    """tar of root (only files changed after newer_than, when given) onto writer, compressed;
    the names it archived into the file index, when given (read them with archived()).
    running: the container runs, and may change a file while tar reads it. tar then says
    so and exits 1 ("some files differ"): the file is archived all the same, and the pass
    made once it is frozen sends it again (its time is past newer_than), so that is no
    failure here. Frozen, every file must come whole: exit 0 only."""
    argv = ["tar", "-C", str(root), *_TAR_OPTIONS, "-cpf", "-"]
    if running:
        argv += ["--warning=no-file-changed"]      # expected, and said in the docstring
    if newer_than is not None:
        # a second of slack: file times may be coarser than our clock
        argv += [f"--newer=@{int(newer_than) - 1}"]
    if index is not None:
        # a file, not stderr: a long listing would fill that pipe, unread until tar exits
        argv += ["--verbose", f"--index-file={index}", "--quoting-style=escape"]
    return await streams.send_output([*argv, "."], writer, level, ok=(0, 1) if running else (0,))


def archived(index: Path) -> set[str]:
    """The paths a send() archived, relative to its root, as listing() names them; the
    index goes (it lists the container's file names)."""
    try:
        lines = index.read_bytes().split(b"\n")
    finally:
        index.unlink(missing_ok=True)
    names = set()
    for line in lines:
        name = os.fsdecode(_unquoted(line)).removeprefix("./").rstrip("/")   # dirs end in /
        if name and name != ".":
            names.add(name)
    return names


_ESCAPE = re.compile(rb"\\([0-7]{3}|[abfnrtv\\])")
_LETTERS = dict(zip(b"abfnrtv\\", b"\a\b\f\n\r\t\v\\", strict=True))


def _unquoted(line: bytes) -> bytes:
    """A name as tar's escape quoting wrote it: backslash and a letter, or three octal digits."""
    def one(m: re.Match[bytes]) -> bytes:
        code = m.group(1)
        return bytes([int(code, 8) & 0xFF if len(code) == 3 else _LETTERS[code[0]]])
    return _ESCAPE.sub(one, line)


async def receive(reader, root: Path, deleted: list[str] | None = None) -> int:
    """The paths deleted (relative to root) removed, then the tar stream from reader
    extracted into root; the raw bytes received."""
    remove_deleted(root, deleted or [])
    return await streams.receive_into(reader, ["tar", "-C", str(root), *_TAR_OPTIONS, "-xpf", "-"])


def remove_deleted(root: Path, deleted: list[str]) -> None:
    """Remove the paths (relative to root) that the source deleted since the first copy:
    each beneath root, reached through directories only (none is refused once one went)."""
    paths = [_checked(rel) for rel in deleted]
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for parts in sorted(paths, key=len, reverse=True):    # children before their directory
            _remove_beneath(top, parts)
    finally:
        os.close(top)


def _checked(rel: str) -> list[str]:
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\0" in rel:
        raise CommandFailed(f"refusing to delete {rel!r}: not a plain path inside the bundle")
    return parts


def _remove_beneath(top: int, parts: list[str]) -> None:
    """parts[-1] in the directory parts[:-1] under the directory top, if every step there is
    a directory: a link on the way (or nothing) means the path as sent is not here."""
    fds: list[int] = []
    try:
        at = top
        for name in parts[:-1]:
            try:
                at = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return      # no directory there, or a link: nothing of the bundle's beneath
                raise
            fds.append(at)
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=at, follow_symlinks=False)
        except FileNotFoundError:
            return      # not here either: nothing to delete
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=at)     # a file, or a link (itself, not what it names)
            return
        try:
            os.rmdir(name, dir_fd=at)
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            # gone at the source with all it held: what it still holds here is stale
            # (rmtree walks by descriptors too, following no link)
            shutil.rmtree(name, dir_fd=at)
    finally:
        for fd in fds:
            os.close(fd)
