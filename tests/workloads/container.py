"""Busybox containers that count in memory, for the lab: built and started on a lab host.

    python3 container.py start --runtime runc --name c1 --bundle /var/lib/ctr/c1
    python3 container.py count --bundle /var/lib/ctr/c1      # the last count it wrote
    python3 container.py serve --name web1                   # podman: the seeds' counter server
    python3 container.py ask --name web1                     # its next number
    python3 container.py busy --name p1                      # podman: a container counting flat out
    python3 container.py written --name p1                   # podman: its /count as it is (even empty)
    python3 container.py memcounter --name m1 --bundle /var/lib/ctr/m1 --mib 512 --dirty-mibps 10 --port 7777
                                                             # the benchmark's workload, in a container
    python3 container.py shmkinds --name s1 --bundle /var/lib/ctr/s1 --mib 8 --port 7891
                                                             # every kind of shared memory (shmkinds.py)

The count lives in the shell's memory; the container writes it to /count in its
root every 100 ms, so a restart from scratch shows as a count that went back.
"""

import argparse
import io
import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import time

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.1; done"
# Counting without a pause: thousands of counts a second (an idle loop between two, so that
# /count is seldom caught empty), for a test that must see any instant the container runs.
BUSY_COUNTER = ("i=0; while true; do i=$((i+1)); echo $i > /count; "
                "j=0; while [ $j -lt 50 ]; do j=$((j+1)); done; done")
# Put first: a child the container's shell stops at once (SIGSTOP), which a move keeps stopped.
STOPPED_CHILD = "sleep 100000 & kill -STOP $!; "
# memcounter's "hold" in busybox, for a client that keeps one connection (held_client.py): its
# first line is answered {}, then each line with the next integer, counted per connection.
HELD = 'read h; echo {}; i=0; while read q; do i=$((i+1)); echo "{\\"host\\": \\"podman\\", \\"next\\": $i}"; done'


def held_server(port: int) -> str:
    return f"cat > /held.sh <<'X'\n{HELD}\nX\nexec nc -ll -p {port} -e sh /held.sh"


# The seeds' counter web server, in busybox: each connection to port 8080 gets the next integer.
SERVER = "i=0; while true; do i=$((i+1)); echo $i | nc -l -p 8080 >/dev/null; done"
IMAGE = "localhost/livemig-busybox:1"
ROOT_AS = 100000     # the host uid and gid a user namespace's root is (build_python)
PODMAN_ENV = {**os.environ, "PODMAN_IGNORE_CGROUPSV1_WARNING": "1"}


