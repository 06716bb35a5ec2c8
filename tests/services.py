"""Real services in the lab, as the tests and the benchmark start them: PostgreSQL (Debian's,
its files on the storage the hosts share, /srv/shared) and Redis, each bound to a service
address of its own on host a, that moves with it (--move-address), their clients on c."""

from __future__ import annotations

from tests.lab import CONTAINER_TOOL

ADDRESS = "198.18.0.100"
MOVED = f"{ADDRESS}/24"
DATA = "/srv/shared/pg"
PG_PORT = 5432
PG_MAC = "02:42:c6:12:00:64"     # the service address's, where PostgreSQL has a network of its own
REDIS_PORT = 6390
# what postgres is told beyond initdb's defaults: the service address only (no Unix socket,
# which a move would have to carry as a file), little shared memory (shared memory crosses
# in image files after the freeze: issue 33), no huge pages (the lab has none)
PG_SETTINGS = f"""
listen_addresses = '{ADDRESS}'
port = {PG_PORT}
unix_socket_directories = ''
shared_buffers = 16MB
huge_pages = off
max_connections = 20
"""


def take_address(lab) -> None:
    """The service address on a; c forgets where it was (nothing announced a test's end)."""
    lab.run("a", ["ip", "address", "add", MOVED, "dev", "eth0"])
    lab.run("c", ["ip", "neigh", "flush", "to", ADDRESS], check=False)


def pg_bin(lab) -> str:
    """The directory of PostgreSQL's programs (its major version's)."""
    return lab.text("a", ["sh", "-c", "ls -d /usr/lib/postgresql/*/bin"]).split()[-1]


def init_postgres(lab) -> str:
    """A fresh database on the shared storage, clients of 198.18.0.0/15 trusted; pg_bin. Its
    files belong to the host's root, which is user postgres in the user namespace PostgreSQL
    runs in (as_postgres says why)."""
    pg = pg_bin(lab)
    lab.run("a", ["rm", "-rf", DATA])
    lab.run("a", ["install", "-d", "-m", "700", DATA])
    lab.run("a", [*as_postgres(lab), f"{pg}/initdb", "-D", DATA, "-A", "trust", "--locale=C", "-E", "UTF8",
                  "--no-sync"], timeout=300)
    hba = f"echo 'host all all 198.18.0.0/15 trust' >> {DATA}/pg_hba.conf"
    lab.run("a", ["sh", "-c", f"cat >> {DATA}/postgresql.conf && {hba}"], input=PG_SETTINGS.encode())
    return pg


def as_postgres(lab) -> list[str]:
    """A command line's start that runs it as user postgres while it stays the host's root: in
    a user namespace of its own where postgres's uid is the host's 0. The lab's root lacks
    CAP_SYS_RESOURCE, without which CRIU cannot read the rlimits of a task of another uid
    (prlimit: EPERM); PostgreSQL will not run as root. A real host's root has it."""
    uid, gid = lab.text("a", ["sh", "-c", "id -u postgres; id -g postgres"]).split()
    return ["unshare", "--user", f"--map-user={uid}", f"--map-group={gid}"]


def postgres_ready(lab, pg: str) -> None:
    lab.run("c", ["sh", "-c", f"until {pg}/pg_isready -q -h {ADDRESS} -p {PG_PORT}; do sleep 0.1; done"],
            timeout=120)


def postgres_container(lab, pg: str, name: str = "pg1", own_network: bool = False) -> list[str]:
    """postgres in a runc container on a (the host's network; its own IPC and user namespaces,
    postgres's uid the host's 0 as in as_postgres), its data directory a volume; what names it
    to livemig once it answers. own_network: in a network namespace of its own, made with its
    user namespace (so that CRIU may repair its TCP connections there), the service address on
    a macvlan link over the link the hosts share (PG_MAC its MAC)."""
    ip = ["--ip", MOVED, "--mac", PG_MAC] if own_network else []
    lab.run("a", ["python3", CONTAINER_TOOL, "postgres", "--name", name, "--bundle", f"/var/lib/ctr/{name}",
                  f"--bind={DATA}", *ip, "--", f"{pg}/postgres", "-D", DATA])
    postgres_ready(lab, pg)
    return [name]


def postgres_tree(lab, pg: str) -> int:
    """postgres on a as a bare process tree in this host's IPC namespace (its user namespace
    its own: as_postgres), its PIDs from 5200 on; the postmaster's PID once it answers."""
    argv = [*as_postgres(lab), f"{pg}/postgres", "-D", DATA]
    lab.run("a", ["sh", "-c", "echo 5199 > /proc/sys/kernel/ns_last_pid && exec setsid -f "
                  + " ".join(argv) + " </dev/null >/dev/null 2>&1"])
    postgres_ready(lab, pg)
    return int(lab.text("a", ["head", "-1", f"{DATA}/postmaster.pid"]).strip())


def all_connected(lab, clients: int) -> None:
    """Until that many clients on c hold a connection to the service address."""
    until = f"until [ $(ss -Htn state established dst {ADDRESS} | wc -l) = {clients} ]; do sleep 0.1; done"
    lab.run("c", ["sh", "-c", until], timeout=60)


def sql(lab, pg: str, query: str) -> str:
    """query's answer, asked from c (psql's unaligned rows, fields split by |)."""
    return lab.text("c", [f"{pg}/psql", "-h", ADDRESS, "-p", str(PG_PORT), "-U", "postgres", "-At", "-c", query,
                          "postgres"]).strip()


def pgbench(pg: str, *args: str) -> list[str]:
    """pgbench's command line against the service address (run it on c)."""
    return [f"{pg}/pgbench", "-h", ADDRESS, "-p", str(PG_PORT), "-U", "postgres", *args, "postgres"]


def redis_tree(lab, bind: str = ADDRESS) -> int:
    """redis-server on a, daemonized, bound to bind, its PIDs from 4870 on (free on every host)."""
    args = ["--bind", bind, "--port", str(REDIS_PORT), "--save", "''", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "yes", "--pidfile", "/run/redis-lab.pid"]
    lab.run("a", ["sh", "-c", "echo 4869 > /proc/sys/kernel/ns_last_pid && exec redis-server " + " ".join(args)])
    wait_for_pid = "while [ ! -s /run/redis-lab.pid ]; do sleep 0.05; done; cat /run/redis-lab.pid"
    return int(lab.text("a", ["sh", "-c", wait_for_pid]).strip())


def clear(lab) -> None:
    """Whatever a test or a benchmark run left of these services, on a and b, and the address."""
    for h in ("a", "b"):
        lab.run(h, ["runc", "delete", "--force", "pg1"], check=False)
        lab.run(h, ["pkill", "-KILL", "-x", "postgres"], check=False)
        lab.run(h, ["pkill", "-KILL", "-x", "redis-server"], check=False)
        lab.run(h, ["rm", "-rf", "/var/lib/ctr/pg1", "/run/redis-lab.pid"], check=False)
        lab.run(h, ["ip", "address", "del", MOVED, "dev", "eth0"], check=False)
    lab.run("a", ["rm", "-rf", DATA])
