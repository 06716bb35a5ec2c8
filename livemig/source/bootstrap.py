"""The agent comes along: the target runs the coordinator's own livemig, brought over the ssh
connection (as Ansible and mitogen bring their modules), whatever is installed there or not.
So two hosts never disagree on the wire protocol, and a host with no livemig takes a move: it
needs Python 3.11 or later, the agent's two libraries (zstandard, xxhash) and CRIU.

What goes: livemig's package as it is imported here (its .py files, nothing compiled), as a
zip whose SHA-256 names it. The target keeps it unpacked under AGENTS/<hash> (root's alone,
0700), so a move after the first finds it there and sends nothing: the agent is started by
RUN, which exits UNPACKED_MISSING where that directory is not there yet; the coordinator then
sends the zip to UNPACK (on stdin, checked against its hash, unpacked beside, renamed into
place) and starts the agent again. Another livemig's agent not run for WAITS.agents_kept_unused
goes as one is brought. `--no-bootstrap` (Options.bootstrap False) runs the
installed `livemig agent` instead (Options.agent_command).
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from pathlib import Path

import livemig

from ..options import WAITS

AGENTS = "/var/cache/livemig/agents"    # on the target: root's, 0700, one directory per livemig
UNPACKED_MISSING = 75     # RUN's exit status where this livemig is not unpacked there yet (EX_TEMPFAIL)

# Both run as `python3 -I -c CODE HASH ...` on the target: isolated (no PYTHON* variables, no
# user site, not the directory it runs in on sys.path), so that nothing there stands in for ours.
_TRUSTED = f"""
import os, stat, sys
def trusted(path):
    # every directory from / down to path: root's and writable by nobody else
    p = path
    while True:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            sys.exit("livemig: " + p + " is not root's alone: the agent is not run from there")
        if p == "/":
            return
        p = os.path.dirname(p)
if sys.version_info < (3, 11):
    sys.exit("livemig: the agent needs Python 3.11 or later; this host's python3 is " + sys.version.split()[0])
h = sys.argv[1]
if not h.isalnum():
    sys.exit("livemig: not an agent's name: " + h)
home = os.path.join({AGENTS!r}, h)
"""

# Its first line names it in `ps` (and to `pkill -f "livemig agent"`), as an installed one is named.
RUN = "# livemig agent, brought along (livemig/source/bootstrap.py)" + _TRUSTED + f"""
if not os.path.isdir(home):
    sys.exit({UNPACKED_MISSING})
trusted(home)
os.utime(home)      # last run now: UNPACK prunes those not run for long
for lib, pkg in (("zstandard", "python3-zstandard"), ("xxhash", "python3-xxhash")):
    try:
        __import__(lib)
    except ImportError:
        sys.exit("livemig: the agent needs the Python module " + lib + " on this host (Debian: apt install " + pkg + ")")
sys.path.insert(0, home)
del sys.argv[1]
from livemig.cli import main
sys.exit(main(sys.argv[1:]))
"""

UNPACK = _TRUSTED + """
import hashlib, io, tempfile, zipfile
data = sys.stdin.buffer.read()
if hashlib.sha256(data).hexdigest() != h:
    sys.exit("livemig: the agent's zip arrived damaged")
parent = os.path.dirname(home)
os.makedirs(parent, mode=0o700, exist_ok=True)
trusted(parent)
if not os.path.isdir(home):
    tmp = tempfile.mkdtemp(dir=parent, prefix=".unpacking-")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in z.namelist():
            if name.startswith("/") or ".." in name.split("/"):
                sys.exit("livemig: the agent's zip names a path outside it: " + name)
        z.extractall(tmp)
    try:
        os.rename(tmp, home)
    except OSError:
        if not os.path.isdir(home):
            raise
        # another session unpacked it first: the same bytes (its name is their hash)
        import shutil
        shutil.rmtree(tmp)
# the other livemigs brought here and not run for long go (RUN marks each run), and what an
# unpacking cut short left: one agent directory a livemig version, else they pile up
import shutil, time
for name in os.listdir(parent):
    old = os.path.join(parent, name)
    unused = time.time() - os.lstat(old).st_mtime
    if name != h and (name.isalnum() and unused > float(sys.argv[2]) or name.startswith(".unpacking-") and unused > 86400):
        shutil.rmtree(old, ignore_errors=True)
"""


@functools.cache
def packed() -> tuple[str, bytes]:
    """livemig's package as imported here, zipped the same way every time: (its hash, the zip)."""
    root = Path(livemig.__file__).parent
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".json", ".typed"):
                info = zipfile.ZipInfo(f"livemig/{path.relative_to(root).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o600 << 16
                z.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    data = out.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def agent_argv(python: str, image_root: str) -> list[str]:
    """The agent, run from the unpacked copy of this livemig."""
    return [python, "-I", "-c", RUN, packed()[0], "agent", "--image-root", image_root]


def unpack_argv(python: str) -> list[str]:
    return [python, "-I", "-c", UNPACK, packed()[0], str(WAITS.agents_kept_unused)]