def podman_image() -> None:
    """A one-binary image from the host's busybox: the lab has no registry."""
    if subprocess.run(["podman", "image", "exists", IMAGE], env=PODMAN_ENV, check=False).returncode == 0:
        return
    root = "/tmp/livemig-busybox-image"
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy("/usr/bin/busybox", os.path.join(root, "bin/busybox"))
    for tool in ("sh", "sleep", "cat", "echo", "nc"):
        os.symlink("busybox", os.path.join(root, "bin", tool))
    tar = subprocess.Popen(["tar", "-C", root, "-cf", "-", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", IMAGE], stdin=tar.stdout, env=PODMAN_ENV, check=True,
                   stdout=subprocess.DEVNULL)
    tar.wait()
    shutil.rmtree(root)


def ask(name: str) -> int:
    out = subprocess.run(["podman", "exec", name, "nc", "-w", "5", "127.0.0.1", "8080"], env=PODMAN_ENV,
                         stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=30)
    return int(out.stdout.strip())


def podman_written(name: str) -> str:
    """A podman container's /count as it is: read through its init while it exists (paused
    too), else copied out of its storage (checkpointed, it is stopped)."""
    status, pid = subprocess.run(["podman", "container", "inspect", "--format", "{{.State.Status}} {{.State.Pid}}",
                                  name], env=PODMAN_ENV, capture_output=True, check=True, text=True).stdout.split()
    if status in ("running", "paused"):      # (a checkpointed one keeps the PID it had)
        with open(f"/proc/{pid}/root/count") as f:
            return f.read()
    tar = subprocess.run(["podman", "cp", f"{name}:/count", "-"], env=PODMAN_ENV, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
        member = t.extractfile("count")
        return member.read().decode() if member else ""


def build(bundle: str, runtime: str, busy: bool = False, stopped_child: bool = False) -> None:
    root = os.path.join(bundle, "rootfs")
    shutil.rmtree(bundle, ignore_errors=True)
    for d in ("bin", "tmp", "proc", "dev", "sys"):
        os.makedirs(os.path.join(root, d))
    shutil.copy("/usr/bin/busybox", os.path.join(root, "bin/busybox"))
    for tool in ("sh", "sleep", "cat", "echo", "kill"):
        os.symlink("busybox", os.path.join(root, "bin", tool))
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)   # the same spec serves crun
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/sh", "-c", (STOPPED_CHILD if stopped_child else "") +
                                 (BUSY_COUNTER if busy else COUNTER)]
    config["root"]["readonly"] = False
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def build_memcounter(bundle: str, mib: int, dirty_mibps: float, port: int, cpu_per_page: int = 0,
                     binds: tuple[str, ...] = ()) -> None:
    """A runc bundle running memcounter.py (build_python); binds: more of the host's
    directories bound in, each at its own path (a volume)."""
    build_python(bundle, ["python3", "/opt/livemig/tests/workloads/memcounter.py", "run", "--mib", str(mib),
                          "--dirty-mibps", str(dirty_mibps), "--port", str(port), "--cpu-per-page", str(cpu_per_page)],
                 binds)


