"""Namespaced lab hosts: several Debian trixie hosts on one machine in about a second.

Each host is PID 1 of its own pid, mount, net, uts, ipc and cgroup namespaces,
with an overlay root over the cached rootfs, its own cgroups, OpenSSH sshd,
and an address in 198.18.0.0/24 (inside 198.18.0.0/15, the benchmarking
range). Two hosts are joined by a veth pair; more, by a bridge in a switch
namespace of their own. Nothing of a host is visible in the machine's network
or mount namespaces, so killing the PID 1s takes it all away.

A host's init is lab-init (sshd and an orphan reaper: the default), or systemd
(--init systemd, see systemd_host.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import cgroups, rootfs, systemd_host
from .hosts import (
    LAB_DIR,
    REPO,
    Host,
    State,
    _alive,
    _wait_gone,
    addresses,
    exec_,
    host_names,
    prepare_host_files,
    wait_for_ssh,
)
from .proc import LabError, run

PIPE_MAX = 4 * 1024 * 1024
INITS = ("lab", "systemd")
INIT_TIMEOUT = 30           # s from starting a host until its init is ready (systemd: has booted)
CONSOLE_GONE_TIMEOUT = 2    # s for a systemd host's console copier to end once the host is gone


def up(n: int = 2, log=sys.stderr, init: str = "lab") -> State:
    """Bring up n hosts whose PID 1 is init; a lab already up as asked is left as it is."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, mounts, cgroups)")
    if init not in INITS:
        raise LabError(f"no init {init!r} for lab hosts (inits: {', '.join(INITS)})")
    state = State.load()
    if state and state.alive() and len(state.hosts) == n and state.init == init:
        return state
    if state:
        print(f"lab: replacing the lab that was up ({len(state.hosts)} hosts, init {state.init})", file=log)
        down()
    base = rootfs.ensure(log)
    t0 = time.monotonic()
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    (LAB_DIR / "logs").mkdir(parents=True)
    (LAB_DIR / "shared").mkdir(mode=0o755)
    names = host_names(n)
    addrs = addresses(names)
    prepare_host_files(names, addrs)
    if init == "systemd":
        for name in names:
            systemd_host.prepare(LAB_DIR / "hosts" / name / "upper")
    state = State(hosts=[], rootfs=str(base), init=init)
    state.extra["repo"] = str(REPO)      # the checkout its hosts see at /opt/livemig (lab.up)
    state.pipe_max_size_was = _raise_pipe_max()
    state.save()  # from here on, down() can undo whatever follows
    try:
        started = {name: _start_host(name, base, init) for name in names}
        for name in names:
            state.hosts.append(_wait_for_init(name, *started[name], addrs[name], init))
            state.save()    # (down() ends its console copier too)
        _wire(state)
        state.save()
        wait_for_ssh(state)
    except BaseException:
        down()
        raise
    state.up_seconds = round(time.monotonic() - t0, 3)
    state.save()
    return state


def _start_host(name: str, base: Path, init: str) -> tuple[subprocess.Popen, int]:
    """Start the host's unshare, and for a systemd host the copier of its console (its PID,
    else 0)."""
    h = LAB_DIR / "hosts" / name
    procs = cgroups.create(name, cpuset_clone_children=init == "systemd")
    spec = {"name": name, "lower": str(base), "upper": str(h / "upper"), "work": str(h / "work"),
            "merged": str(h / "merged"), "repo": str(REPO), "shared": str(LAB_DIR / "shared"),
            "init": init, "container": systemd_host.CONTAINER,
            "cgroups": [{"relative": c.relative, "fstype": c.fstype, "options": c.options}
                        for c in cgroups.hierarchies()] if init == "lab" else systemd_host.cgroup_spec()}
    console = open(LAB_DIR / "logs" / f"{name}.console", "wb")  # noqa: SIM115 - closed by the with below
    copier = None
    with console:
        out = console.fileno()
        if init == "systemd":
            # systemd writes to /dev/console only, opening it anew for each status line: a
            # file there would be overwritten from its start each time. So a pty, read by a
            # cat on the machine that ends once the host's last writer is gone (EIO).
            master, out = os.openpty()
            with os.fdopen(master, "rb", buffering=0) as m:
                copier = subprocess.Popen(["cat"], stdin=m, stdout=console, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
        try:
            unshare = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--net", "--uts", "--ipc",
                 "--cgroup", "--propagation", "private", "--",
                 sys.executable, Path(__file__).with_name("hostinit.py"), json.dumps(spec)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, preexec_fn=lambda: cgroups.join(procs))  # noqa: PLW1509 - no thread runs yet
        finally:
            if out != console.fileno():
                os.close(out)
    return unshare, copier.pid if copier else 0


