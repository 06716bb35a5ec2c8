"""livemig installed as the README says, in one step with pipx, as root on a stock system, on two
distributions' Pythons (issue 28): Debian 12's python3 (3.11) on this machine, and trixie's (3.13)
on the lab's host a. Offline, from the wheels `.ci/setup` fetched (tests/lab/wheels.py): a test
has no network. The trixie install then moves workloads to b, a host without livemig (its agent
comes along), named both ssh ways; the Debian 12 install, run in a's network, brings its agent to b
in `livemig check`."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from livemig.version import __version__
from tests.lab import wheels
from tests.lab.hosts import LAB_DIR, REPO

pytestmark = pytest.mark.lab

# what a build of the package reads: pip builds in the tree it is given, so a copy is built
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "livemig")


def _wheels(python: str) -> Path:
    found = wheels.path(python)
    if not found.is_dir():
        pytest.fail(f"no wheels for Python {python} at {found}: run .ci/setup (python -m tests.lab wheels)")
    return found


def _copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _offline(wheels: Path | str) -> dict[str, str]:
    """pip told to take the wheels from a directory, in every pip pipx runs (its own venvs' and
    the shared one it upgrades: pipx 1.7 passes --pip-args to the first only)."""
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}


def _run(argv: list, env: dict) -> subprocess.CompletedProcess:
    # run from HOME, not the checkout, which `python -c` would put first on its path
    return subprocess.run([str(a) for a in argv], env=env, cwd=env["HOME"], capture_output=True, timeout=300,
                          check=False)


def test_installed_on_debian_12_s_python_it_reaches_a_trixie_host_and_brings_its_agent(lab, tmp_path,
                                                                                         b_without_livemig):
    src = _copy_sources(tmp_path / "livemig")
    home = tmp_path / "home"                    # root's ssh files for the lab, not this machine's
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    shutil.copy(LAB_DIR / "keys/id_ed25519", home / ".ssh/id_ed25519")
    (home / ".ssh/known_hosts").write_text(lab.text("a", ["cat", "/root/.ssh/known_hosts"]))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PIPX_HOME": str(tmp_path / "pipx"),
           "PIPX_BIN_DIR": str(tmp_path / "bin"), **_offline(_wheels("3.11"))}
    res = _run(["pipx", "install", src], env)      # the README's one step
    assert res.returncode == 0 and b"ERROR" not in res.stderr and b"Traceback" not in res.stderr, res.stderr.decode()
    livemig = tmp_path / "bin/livemig"
    python = tmp_path / "pipx/venvs/livemig/bin/python"
    assert python.resolve() == Path("/usr/bin/python3.11").resolve()     # Debian 12's own Python
    res = _run([livemig, "--version"], env)
    assert res.returncode == 0 and res.stdout.decode().startswith(f"livemig {__version__} "), res
    res = _run([python, "-c", "import livemig; print(livemig.__file__)"], env)
    assert str(tmp_path / "pipx/venvs/livemig") in res.stdout.decode(), res     # the installed one, not the checkout
    assert _run([python, "-m", "livemig", "--version"], env).stdout == _run([livemig, "--version"], env).stdout

    # from a's network (this machine has no CRIU: the rows about this host fail, b's pass)
    a = next(h for h in lab.hosts if h.name == "a")
    res = _run(["nsenter", "--target", a.pid, "--net", "--", livemig, "check", "--json", f"root@{lab.address('b')}"],
               env)      # by its address: this machine's /etc/hosts does not name the lab's hosts
    found = json.loads(res.stdout)
    assert "checks" in found, (found, res.stderr.decode())
    rows = {c["name"]: c for c in found["checks"]}
    assert res.returncode == 3 and not found["ok"], found
    assert rows["criu on target"]["ok"] and rows["architecture"]["ok"], rows
    assert [n for n, c in rows.items() if not c["ok"]] == ["criu here"], rows
    assert lab.run("b", ["sh", "-c", "ls /var/cache/livemig/agents/*/livemig"]).returncode == 0   # brought


def test_installed_on_trixie_s_python_it_moves_workloads_to_a_host_without_livemig(lab, tmp_path,
                                                                                   b_without_livemig):
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as tar:
        tar.add(_copy_sources(tmp_path / "livemig"), "livemig")
        tar.add(_wheels("3.13"), "wheels")
    lab.run("a", ["mkdir", "-m", "700", "/root/install"])
    lab.run("a", ["tar", "-x", "-C", "/root/install"], input=packed.getvalue())
    # the README's one step; its commands go to /opt/pipx-bin, not /usr/local/bin, where the
    # lab's own livemig (the checkout's) already is
    offline = [f"{k}={v}" for k, v in _offline("/root/install/wheels").items()]
    res = lab.run("a", ["env", "PIPX_HOME=/opt/pipx", "PIPX_BIN_DIR=/opt/pipx-bin", *offline,
                        "pipx", "install", "/root/install/livemig"], check=False, timeout=300)
    assert res.returncode == 0 and b"ERROR" not in res.stderr and b"Traceback" not in res.stderr, res.stderr.decode()
    livemig = "/opt/pipx-bin/livemig"
    assert lab.text("a", ["readlink", "-f", "/opt/pipx/venvs/livemig/bin/python"]).startswith("/usr/bin/python3.13")
    found = lab.text("a", ["/opt/pipx/venvs/livemig/bin/python", "-c", "import livemig; print(livemig.__file__)"])
    assert found.startswith("/opt/pipx/venvs/livemig/"), found

    works = [lab.start_workload("a", mib=32, dirty_mibps=2, pid=pid, port=port)
             for pid, port in ((4806, 7886), (4812, 7892))]
    try:
        for work, named in zip(works, ("root@b", "ssh://root@b:22"), strict=True):
            before = work.query("a")
            res = lab.run("a", [livemig, "move", "--json", "--pid", str(work.pid), named], check=False, timeout=600)
            assert res.returncode == 0, res.stderr.decode()
            report = json.loads(res.stdout)
            assert (report["outcome"], report["target"], report["livemig"]) == ("moved", named, __version__)
            after = work.query("b", wait=10)
            assert after["host"] == "b" and after["counter"] > before["counter"]
            assert work.query("b", "verify")["bad_pages"] == 0
            assert lab.run("a", ["kill", "-0", str(work.pid)], check=False).returncode != 0    # one copy only
        assert lab.leftovers() == {"a": ([], []), "b": ([], [])}
    finally:
        for work in works:
            for h in ("a", "b"):
                lab.run(h, ["kill", str(work.pid)], check=False)
        lab.run("a", ["rm", "-rf", "/root/install", "/opt/pipx", "/opt/pipx-bin"], check=False)
