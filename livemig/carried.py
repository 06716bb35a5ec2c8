"""Files only the source has, carried to the target for the restore (issue 35).

CRIU's restore opens a tree's files by their path (host.reopened_files), and one the target
lacks failed the move after the freeze. The preflight finds them; the small ones (at most
Options.carry_files_max together) are carried instead of refusing the move. Both halves are
here, with the manifest between them:

- the source packs them (pack) while the tree is frozen, so that each is what the images
  say it is (CRIU checks the size of a file not opened to append): copies numbered 0, 1, ...
  in an image directory of their own, and MANIFEST naming each one's path, mode, owner and
  times; that directory crosses with the images;
- the target places them (place) before CRIU's restore: each where it was, never over a
  file it has (O_EXCL), the directories on the way made if missing; what it placed goes
  again (remove) when the move is undone. Once the copy runs, they are its files.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import LivemigError, Phase

MANIFEST = "carried.json"
# never written there: the kernel's own (a file CRIU opens there is never one a move makes)
_NEVER = ("/proc/", "/sys/")


@dataclass
class Carried:
    path: str
    kind: str            # "file" or "dir" (a working directory the target lacks)
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0


def named(paths: list[str], most: int = 5) -> str:
    """paths as a line says them: the first few, and how many more."""
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(paths[:most]) + more


def told(paths: list[str], total: int) -> str:
    return (f"the target lacks {named(paths)}: carried there while the workload is frozen "
            f"({total} bytes), before its restore opens them")


def sizes(paths: list[str]) -> dict[str, int]:
    """Each path's size here (a directory: 0); a path gone meanwhile is left out."""
    out = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:     # gone since the preflight read it: nothing of it to carry
            continue
        out[path] = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return out


def pack(paths: list[str], into: Path) -> int:
    """Copies of paths in into, with the manifest: the bytes they hold."""
    into.mkdir(mode=0o700)
    entries, total = [], 0
    for i, path in enumerate(paths):
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            entries.append(Carried(path, "dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns))
            continue
        shutil.copyfile(path, into / str(i))
        entries.append(Carried(path, "file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                               st.st_size))
        total += st.st_size
    (into / MANIFEST).write_text(json.dumps([asdict(e) for e in entries]))
    return total


def place(d: Path) -> list[str]:
    """What the manifest in d names, made where it says: the paths made (directories on the
    way too), in the order made. Never over what is there: a path there already fails the
    restore, with what was made until then taken away again."""
    made: list[str] = []
    try:
        for i, raw in enumerate(json.loads((d / MANIFEST).read_text())):
            e = Carried(**raw)
            path = os.path.normpath(e.path)
            if not path.startswith("/") or path != e.path or path.startswith(_NEVER):
                raise LivemigError(f"a carried file's path is not one to write: {e.path!r}", phase=Phase.RESTORE)
            _make_parents(path, made)
            if e.kind == "dir":
                os.mkdir(path, e.mode)
                made.append(path)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                made.append(path)
                with os.fdopen(fd, "wb") as out, open(d / str(i), "rb") as src:
                    shutil.copyfileobj(src, out)
            os.chown(path, e.uid, e.gid, follow_symlinks=False)
            os.chmod(path, e.mode)
            os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
    except (OSError, ValueError, TypeError) as e:
        remove(made)
        raise LivemigError(f"cannot place the files carried from the source: {e}", phase=Phase.RESTORE) from None
    except LivemigError:
        remove(made)
        raise
    return made


def _make_parents(path: str, made: list[str]) -> None:
    """The directories on the way to path that are missing, made (root's, 0755), each noted
    in made as it is: one that fails leaves those before it to be taken away."""
    missing = []
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for p in reversed(missing):
        os.mkdir(p, 0o755)
        made.append(p)


def remove(made: list[str]) -> None:
    """What place made goes again, last made first (a directory only if empty)."""
    for path in reversed(made):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError:     # gone already, or a directory something else put files in since: left
            continue
