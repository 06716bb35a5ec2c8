"""The image root is livemig's alone: a directory it may make private and sweep. One that
is not (world-writable, another user's, through a symlink, with a space, too long for the
sockets bound under it, or a directory the host uses for other things) is refused in one
line, before anything is made, changed or swept (workdirs.check_root)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from livemig import workdirs
from livemig.errors import ExitCode, PreflightError


@pytest.fixture
def base():
    """A directory of root's, 0755, on a path short enough for the sockets (tmp_path's is not)."""
    d = Path(tempfile.mkdtemp(prefix="lm-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    os.chmod(d, 0o700)
    shutil.rmtree(d)


def livemigs_own(root: Path) -> Path:
    """A root as livemig leaves it: work directories (held or not), logs, a verdict."""
    root.mkdir(mode=0o700)
    (root / "20261204-213449-0123abcd-source").mkdir(mode=0o700)
    (root / "20261204-213449-0123abcd-source" / workdirs.LOCK).touch()
    (root / "20261204-213450-0123abce").mkdir(mode=0o700)
    (root / "logs").mkdir(mode=0o755)
    (root / "20261204-213449-0123abcd.verdict").write_text("killed\n")
    return root


def test_a_root_of_livemigs_own_passes(base):
    workdirs.check_root(str(livemigs_own(base / "livemig")))
    workdirs.check_root(str(base / "not-yet"))      # made later, 0700, by livemig, in root's directory
    workdirs.check_root(str(base))                  # empty, 0755


def _refused(root: str, said: str, **kw) -> None:
    with pytest.raises(PreflightError, match=said) as e:
        workdirs.check_root(root, **kw)
    assert e.value.exit_code == ExitCode.PREFLIGHT and "\n" not in str(e.value)


def test_a_root_others_may_write_in_is_refused(base):
    os.chmod(base, 0o1777)          # /tmp's shape: anyone could make the work directory, or its hook
    _refused(str(base), "others may write")
    os.chmod(base, 0o775)
    _refused(str(base), "others may write")
    # in a sticky directory (/tmp) a root that does not exist yet may be made by anyone first
    os.chmod(base, 0o1777)
    _refused(str(base / "livemig"), "others may write")
    (base / "livemig").mkdir(mode=0o700)
    workdirs.check_root(str(base / "livemig"))     # once there, root's, nobody else can rename it


def test_a_root_not_roots_is_refused(base):
    os.chown(base, 65534, 65534)
    _refused(str(base), "not root's")
    _refused(str(base / "below"), "not root's")


def test_a_root_through_a_symlink_is_refused(base):
    (base / "real").mkdir(mode=0o700)
    (base / "link").symlink_to(base / "real")
    _refused(str(base / "link"), "symlink")
    _refused(str(base / "link" / "livemig"), "symlink")


@pytest.mark.parametrize("root, said", [
    ("relative/livemig", "absolute"),
    ("/var/lib/../lib/livemig", "absolute"),
    ("/", "absolute"),
    ("/var/lib/live mig", "space"),
    ("/var/lib/live\tmig", "space"),
    ("/var/lib/live\x1bmig", "control"),
    ("/var/lib/" + "x" * 60, "too long"),
])
def test_a_root_that_is_no_plain_short_path_is_refused(root, said):
    _refused(root, said)


def test_a_long_root_is_fine_where_no_socket_is_bound_under_it(base):
    deep = base / ("x" * 60)
    deep.mkdir(mode=0o700)
    _refused(str(deep), "too long")
    workdirs.check_root(str(deep), sockets=False)       # `livemig recover` binds none


def test_a_directory_the_host_uses_for_other_things_is_refused(base):
    (base / "alice").mkdir(mode=0o755)          # /home's shape
    os.chown(base / "alice", 1000, 1000)
    _refused(str(base), "holds alice")
    os.chown(base / "alice", 0, 0)              # /usr's: root's, but no work directory of livemig's
    _refused(str(base), "holds alice")
    (base / "alice").rmdir()
    (base / "data").symlink_to("/etc")
    _refused(str(base), "holds data")


# --- the commands refuse it before they touch it ---------------------------------------------
def _livemig(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livemig", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_move_refuses_a_world_writable_root_and_leaves_it_as_it_was(base):
    os.chmod(base, 0o1777)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        res = _livemig("move", "--pid", str(sleeper.pid), "--image-root", str(base), "nowhere.invalid")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert res.returncode == ExitCode.PREFLIGHT, res.stderr
    assert "image root" in res.stderr and "Traceback" not in res.stderr
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o1777 and list(base.iterdir()) == []


def test_recover_refuses_a_world_writable_root_and_sweeps_nothing_in_it(base):
    os.chmod(base, 0o1777)
    planted = base / "someone-elses"        # another user's directory, a lock file planted in it
    planted.mkdir(mode=0o700)
    (planted / workdirs.LOCK).touch()
    (planted / "data").write_text("theirs")
    res = _livemig("recover", "--image-root", str(base))
    assert res.returncode == ExitCode.PREFLIGHT, res.stdout + res.stderr
    assert "others may write" in res.stderr and (planted / "data").exists()
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o1777
