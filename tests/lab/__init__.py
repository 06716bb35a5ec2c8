"""A multi-host lab on one machine: hosts that run real CRIU, sshd and runtimes.

    lab = Lab.up(2)                      # hosts "a" and "b", in namespaces (about a second)
    lab = Lab.up(2, kind="vm")           # the same in VMs with a soft-dirty kernel (slow, emulated)
    lab = Lab.up(2, init="systemd")      # namespaced hosts whose PID 1 is systemd (about a second too)
    lab.run("a", ["ssh", "b", "hostname"]).stdout   # b'b\\n'
    Lab.down()

The command line (python -m tests.lab) and the pytest fixtures use this.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import hosts as _hosts
from . import netns, vm
from .proc import LabError

__all__ = ["Lab", "LabError", "Workload"]

WORKLOAD = "/opt/livemig/tests/workloads/memcounter.py"
CONTAINER_TOOL = "/opt/livemig/tests/workloads/container.py"


KINDS = {"netns": netns, "vm": vm}


def up(hosts: int = 2, kind: str = "netns", init: str = "lab") -> _hosts.State:
    """Bring up a lab of this kind whose hosts' PID 1 is init (lab-init, or systemd: netns
    only); a lab of another kind, init or size that is up goes down first, and a namespaced
    one made from another checkout: its hosts would run that checkout's livemig at
    /opt/livemig, not this one's (a bench run from a CI's clone left one up, and the next,
    run from here, measured the clone's code)."""
    if init != "lab" and kind != "netns":
        raise LabError(f"--init {init}: only namespaced hosts (--kind netns) have another init")
    state = _hosts.State.load()
    ours = kind != "netns" or (state is not None and state.extra.get("repo") == str(_hosts.REPO))
    if state and (state.kind, state.init, len(state.hosts)) == (kind, init, hosts) and ours and state.alive():
        return state
    if state and (state.kind != kind or not ours):
        down()
    return netns.up(hosts, init=init) if kind == "netns" else KINDS[kind].up(hosts)


def down() -> list[str]:
    """Take down whatever lab is up; what could not be removed (empty when clean)."""
    state = _hosts.State.load()
    return KINDS[state.kind if state else "netns"].down()


