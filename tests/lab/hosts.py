"""What every kind of lab host shares: the lab's state, the files that make a host one of
the lab (keys, names, livemig from the checkout), and running commands inside a host."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cgroups, rootfs
from .proc import LabError, run

LAB_DIR = Path(os.environ.get("LIVEMIG_LAB_DIR", "/var/tmp/livemig-lab"))
REPO = Path(__file__).resolve().parents[2]
SUBNET = "198.18.0"
SSH_PORT_TOO = 2222    # each host's sshd listens here too: targets named with a port (ssh://root@b:2222)
SSH_PORT_NO_STREAMS = 2224    # where a test starts an sshd that refuses streamlocal forwarding (known_hosts knows it)
HOST_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root", "LANG=C.UTF-8", "PODMAN_IGNORE_CGROUPSV1_WARNING=1"]


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    pid: int                    # netns: the host's PID 1; vm: its qemu process (as the machine sees them)
    unshare_pid: int = 0        # netns: PID 1's parent on the machine
    cgroup_procs: tuple[str, ...] = ()   # netns: the cgroups to join before entering
    ssh_port: int = 0           # vm: sshd, forwarded to 127.0.0.1:ssh_port
    console_pid: int = 0        # netns, init systemd: the machine's copier of its console pty

    def public(self) -> dict:
        return {"name": self.name, "address": self.address, "pid": self.pid}


@dataclass
class State:
    hosts: list[Host]
    kind: str = "netns"
    init: str = "lab"           # the hosts' PID 1: lab-init, or "systemd" (netns only)
    link: str = "veth"
    accel: str = ""
    switch_pid: int | None = None
    pipe_max_size_was: int | None = None
    rootfs: str = ""
    up_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def public(self) -> dict:
        d = {"kind": self.kind, "init": self.init, "link": self.link, "rootfs": self.rootfs,
             "hosts": [h.public() for h in self.hosts]}
        if self.accel:
            d["accel"] = self.accel
        return d

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"no lab host named {name!r} (hosts: {', '.join(h.name for h in self.hosts)})")

    def save(self) -> None:
        (LAB_DIR / "state.json").write_text(json.dumps(asdict(self), indent=1))

    @staticmethod
    def load() -> State | None:
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


def addresses(names: list[str]) -> dict[str, str]:
    return {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}


def prepare_host_files(names: list[str], addrs: dict[str, str]) -> None:
    """Each host's own files, in LAB_DIR/hosts/NAME/upper (a netns host's overlay upper
    dir; copied onto a VM's root at boot): one root key for the lab, a host key for each
    host pre-trusted by all, names, and livemig from the checkout."""
    keys = LAB_DIR / "keys"
    keys.mkdir(mode=0o700)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "livemig-lab", "-f", keys / "id_ed25519"])
    known = []
    for name in names:
        upper = LAB_DIR / "hosts" / name / "upper"
        hostkey = upper / "etc/ssh/lab_host_ed25519_key"
        hostkey.parent.mkdir(parents=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"host {name}", "-f", hostkey])
        key = " ".join(hostkey.with_suffix(".pub").read_text().split()[:2])
        known.append(f"{name},{addrs[name]} {key}")
        known += [f"[{name}]:{port},[{addrs[name]}]:{port} {key}" for port in (SSH_PORT_TOO, SSH_PORT_NO_STREAMS)]
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
            f"Port 22\nPort {SSH_PORT_TOO}\n"
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



def wait_for_ssh(state: State) -> None:
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


def enter_argv(state: State, host: Host, argv: list[str]) -> list[str]:
    """The command line that runs argv inside host."""
    term = os.environ.get("TERM")
    env = [*HOST_ENV, *([f"TERM={term}"] if term else [])]
    if host.ssh_port:
        import shlex
        return ["ssh", "-q", "-i", str(LAB_DIR / "keys/id_ed25519"), "-p", str(host.ssh_port),
                "-o", f"UserKnownHostsFile={LAB_DIR / 'keys/known_hosts'}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "root@127.0.0.1", "--",
                shlex.join(["/usr/bin/env", *env, *argv])]
    return ["nsenter", "--target", str(host.pid), "--all", "--root", "--wd", "--",
            "/usr/bin/env", "-i", *env, *argv]


def popen(state: State, name: str, argv: list[str], **kw) -> subprocess.Popen:
    """Start argv inside host name. close_fds stays on: a harness fd leaked into a
    workload makes `criu dump` fail (it cannot find that fd's mount)."""
    host = state.host(name)

    def prepare() -> None:
        # as if typed at a terminal: a harness run in the background (nohup, &) ignores
        # SIGINT, and a program started with it ignored never sees Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if host.cgroup_procs:
            cgroups.join(list(host.cgroup_procs))
    return subprocess.Popen(enter_argv(state, host, argv), preexec_fn=prepare, **kw)  # noqa: PLW1509 - the lab is set up before any thread starts


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
