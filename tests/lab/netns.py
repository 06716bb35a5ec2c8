"""Namespaced lab hosts: several Debian trixie hosts on one machine in about a second.

Each host is PID 1 of its own pid, mount, net, uts, ipc and cgroup namespaces,
with an overlay root over the cached rootfs, its own cgroups, OpenSSH sshd,
and an address in 198.18.0.0/24 (inside 198.18.0.0/15, the benchmarking
range). Two hosts are joined by a veth pair; more, by a bridge in a switch
namespace of their own. Nothing of a host is visible in the machine's network
or mount namespaces, so killing the PID 1s takes it all away.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cgroups, rootfs
from .proc import LabError, run

LAB_DIR = Path(os.environ.get("LIVEMIG_LAB_DIR", "/var/tmp/livemig-lab"))
REPO = Path(__file__).resolve().parents[2]
SUBNET = "198.18.0"
PIPE_MAX = 4 * 1024 * 1024
HOST_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root", "LANG=C.UTF-8", "PODMAN_IGNORE_CGROUPSV1_WARNING=1"]


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    pid: int                    # the host's PID 1, as the machine sees it
    unshare_pid: int            # its parent, on the machine
    cgroup_procs: tuple[str, ...]

    def public(self) -> dict:
        return {"name": self.name, "address": self.address, "pid": self.pid}


@dataclass
class State:
    hosts: list[Host]
    kind: str = "netns"
    link: str = "veth"
    switch_pid: int | None = None
    pipe_max_size_was: int | None = None
    rootfs: str = ""
    up_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def public(self) -> dict:
        return {"kind": self.kind, "link": self.link, "rootfs": self.rootfs,
                "hosts": [h.public() for h in self.hosts]}

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"no lab host named {name!r} (hosts: {', '.join(h.name for h in self.hosts)})")

    def save(self) -> None:
        (LAB_DIR / "state.json").write_text(json.dumps(asdict(self), indent=1))

    @staticmethod
    def load() -> "State | None":
        try:
            d = json.loads((LAB_DIR / "state.json").read_text())
        except FileNotFoundError:
            return None
        d["hosts"] = [Host(**{**h, "cgroup_procs": tuple(h["cgroup_procs"])}) for h in d["hosts"]]
        return State(**d)

    def alive(self) -> bool:
        return all(_alive(h.pid) for h in self.hosts)


def host_names(n: int) -> list[str]:
    if not 1 <= n <= 26:
        raise LabError(f"--hosts must be 1 to 26, not {n}")
    return [chr(ord("a") + i) for i in range(n)]


def up(n: int = 2, log=sys.stderr) -> State:
    """Bring up n hosts; a lab already up with n hosts is left as it is."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, mounts, cgroups)")
    state = State.load()
    if state and state.alive() and len(state.hosts) == n:
        return state
    if state:
        print(f"lab: replacing the lab that was up ({len(state.hosts)} hosts)", file=log)
        down()
    base = rootfs.ensure(log)
    t0 = time.monotonic()
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    (LAB_DIR / "logs").mkdir(parents=True)
    names = host_names(n)
    addrs = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}
    _keys(names, addrs)
    state = State(hosts=[], rootfs=str(base))
    state.pipe_max_size_was = _raise_pipe_max()
    state.save()  # from here on, down() can undo whatever follows
    try:
        unshares = {name: _start_host(name, base) for name in names}
        for name in names:
            state.hosts.append(_wait_for_init(name, unshares[name], addrs[name]))
        state.save()
        _wire(state)
        state.save()
        _wait_for_ssh(state)
    except BaseException:
        down()
        raise
    state.up_seconds = round(time.monotonic() - t0, 3)
    state.save()
    return state


def _keys(names: list[str], addrs: dict[str, str]) -> None:
    """One root key for the lab; a host key for each host, pre-trusted by all."""
    keys = LAB_DIR / "keys"
    keys.mkdir(mode=0o700)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "livemig-lab", "-f", keys / "id_ed25519"])
    known = []
    for name in names:
        upper = LAB_DIR / "hosts" / name / "upper"
        hostkey = upper / "etc/ssh/lab_host_ed25519_key"
        hostkey.parent.mkdir(parents=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"host {name}", "-f", hostkey])
        known.append(f"{name},{addrs[name]} " + " ".join(hostkey.with_suffix(".pub").read_text().split()[:2]))
    hosts_file = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n" + \
        "".join(f"{addrs[nm]} {nm}\n" for nm in names)
    pyver = _python_version(rootfs.path())
    for name in names:
        h = LAB_DIR / "hosts" / name
        u = h / "upper"
        for d in ("work", "merged"):
            (h / d).mkdir()
        ssh_dir = u / "root/.ssh"
        ssh_dir.mkdir(parents=True, mode=0o700)
        (u / "root").chmod(0o700)
        shutil.copy(keys / "id_ed25519", ssh_dir / "id_ed25519")
        shutil.copy(keys / "id_ed25519.pub", ssh_dir / "authorized_keys")
        (ssh_dir / "known_hosts").write_text("\n".join(known) + "\n")
        (ssh_dir / "config").write_text(
            "Host *\n  BatchMode yes\n  StrictHostKeyChecking yes\n  ConnectTimeout 5\n")
        for f in ssh_dir.iterdir():
            f.chmod(0o600)
        (u / "etc/ssh/sshd_config.d").mkdir(parents=True)
        (u / "etc/ssh/sshd_config.d/lab.conf").write_text(
            "HostKey /etc/ssh/lab_host_ed25519_key\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nUsePAM no\nUseDNS no\n"
            "MaxStartups 100:30:200\nMaxSessions 64\n")
        (u / "etc/hostname").write_text(name + "\n")
        (u / "etc/hosts").write_text(hosts_file)
        init = u / "usr/local/sbin/lab-init"
        init.parent.mkdir(parents=True)
        shutil.copy(Path(__file__).with_name("lab_init.py"), init)
        init.chmod(0o755)
        # livemig "installed" from the checkout mounted at /opt/livemig, so a
        # host always runs the code under test; its libraries are Debian's.
        site = u / f"usr/local/lib/python{pyver}/dist-packages"
        site.mkdir(parents=True)
        (site / "livemig-checkout.pth").write_text("/opt/livemig\n")
        cli = u / "usr/local/bin/livemig"
        cli.parent.mkdir(parents=True, exist_ok=True)
        cli.write_text("#!/usr/bin/python3\nimport sys\nfrom livemig.cli import main\nsys.exit(main())\n")
        cli.chmod(0o755)