class Lab:
    def __init__(self, state: _hosts.State):
        self.state = state

    @classmethod
    def up(cls, hosts: int = 2, kind: str = "netns", init: str = "lab") -> Lab:
        return cls(up(hosts, kind, init))

    @staticmethod
    def down() -> list[str]:
        return down()

    @property
    def kind(self) -> str:
        return self.state.kind

    @property
    def init(self) -> str:
        return self.state.init

    @property
    def hosts(self) -> list[_hosts.Host]:
        return self.state.hosts

    def address(self, name: str) -> str:
        return self.state.host(name).address

    def run(self, name: str, argv: list[str], *, check: bool = True, input: bytes | None = None,
            timeout: float | None = 600) -> subprocess.CompletedProcess:
        # imported here: the hosts load this package too, and have no jsonschema
        from tests import contract
        res = _hosts.exec_(self.state, name, argv, check=check, input=input, timeout=timeout)
        command = contract.command_of(argv)
        if command is not None:     # every --json output holds to the contract, failures too
            contract.held(command, res.stdout, res.returncode)
        return res

    def text(self, name: str, argv: list[str], **kw) -> str:
        return self.run(name, argv, **kw).stdout.decode(errors="replace")

    def popen(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        return _hosts.popen(self.state, name, argv, **kw)

    def leftovers(self, hosts: tuple[str, ...] = ("a", "b")) -> dict:
        """What a finished move may not leave on each host: entries in livemig's image root
        (but logs/, where a failed move's CRIU logs are kept on purpose) and criu processes."""
        return {h: ([x for x in self.text(h, ["ls", "-A", "/var/lib/livemig"], check=False).split() if x != "logs"],
                    self.text(h, ["pgrep", "-x", "criu"], check=False).split()) for h in hosts}

    def pss_bytes(self, name: str, pids: list[int]) -> int:
        """The processes' PSS on host name, summed (smaps_rollup's Pss: a page shared by n
        processes counts 1/n in each)."""
        text = self.text(name, ["cat", *[f"/proc/{pid}/smaps_rollup" for pid in pids]])
        return sum(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("Pss:"))

    def tx_bytes(self, name: str, interface: str = "eth0") -> int:
        """What host name has sent on interface, on the wire (its kernel's counter, read from
        the machine through the host's PID 1: no process is started for it)."""
        host = self.state.host(name)
        if self.state.kind != "netns":
            raise LabError("tx_bytes reads a namespaced host's counters")
        for line in Path(f"/proc/{host.pid}/net/dev").read_text().splitlines():
            dev, _, counters = line.partition(":")
            if dev.strip() == interface:
                return int(counters.split()[8])
        raise LabError(f"{name} has no interface {interface}")

    def start_workload(self, name: str, *, mib: int = 64, dirty_mibps: float = 0.0,
                       pid: int = 0, port: int = 7777, children: int = 0, fork_every: float = 0.0,
                       bind: str = "0.0.0.0", hot_mib: int = 0, shared: bool = False,
                       remap_every: float = 0.0, aligned_sp: bool = False) -> Workload:
        """Start memcounter on host name, detached, and wait until it answers (children:
        more memcounters in its tree, on the next ports; fork_every, hot_mib, shared, remap_every:
        aligned_sp: see memcounter)."""
        argv = ["python3", WORKLOAD, "run", "--daemon", "--mib", str(mib),
                "--dirty-mibps", str(dirty_mibps), "--port", str(port),
                "--children", str(children), "--fork-every", str(fork_every), "--bind", bind,
                "--hot-mib", str(hot_mib), "--remap-every", str(remap_every)]
        if pid:
            argv += ["--pid", str(pid)]
        if shared:
            argv.append("--shared")
        if aligned_sp:
            argv.append("--aligned-sp")
        got = int(self.text(name, argv, timeout=300).strip())
        if pid and got != pid:
            raise LabError(f"workload started as PID {got}, not {pid}: that PID was taken on {name}")
        return Workload(self, got, port, mib, bind=bind, children=children)

    def start_container_workload(self, name: str, *, mib: int = 64, dirty_mibps: float = 0.0,
                                 port: int = 7777, container: str = "mem1", binds: tuple[str, ...] = ()) -> Workload:
        """memcounter in a runc container on host name (tests/workloads/container.py), its port
        on the host's network; wait until it answers. binds: host directories bound in."""
        bundle = f"/var/lib/ctr/{container}"
        self.run(name, ["python3", CONTAINER_TOOL, "memcounter", "--name", container, "--bundle", bundle,
                        "--mib", str(mib), "--dirty-mibps", str(dirty_mibps), "--port", str(port),
                        *(f"--bind={b}" for b in binds)], timeout=60)
        work = Workload(self, 0, port, mib, container=container, bundle=bundle, dirty_mibps=dirty_mibps)
        work.query(name, wait=300)
        return work


@dataclass
class Workload:
    lab: Lab
    pid: int
    port: int
    mib: int
    container: str = ""    # a runc container's name (pid is then 0), or a bare process
    bundle: str = ""
    dirty_mibps: float = 0.0
    bind: str = "0.0.0.0"  # the address it listens on (queries go there, or to loopback for the wildcard)
    children: int = 0      # more memcounters in its tree, answering on the next ports

    def bundle_argv(self) -> list[str]:
        """What makes this container's bundle, without starting it: where a restore needs it."""
        return ["python3", CONTAINER_TOOL, "bundle", "--bundle", self.bundle, "--mib", str(self.mib),
                "--dirty-mibps", str(self.dirty_mibps), "--port", str(self.port)]

    def query(self, host: str, what: str = "get", wait: float = 0.0, port: int = 0) -> dict:
        """port: another process of its tree (memcounter --children)."""
        at = "127.0.0.1" if self.bind in ("0.0.0.0", "::") else self.bind
        out = self.lab.text(host, ["python3", WORKLOAD, "query", what, "--port", str(port or self.port),
                                   "--host", at, "--wait", str(wait)], timeout=600)
        return json.loads(out)

    def stall_between(self, host: str, since: float, port: int = 0) -> float:
        """The longest stall the workload (port: another process of its tree) lived through
        after wall-clock time since."""
        stalls = self.query(host, port=port)["stalls"]
        return max((end - start for start, end in stalls if end > since), default=0.0)