def _wait_for_init(name: str, unshare: subprocess.Popen, console_pid: int, address: str, init: str) -> Host:
    """The host once its init is ready: lab-init has started sshd; systemd has booted."""
    deadline = time.monotonic() + INIT_TIMEOUT
    pid = None
    ready = "run/lab-init.ready" if init == "lab" else "run/systemd/private"
    while time.monotonic() < deadline:
        if unshare.poll() is not None:
            raise LabError(f"host {name} died while starting: {_console(name)}")
        if pid is None:
            kids = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
            pid = int(kids[0]) if kids else None
        # (systemd: once hostinit has exec'd it, before which PID 1's root is the machine's)
        if pid and (init == "lab" or _comm(pid) == "systemd") and os.path.exists(f"/proc/{pid}/root/{ready}"):
            host = Host(name, address, pid, unshare.pid,
                        tuple(cgroups.create(name, cpuset_clone_children=init == "systemd")),
                        console_pid=console_pid)
            if init == "systemd":
                _wait_for_boot(host, deadline)
            return host
        time.sleep(0.01)
    raise LabError(f"host {name} did not start in {INIT_TIMEOUT} s: {_console(name)}")


def _wait_for_boot(host: Host, deadline: float) -> None:
    """systemd has finished booting the host, every unit that was to start started."""
    one = State(hosts=[host], init="systemd")
    res = exec_(one, host.name, ["systemctl", "is-system-running", "--wait"], check=False,
                timeout=max(deadline - time.monotonic(), 1))
    said = res.stdout.decode(errors="replace").strip()
    if said != "running":
        failed = exec_(one, host.name, ["systemctl", "--failed", "--no-legend", "--plain"], check=False)
        raise LabError(f"host {host.name}: systemd booted {said or 'nothing'} (not running); failed units: "
                       f"{failed.stdout.decode(errors='replace').strip() or 'none'}: {_console(host.name)}")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:     # gone: it is no systemd, and no copier to end
        return ""


def _console(name: str) -> str:
    # (a systemd host's console is a terminal, which ends its lines with \r\n)
    text = (LAB_DIR / "logs" / f"{name}.console").read_text(errors="replace").replace("\r\n", "\n").strip()
    return text[-2000:] or "(no output)"


def _wire(state: State) -> None:
    hosts = state.hosts
    if len(hosts) == 2:
        run(["ip", "link", "add", "eth0", "netns", hosts[0].pid, "type", "veth",
             "peer", "name", "eth0", "netns", hosts[1].pid])
    elif len(hosts) > 2:
        # A switch of its own, so that not even the bridge shows on the machine.
        switch = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"],
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        state.switch_pid, state.link = switch.pid, "bridge"
        state.save()
        _wait_netns_differs(switch.pid)
        sw = ["nsenter", "--target", str(switch.pid), "--net", "--"]
        run([*sw, "ip", "link", "add", "br0", "type", "bridge"])
        run([*sw, "ip", "link", "set", "br0", "up"])
        for h in hosts:
            run(["ip", "link", "add", "eth0", "netns", h.pid, "type", "veth",
                 "peer", "name", f"port-{h.name}", "netns", switch.pid])
            run([*sw, "ip", "link", "set", f"port-{h.name}", "master", "br0", "up"])
    for h in hosts:
        if len(hosts) == 1:
            break
        net = ["nsenter", "--target", str(h.pid), "--net", "--"]
        run([*net, "ip", "addr", "add", f"{h.address}/24", "dev", "eth0"])
        run([*net, "ip", "link", "set", "eth0", "up"])


