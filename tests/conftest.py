"""Fixtures: a fresh lab per test module (torn down after it), for tests marked `lab`."""

from __future__ import annotations

import os

import pytest

from tests.lab import Lab


@pytest.fixture(scope="module")
def lab():
    # A lab that cannot start fails the tests that need it; it is never a skip.
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (namespaces, mounts, cgroups)")
    Lab.down()  # whatever was up before (a developer's lab, a crashed run) goes
    lab = Lab.up(2)
    yield lab
    problems = Lab.down()
    assert not problems, f"the lab left things behind: {problems}"
