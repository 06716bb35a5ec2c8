"""The agent that comes along (livemig/source/bootstrap.py): what is packed, and what its two
scripts refuse. The lab proves the rest: a host with no livemig takes a move (tests/test_bootstrap.py)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import livemig
from livemig.source import bootstrap


def test_the_zip_holds_livemig_s_sources_and_nothing_compiled_and_is_the_same_each_time():
    h, data = bootstrap.packed()
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    root = Path(livemig.__file__).parent
    wanted = {f"livemig/{p.relative_to(root).as_posix()}" for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    assert wanted <= set(names) and "livemig/target/agent.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert bootstrap.packed.__wrapped__() == (h, data)      # a hash that names the same bytes every time


def _script(code: str, agents: Path, *argv: str, data: bytes = b"") -> subprocess.CompletedProcess:
    code = code.replace(repr(bootstrap.AGENTS), repr(str(agents)))
    return subprocess.run([sys.executable, "-I", "-c", code, *argv], input=data, capture_output=True, timeout=60,
                          check=False)


def test_a_damaged_zip_is_refused_and_nothing_is_unpacked(tmp_path):
    h, data = bootstrap.packed()
    res = _script(bootstrap.UNPACK, tmp_path / "agents", h, data=data[:-1])
    assert res.returncode == 1 and b"arrived damaged" in res.stderr
    assert not (tmp_path / "agents").exists()


def test_a_place_others_may_write_to_is_refused(tmp_path):
    # /tmp is writable by everyone: what is there could be anyone's
    h, data = bootstrap.packed()
    res = _script(bootstrap.UNPACK, tmp_path / "agents", h, data=data)
    assert res.returncode == 1 and b"is not root's alone" in res.stderr, res.stderr
    (tmp_path / "agents" / h).mkdir(parents=True)
    res = _script(bootstrap.RUN, tmp_path / "agents", h, "agent")
    assert res.returncode == 1 and b"is not root's alone" in res.stderr, res.stderr


def test_run_says_where_this_livemig_is_not_unpacked_yet_and_refuses_a_bad_name(tmp_path):
    res = _script(bootstrap.RUN, tmp_path / "agents", bootstrap.packed()[0], "agent")
    assert res.returncode == bootstrap.UNPACKED_MISSING, res.stderr
    res = _script(bootstrap.RUN, tmp_path / "agents", "../etc", "agent")
    assert res.returncode == 1 and b"not an agent's name" in res.stderr


def test_unpacking_prunes_other_agents_not_run_for_long_and_an_unpacking_cut_short(tmp_path):
    # a place root's alone, as a target's /var/cache/livemig is (tmp_path, under /tmp, is not)
    base = Path(tempfile.mkdtemp(dir="/var/cache", prefix="livemig-test-"))
    try:
        agents = base / "agents"
        agents.mkdir(mode=0o700)
        old, recent, cut_short = agents / ("a" * 64), agents / ("b" * 64), agents / ".unpacking-x"
        for d in (old, recent, cut_short):
            d.mkdir(mode=0o700)
        long_ago = time.time() - 40 * 86400
        for d in (old, cut_short):
            os.utime(d, (long_ago, long_ago))
        h, data = bootstrap.packed()
        res = _script(bootstrap.UNPACK, agents, h, str(30 * 86400.0), data=data)
        assert res.returncode == 0, res.stderr
        assert sorted(p.name for p in agents.iterdir()) == sorted([h, recent.name])
        # and a run marks its agent as used now
        os.utime(agents / h, (long_ago, long_ago))
        _script(bootstrap.RUN, agents, h, "--version")
        assert time.time() - (agents / h).stat().st_mtime < 60
    finally:
        shutil.rmtree(base)