def _wait_netns_differs(pid: int) -> None:
    mine = os.readlink("/proc/self/ns/net")
    for _ in range(500):
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != mine:
                return
        except FileNotFoundError:
            raise LabError("the lab's switch namespace died at start") from None
        time.sleep(0.01)
    raise LabError("the lab's switch namespace did not start")


def down() -> list[str]:
    """Take the lab away; return what could not be removed (empty when clean)."""
    state = State.load()
    problems: list[str] = []
    hosts = state.hosts if state else []
    names = {h.name for h in hosts} | _leftover_cgroup_names()
    mine = os.readlink("/proc/self/ns/pid")
    pids = [h.pid for h in hosts] + ([state.switch_pid] if state and state.switch_pid else [])
    for pid in pids:
        # Only ever a PID 1 of another pid namespace (or the switch): never something else.
        if _alive(pid) and (pid == (state.switch_pid if state else None) or
                            os.readlink(f"/proc/{pid}/ns/pid") != mine):
            os.kill(pid, signal.SIGKILL)
    for name in names:
        for pid in _cgroup_pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cgroups.thaw(name)       # after the kill: no frozen task escapes it by a fork
        for pid in _cgroup_pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pid in pids + [h.unshare_pid for h in hosts]:
        _wait_gone(pid)
    for h in hosts:
        # A systemd host's console copier ends by itself once the host has gone; should
        # something still hold its pty, it is ended (checked to be that cat still).
        if h.console_pid:
            _wait_gone(h.console_pid, CONSOLE_GONE_TIMEOUT)
            if _alive(h.console_pid) and _comm(h.console_pid) == "cat":
                os.kill(h.console_pid, signal.SIGKILL)
                _wait_gone(h.console_pid)
    for name in sorted(names):
        problems += [f"cgroup {d} is still there" for d in cgroups.remove(name)]
    if state and state.pipe_max_size_was is not None:
        Path("/proc/sys/fs/pipe-max-size").write_text(str(state.pipe_max_size_was))
    leftover = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                if str(LAB_DIR) in line.split()[1]]
    problems += [f"mount {m} is still there" for m in leftover]
    if not leftover:
        shutil.rmtree(LAB_DIR, ignore_errors=True)
    return problems


def _leftover_cgroup_names() -> set[str]:
    names = set()
    for h in cgroups.hierarchies():
        for d in Path(h.mountpoint, h.own_path).glob("livemig-lab-*"):
            names.add(d.name[len("livemig-lab-"):])
    return names


def _cgroup_pids(name: str) -> list[int]:
    pids: set[int] = set()
    for h in cgroups.hierarchies():
        d = cgroups.host_dir(h, name)
        for f in [d / "cgroup.procs", *d.rglob("*/cgroup.procs")] if d.exists() else []:
            try:
                pids |= {int(p) for p in f.read_text().split()}
            except OSError:
                pass
    pids.discard(os.getpid())
    return sorted(pids)


def _raise_pipe_max() -> int | None:
    """CRIU's lazy dump grows a pipe to 4 MiB; without CAP_SYS_RESOURCE only a
    high enough system-wide limit lets it. Raised for the lab, restored by down()."""
    f = Path("/proc/sys/fs/pipe-max-size")
    was = int(f.read_text())
    if was >= PIPE_MAX:
        return None
    f.write_text(str(PIPE_MAX))
    return was


