"""The wheels an offline `pipx install` of livemig needs, for each Python the install is proven
on (tests/test_install.py): this machine's python3 (Debian 12's 3.11) and the lab rootfs's
(trixie's 3.13).

Fetched from PyPI by `.ci/setup` (`python -m tests.lab wheels`), the one step that has the
network; the lab's hosts have none, and a test must not depend on it. Cached in
CACHE/wheels-<key>/cpXY, the key a hash of the requirements (pyproject's dependencies and
build-system), so a changed dependency fetches a new set.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from .hosts import REPO
from .proc import LabError
from .rootfs import CACHE

# The Pythons the install is proven on: Debian 12's, this machine's; trixie's, the lab's hosts'.
PYTHONS = ("3.11", "3.13")
_DONE = ".livemig-wheels-complete"


def requirements() -> list[str]:
    """What a build and an install from the checkout fetch: its dependencies, its build
    backend, and what pipx's shared venv upgrades whatever it has (pip; and setuptools and
    wheel, with Debian 12's pipx 1.1)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [*project["project"]["dependencies"], *project["build-system"]["requires"], "pip", "setuptools", "wheel"]


def path(python: str) -> Path:
    key = hashlib.sha256("\n".join(requirements()).encode()).hexdigest()[:16]
    return CACHE / f"wheels-{key}" / f"cp{python.replace('.', '')}"


def ensure(log=sys.stderr) -> list[Path]:
    """Every Python's wheel directory, fetched where missing."""
    made = []
    for python in PYTHONS:
        dest = path(python)
        if not (dest / _DONE).is_file():
            print(f"lab: fetching the wheels for an offline install on Python {python}", file=log, flush=True)
            tmp = dest.with_name(dest.name + ".fetching")
            shutil.rmtree(tmp, ignore_errors=True)      # a fetch cut short: it starts again whole
            # binary wheels only, for that Python (not this venv's), built for this machine's
            # platform, which the lab's hosts share
            res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                                  "-d", str(tmp), "--only-binary=:all:", "--python-version", python,
                                  *requirements()], check=False, capture_output=True, text=True,
                                 env={**os.environ, "PIP_NO_INPUT": "1"})
            if res.returncode != 0:
                raise LabError(f"pip download for Python {python} failed: {res.stderr.strip()}")
            (tmp / _DONE).write_text("\n".join(requirements()) + "\n")
            tmp.rename(dest)
        made.append(dest)
    return made