def _python_version(base: Path) -> str:
    found = sorted(p.name[len("python"):] for p in (base / "usr/lib").glob("python3.*")
                   if (p / "os.py").exists())
    if not found:
        raise LabError(f"no python3 in the rootfs {base}")
    return found[-1]


def _start_host(name: str, base: Path) -> subprocess.Popen:
    h = LAB_DIR / "hosts" / name
    procs = cgroups.create(name)
    spec = {"name": name, "lower": str(base), "upper": str(h / "upper"), "work": str(h / "work"),
            "merged": str(h / "merged"), "repo": str(REPO),
            "cgroups": [{"relative": c.relative, "fstype": c.fstype, "options": c.options}
                        for c in cgroups.hierarchies()]}
    console = open(LAB_DIR / "logs" / f"{name}.console", "wb")
    with console:
        return subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--net", "--uts", "--ipc",
             "--cgroup", "--propagation", "private", "--",
             sys.executable, Path(__file__).with_name("hostinit.py"), json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=console, stderr=console,
            start_new_session=True, preexec_fn=lambda: cgroups.join(procs))


def _wait_for_init(name: str, unshare: subprocess.Popen, address: str) -> Host:
    deadline = time.monotonic() + 30
    pid = None
    while time.monotonic() < deadline:
        if unshare.poll() is not None:
            raise LabError(f"host {name} died while starting: {_console(name)}")
        if pid is None:
            kids = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
            pid = int(kids[0]) if kids else None
        if pid and os.path.exists(f"/proc/{pid}/root/run/lab-init.ready"):
            return Host(name, address, pid, unshare.pid, tuple(cgroups.create(name)))
        time.sleep(0.01)
    raise LabError(f"host {name} did not start in 30 s: {_console(name)}")


def _console(name: str) -> str:
    text = (LAB_DIR / "logs" / f"{name}.console").read_text(errors="replace").strip()
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


def _wait_for_ssh(state: State) -> None:
    """Every host reaches the next one by name over ssh, keys verified."""
    hosts = state.hosts
    if len(hosts) < 2:
        return
    for i, h in enumerate(hosts):
        peer = hosts[(i + 1) % len(hosts)]
        deadline = time.monotonic() + 20
        while True:
            res = exec_(state, h.name, ["ssh", "-o", "ConnectTimeout=2", peer.name, "true"],
                        check=False, timeout=10)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise LabError(f"ssh {h.name} -> {peer.name} does not work: "
                               f"{res.stderr.decode(errors='replace').strip()}")
            time.sleep(0.05)


def enter_argv(host: Host, argv: list[str]) -> list[str]:
    """The command line that runs argv inside host (after joining its cgroups)."""
    term = os.environ.get("TERM")
    return ["nsenter", "--target", str(host.pid), "--all", "--root", "--wd", "--",
            "/usr/bin/env", "-i", *HOST_ENV, *([f"TERM={term}"] if term else []), *argv]


def popen(state: State, name: str, argv: list[str], **kw) -> subprocess.Popen:
    """Start argv inside host name. close_fds stays on: a harness fd leaked into a
    workload makes `criu dump` fail (it cannot find that fd's mount)."""
    host = state.host(name)
    return subprocess.Popen(enter_argv(host, argv), preexec_fn=lambda: cgroups.join(list(host.cgroup_procs)),
                            **kw)


def exec_(state: State, name: str, argv: list[str], *, check: bool = True, input: bytes | None = None,
          timeout: float | None = 600) -> subprocess.CompletedProcess:
    """Run argv inside host name; stdout and stderr are captured."""
    p = popen(state, name, argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise LabError(f"{name}: {' '.join(argv)}: timed out after {timeout} s") from None
    res = subprocess.CompletedProcess(argv, p.returncode, stdout, stderr)
    if check and res.returncode != 0:
        raise LabError(f"{name}: {' '.join(argv)} exited {res.returncode}: "
                       f"{stderr.decode(errors='replace').strip()[-2000:]}")
    return res


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
    for pid in pids + [h.unshare_pid for h in hosts]:
        _wait_gone(pid)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """Wait until pid has left the process table, reaping it when it is our child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not ours: its own parent reaps it
            if not os.path.exists(f"/proc/{pid}"):
                return
        time.sleep(0.02)
