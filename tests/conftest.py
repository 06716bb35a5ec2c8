"""Fixtures: a fresh lab per test module (torn down after it): `lab` (namespaced hosts) for
tests marked `lab` (`lab3`: three of them; `sd_lab`: two whose init is systemd), `vm_lab` (QEMU VMs with a soft-dirty kernel) for tests marked `vm`."""

from __future__ import annotations

import os

import pytest

from livemig.source import bootstrap
from tests.lab import Lab


def _fresh(kind: str, hosts: int = 2, init: str = "lab"):
    # A lab that cannot start fails the tests that need it; it is never a skip.
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (namespaces, mounts, cgroups)")
    Lab.down()  # whatever was up before (a developer's lab, a crashed run) goes
    lab = Lab.up(hosts, kind=kind, init=init)
    yield lab
    problems = Lab.down()
    assert not problems, f"the lab left things behind: {problems}"


@pytest.fixture(scope="module")
def lab():
    yield from _fresh("netns")


@pytest.fixture(scope="module")
def lab3():
    """Three namespaced hosts on one bridge: a and b that a workload moves between, and c, a
    client of it that is neither."""
    yield from _fresh("netns", hosts=3)


@pytest.fixture(scope="module")
def sd_lab():
    """Two namespaced hosts whose init is systemd (tests/lab/systemd_host.py)."""
    yield from _fresh("netns", init="systemd")


@pytest.fixture(scope="module")
def vm_lab():
    yield from _fresh("vm")


@pytest.fixture(autouse=True)
def no_workload_left(request):
    """After every test in a namespaced lab: a test that fails mid-way leaves its workload
    running, and its move's record; they go, so that the next test's failure is its own (a
    copy left on b holds the PID and the port the next one moves to, or starts on; a record
    makes `livemig recover` settle two moves). A passing test has checked that it left none."""
    yield
    for name in ("lab", "lab3", "sd_lab", "vm_lab"):
        if name in request.fixturenames:
            lab = request.getfixturevalue(name)
            for host in lab.hosts:
                lab.run(host.name, ["pkill", "-KILL", "-f", "memcounter.py run"], check=False)
                lab.run(host.name, ["find", "/var/lib/livemig", "-mindepth", "1", "-maxdepth", "1", "!",
                                    "-name", "logs", "-exec", "rm", "-rf", "{}", "+"], check=False)


@pytest.fixture
def small_image_root(lab):
    """b's image root on a tmpfs of its own, sized by the test (a call: nothing until then)."""
    mounted = []

    def mount(mib: int) -> None:
        lab.run("b", ["mkdir", "-p", "/var/lib/livemig"])
        lab.run("b", ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=700", "tmpfs", "/var/lib/livemig"])
        mounted.append(mib)
    yield mount
    if mounted:
        lab.run("b", ["umount", "/var/lib/livemig"], check=False)


@pytest.fixture
def b_without_livemig(lab):
    """b as a host where livemig was never installed: no `livemig` command, no package on
    its Python's path (the lab's hosts import it from the checkout through a .pth file)."""
    pth = lab.text("b", ["sh", "-c", "ls /usr/local/lib/python3*/dist-packages/livemig-checkout.pth"]).split()
    hidden = ["/usr/local/bin/livemig", *pth]
    for path in hidden:
        lab.run("b", ["mount", "--bind", "/dev/null", path])
    lab.run("b", ["rm", "-rf", bootstrap.AGENTS])      # what earlier moves brought: this one brings it
    try:
        assert lab.run("b", ["python3", "-c", "import livemig"], check=False).returncode != 0
        yield
    finally:
        for path in hidden:
            lab.run("b", ["umount", path], check=False)