def build_python(bundle: str, args: list[str], binds: tuple[str, ...] = (), user: str = "") -> None:
    """A runc bundle running args, a workload of the checkout's: the host's /usr (python3 and
    its libraries) and the checkout bound in read-only, so the root in the bundle is a few
    empty directories; the host's network and name, so that the workload answers the lab host
    as a bare process does. Its IPC namespace and its /dev/shm (a tmpfs) are its own, as
    runc's spec gives them. user: the host's user it runs as (its /etc then bound in too,
    read-only, for the names)."""
    root = os.path.join(bundle, "rootfs")
    ro = ["/usr", "/opt/livemig", *(["/etc"] if user else [])]
    shutil.rmtree(bundle, ignore_errors=True)
    for d in (*(r.lstrip("/") for r in ro), "tmp", "proc", "dev", "sys", *(b.lstrip("/") for b in binds)):
        os.makedirs(os.path.join(root, d))
    for link in ("bin", "lib", "lib64", "sbin"):
        os.symlink(f"usr/{link}", os.path.join(root, link))
    # a user's: runc's spec for a user namespace (its mounts are those one may make there)
    subprocess.run(["runc", "spec", *(["--rootless"] if user else [])], cwd=bundle, check=True)
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    config["root"]["readonly"] = False
    config["mounts"] += [{"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro"]}
                         for d in ro]
    config["mounts"] += [{"destination": d, "type": "bind", "source": d, "options": ["rbind", "rw"]} for d in binds]
    config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] not in ("network", "uts")]
    config.pop("hostname", None)   # the host's name, too: memcounter answers with it
    if user:
        # user is root to the host, in a user namespace where it is itself (tests/services.py,
        # as_postgres, says why: CRIU's prlimit() on a task of another uid needs
        # CAP_SYS_RESOURCE, which the lab's root lacks), the namespace's own root mapped too
        # (CRIU dumps a user namespace only then: check_user_ns)
        entry = pwd.getpwnam(user)
        config["process"]["user"] = {"uid": entry.pw_uid, "gid": entry.pw_gid}
        # no /sys: its bind mount, recursive, cannot be restored there (open_tree: EINVAL)
        config["mounts"] = [m for m in config["mounts"] if not m["destination"].startswith("/sys")]
        for kind, own in (("uidMappings", entry.pw_uid), ("gidMappings", entry.pw_gid)):
            config["linux"][kind] = [{"containerID": 0, "hostID": ROOT_AS, "size": 1},
                                     {"containerID": own, "hostID": 0, "size": 1}]
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def own_network(bundle: str) -> None:
    """The bundle's container in a network namespace of its own (its runtime makes it empty)."""
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    config["linux"]["namespaces"].append({"type": "network"})
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def linked(runtime: str, bundle: str, name: str, address: str, mac: str, kind: str = "macvlan") -> None:
    """Start the bundle's container with a link of kind in its own network namespace, put there
    between its runtime's create and start, as a tool of an operator's would: a macvlan on the
    host's eth0 (the link the lab's hosts share), or a veth whose other end stays on the host;
    address (ADDRESS/PREFIX) and mac on it."""
    own_network(bundle)
    with open(os.devnull, "r+b") as null:    # (as _detach says why)
        subprocess.run([runtime, "create", "--bundle", bundle, name], stdin=null, stdout=null, stderr=null,
                       check=True)
    state = subprocess.run([runtime, "state", name], capture_output=True, check=True, stdin=subprocess.DEVNULL)
    pid = json.loads(state.stdout)["pid"]
    temporary = f"lt{pid}"
    if kind == "veth":
        subprocess.run(["ip", "link", "add", temporary, "address", mac, "type", "veth", "peer", "name",
                        f"lv{pid}"], check=True)
    else:
        subprocess.run(["ip", "link", "add", "link", "eth0", "name", temporary, "address", mac, "type", "macvlan",
                        "mode", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", temporary, "netns", str(pid)], check=True)
    inside = ["nsenter", f"--net=/proc/{pid}/ns/net", "ip"]
    for argv in (["link", "set", temporary, "name", "eth0"], ["address", "add", address, "dev", "eth0"],
                 ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
        subprocess.run([*inside, *argv], check=True)
    subprocess.run([runtime, "start", name], check=True)


def count(bundle: str) -> int:
    for _ in range(50):    # the file is empty for an instant each time it is rewritten
        with open(os.path.join(bundle, "rootfs/count")) as f:
            text = f.read().strip()
        if text:
            return int(text)
        time.sleep(0.02)
    raise SystemExit("the container writes no count")


def _detach(runtime: str, bundle: str, name: str) -> None:
    # The container inherits our stdio: a pipe of ours would be held open, and CRIU cannot
    # dump a file outside the container's mounts. So /dev/null for all three.
    with open(os.devnull, "r+b") as null:
        res = subprocess.run([runtime, "run", "--detach", "--bundle", bundle, name],
                             stdin=null, stdout=null, stderr=null, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{runtime} run --detach {name} exited {res.returncode}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["start", "count", "serve", "ask", "image", "memcounter", "bundle", "busy", "written",
                                       "shmkinds", "redis", "postgres", "held", "linked"])
    ap.add_argument("--runtime", default="runc")
    ap.add_argument("--name", default="c1")
    ap.add_argument("--bundle")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--dirty-mibps", type=float, default=0.0)
    ap.add_argument("--port", type=int, default=7777)
    ap.add_argument("--cpu-per-page", type=int, default=0, help="memcounter's CPU work per page it writes")
    ap.add_argument("--busy", action="store_true", help="start: count without sleeping between counts")
    ap.add_argument("--bind", action="append", default=[], help="memcounter: a host directory bound in, at its path")
    ap.add_argument("--stopped-child", action="store_true", help="start, busy: with a child stopped at once")
    ap.add_argument("--rm", action="store_true", help="serve: podman run --rm (podman removes it once it stops)")
    ap.add_argument("--label", action="append", default=[], help="serve: podman run --label KEY=VALUE")
    ap.add_argument("--network", help="held: the podman network it is on")
    ap.add_argument("--ip", help="held: its address there; linked, postgres: its address (ADDRESS/PREFIX) on a "
                                 "link in a network namespace of its own")
    ap.add_argument("--mac", default="02:42:c6:12:00:96", help="linked, postgres: that link's MAC")
    ap.add_argument("--kind", default="macvlan", choices=["macvlan", "veth"], help="linked: that link's kind")
    ap.add_argument("args", nargs="*", help="redis, postgres: the server's command line (after --)")
    a = ap.parse_args()
    if a.action in ("memcounter", "bundle"):
        build_memcounter(a.bundle, a.mib, a.dirty_mibps, a.port, a.cpu_per_page, tuple(a.bind))
        if a.action == "bundle":    # only the bundle: where the seeds' procedure restores it
            return 0
        _detach(a.runtime, a.bundle, a.name)
        return 0
    if a.action == "redis":     # Redis, its arguments after --
        build_python(a.bundle, ["redis-server", *a.args])
        _detach(a.runtime, a.bundle, a.name)
        return 0
    if a.action == "postgres":     # postgres as the postgres user, its data directory (--bind) its volume
        build_python(a.bundle, a.args, tuple(a.bind), user="postgres")
        if a.ip:        # in a network namespace of its own, --ip on a macvlan link
            linked(a.runtime, a.bundle, a.name, a.ip, a.mac)
        else:
            _detach(a.runtime, a.bundle, a.name)
        return 0
    if a.action == "linked":    # the held-connection server in a namespace of its own, at --ip on --kind
        build(a.bundle, a.runtime)
        os.symlink("busybox", os.path.join(a.bundle, "rootfs/bin/nc"))
        path = os.path.join(a.bundle, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["process"]["args"] = ["/bin/sh", "-c", held_server(a.port)]
        with open(path, "w") as f:
            json.dump(config, f, indent=1)
        linked(a.runtime, a.bundle, a.name, a.ip, a.mac, a.kind)
        return 0
    if a.action == "shmkinds":
        build_python(a.bundle, ["python3", "/opt/livemig/tests/workloads/shmkinds.py", "run", "--port", str(a.port),
                                "--mib", str(a.mib)])
        _detach(a.runtime, a.bundle, a.name)
        return 0
    if a.action == "serve":
        podman_image()
        subprocess.run(["podman", "run", "--detach", *(["--rm"] if a.rm else []),
                        *(f"--label={label}" for label in a.label), "--name", a.name, IMAGE, "sh", "-c", SERVER],
                       env=PODMAN_ENV, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        for _ in range(100):   # until it listens
            try:
                print(ask(a.name))
                return 0
            except (subprocess.CalledProcessError, ValueError):
                time.sleep(0.1)
        raise SystemExit("the counter server never answered")
    if a.action == "held":      # the held-connection server, on --network at --ip, --port
        podman_image()
        subprocess.run(["podman", "run", "--detach", "--name", a.name, "--network", a.network, "--ip", a.ip, IMAGE,
                        "sh", "-c", held_server(a.port)],
                       env=PODMAN_ENV, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return 0
    if a.action == "busy":
        podman_image()
        script = (STOPPED_CHILD if a.stopped_child else "") + BUSY_COUNTER
        subprocess.run(["podman", "run", "--detach", "--name", a.name, IMAGE, "sh", "-c", script],
                       env=PODMAN_ENV, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return 0
    if a.action == "written":
        print(podman_written(a.name), end="")
        return 0
    if a.action == "ask":
        print(ask(a.name))
        return 0
    if a.action == "image":     # the counter server's image alone (a Quadlet runs it)
        podman_image()
        return 0
    if a.action == "count":
        print(count(a.bundle))
        return 0
    build(a.bundle, a.runtime, a.busy, a.stopped_child)
    _detach(a.runtime, a.bundle, a.name)
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(a.bundle, "rootfs/count")):
        if time.monotonic() > deadline:
            raise SystemExit("the container never counted")
        time.sleep(0.05)
    print(count(a.bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
