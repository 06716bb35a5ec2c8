"""What a client of the moved service lives through: the longest it waited for an answer
across each move, the median and the 99th percentile of those over many moves, and the
requests that failed. For Redis (a client INCRementing one key over one connection) and
memcounter (the same over memcounter's `hold`, 256 MiB dirtying 8 MiB/s), each a bare tree
moved back and forth between lab hosts a and b with its service address, by each of
livemig's modes, all in one run.

    python -m bench.clients                          10 moves per workload and mode
    python -m bench.clients --moves 4 --workloads redis --modes auto
    python -m bench.clients --workloads postgres --modes auto
    python -m bench.clients --workloads postgres redis --modes auto auto-no-replay

The lab: three namespaced hosts, a and b, and c where the client runs. A workload starts on a
with the address 198.18.0.100/24; its client starts on c and keeps its one connection for the
whole run, asking every 20 ms; `livemig move --json --tcp-established --move-address
198.18.0.100/24 [--mode MODE]` then takes it a -> b, b -> a, ... one move every --every
seconds (a move that takes longer delays the next). A move's client wait is the longest the
client waited for an answer that came from the move's start to a second after its end
(held_client.py: each answer's wait), beside livemig's own downtime_seconds for it. Failed
requests: a lost connection, and a move that failed. The seeds' procedure is measured the
same way, as they give it (no flag for connections): its first failure ends its moves.
`auto-no-replay` is auto with --no-replay: what a client sends while the workload is frozen
waits for its retransmission, rather than being given to the copy that runs next (replay.py).

And a podman container in a network namespace of its own (`--workloads podman`), the held
server of tests/test_podman_network.py on a macvlan network that a and b define alike, at
198.18.0.150: moved with --tcp-established alone (its address is its own network's, not the
host's), in auto (podman's checkpoint is stop-and-copy); podman refuses post-copy, and the
seeds' procedure is for trees.

And PostgreSQL (`--workloads postgres`), Debian's, in a runc container whose user and network
namespaces are its own (tests/test_database.py says why both), the service address on a macvlan
link in it: pgbench's 8 clients on c commit transactions over their connections for the whole
run (pgbench -T, long enough for every move: a run whose pgbench ended first says so), and a
move's client wait is the longest transaction that ended from the move's start to a second after
its end (pgbench's per-transaction log). Moved with --tcp-established alone, in auto (in its user
namespace CRIU's restore cannot open a userfaultfd where vm.unprivileged_userfaultfd is 0, as on
this machine: stop-and-copy; --unprivileged-userfaultfd sets it to 1 for the run, as a host may).
Failed requests: failed transactions, and a client that lost its connection (pgbench then aborts
it).

It writes bench/results/<UTC date>-clients.json (every move's sample, livemig's report
among them, and per workload and mode the median, p99 and largest client wait over the
moves, and the failures) and prints a table of them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

from tests import services as sv
from tests.lab import WORKLOAD, Lab, LabError, by_hand

CLIENT = WORKLOAD.replace("memcounter.py", "held_client.py")
WORKLOADS = ("redis", "memcounter", "podman", "postgres")
OWN_NETWORK = ("podman", "postgres")      # their address is their own network's: moved in auto alone
PODMAN = {"network": "livemig-link", "address": "198.18.0.150", "port": 7000, "name": "bench-held"}
PODMAN_ENV = ["env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1"]
CONTAINER_TOOL = WORKLOAD.replace("memcounter.py", "container.py")
MODES = {"auto": (), "auto-no-replay": ("--no-replay",), "postcopy": ("--mode", "postcopy"),
         "stopcopy": ("--mode", "stopcopy"), "seeds": ()}
AUTO = ("auto", "auto-no-replay")
MEMCOUNTER_PORT = 7960
AFTER_MOVE = 1.0        # seconds after a move's end in which an answer still counts as its


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: of 10 values, p50 is the 5th smallest and p99 the 10th."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Clients:
    """The client of one workload, on c, for the whole run: start(), then stop() gives every
    answer as (its end, how long it waited), and whether its connection was lost, and how."""

    def __init__(self, lab: Lab, workload: str):
        self.lab, self.workload = lab, workload
        self.proc: subprocess.Popen | None = None
        self.out: list[bytes] = []
        self.reader: threading.Thread | None = None

    def start(self) -> None:
        self.lab.run("c", ["rm", "-f", "/tmp/bench-client-stop"])
        port = {"redis": sv.REDIS_PORT, "podman": PODMAN["port"]}.get(self.workload, MEMCOUNTER_PORT)
        address = PODMAN["address"] if self.workload == "podman" else sv.ADDRESS
        argv = ["python3", CLIENT, "--address", address, "--port", str(port), "--until", "/tmp/bench-client-stop",
                *(["--redis"] if self.workload == "redis" else [])]
        self.proc = self.lab.popen("c", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if self.proc.stdout.readline() != b"connected\n":
            raise RuntimeError(f"the {self.workload} client did not connect")
        self.reader = threading.Thread(target=lambda: self.out.extend(self.proc.communicate()))
        self.reader.start()

    def stop(self) -> tuple[list[tuple[float, float]], str]:
        self.lab.run("c", ["touch", "/tmp/bench-client-stop"])
        self.reader.join(timeout=600)
        heard = json.loads(self.out[0].decode().splitlines()[-1])
        return [(at, wait) for (at, _, _), wait in zip(heard["answers"], heard["waits"])], heard["error"]


class PgClients:
    """pgbench's 8 clients on c against PostgreSQL, for seconds: as Clients, each answer a
    transaction (its end, how long it took), and what went wrong."""

    LOG = "/tmp/bench-pgl"

    def __init__(self, lab: Lab, pg: str, seconds: float):
        self.lab, self.pg, self.seconds = lab, pg, seconds
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.lab.run("c", ["sh", "-c", f"rm -f {self.LOG}*"])
        self.lab.run("c", sv.pgbench(self.pg, "-i", "-s", "4", "-q"), timeout=300)
        self.proc = self.lab.popen("c", sv.pgbench(self.pg, "-n", "-c", "8", "-j", "2", "-T", str(math.ceil(self.seconds)),
                                                   "-l", f"--log-prefix={self.LOG}"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sv.all_connected(self.lab, 8)

    def stop(self) -> tuple[list[tuple[float, float]], str]:
        ran_on = self.proc.poll() is None      # still running once the last move ended: the premise held
        out, err = self.proc.communicate(timeout=self.seconds + 300)
        said = out.decode(errors="replace")
        failed = re.search(r"number of failed transactions: (\d+)", said)
        problems = [] if ran_on else ["pgbench ended before the moves did"]
        if self.proc.returncode:
            problems.append(f"pgbench exited {self.proc.returncode}: {err.decode(errors='replace')[-200:]}")
        elif not (failed and failed.group(1) == "0"):
            problems.append(f"failed transactions: {said}")
        # each line: client, transaction, its time (us), script, its end (s, us)
        lines = self.lab.text("c", ["sh", "-c", f"cat {self.LOG}*"]).splitlines()
        return ([(int(f[4]) + int(f[5]) / 1e6, int(f[2]) / 1e6) for f in map(str.split, lines) if len(f) >= 6],
                "; ".join(problems))


def start(lab: Lab, workload: str) -> list[str]:
    """The workload on a, bound to the service address: what names it to livemig."""
    if workload == "redis":
        return ["--pid", str(sv.redis_tree(lab))]
    if workload == "postgres":
        return sv.postgres_container(lab, sv.init_postgres(lab), own_network=True)
    if workload == "podman":
        for h in ("a", "b"):
            lab.run(h, [*PODMAN_ENV, "podman", "network", "create", "--ignore", "--driver", "macvlan", "--opt",
                        "parent=eth0", "--subnet", "198.18.0.0/24", "--ip-range", "198.18.0.128/25",
                        "--disable-dns", PODMAN["network"]])
        lab.run("c", ["ip", "neigh", "flush", "to", PODMAN["address"]], check=False)
        lab.run("a", [*PODMAN_ENV, "python3", CONTAINER_TOOL, "held", "--name", PODMAN["name"], "--network",
                      PODMAN["network"], "--ip", PODMAN["address"], "--port", str(PODMAN["port"])])
        time.sleep(1)       # until it listens
        return [PODMAN["name"]]
    work = lab.start_workload("a", mib=256, dirty_mibps=8, pid=4971, port=MEMCOUNTER_PORT, bind=sv.ADDRESS)
    return ["--pid", str(work.pid)]


def livemig(lab: Lab, mode: str, what: list[str], src: str, dst: str) -> tuple[int, str, dict]:
    """One move by livemig: its exit code, what it said if it failed, its report."""
    # (a container in its own network namespace keeps its own address: no host address moves)
    address = [] if what[0] != "--pid" else ["--move-address", sv.MOVED]
    res = lab.run(src, [*PODMAN_ENV, "livemig", "move", "--json", "--tcp-established", *address,
                        *MODES[mode], *what, dst], check=False, timeout=900)
    report = json.loads(res.stdout) if res.stdout.strip().startswith(b"{") else {}
    return res.returncode, res.stderr.decode(errors="replace").strip()[-300:] if res.returncode else "", report


def seeds(lab: Lab, what: list[str], src: str, dst: str) -> tuple[int, str, dict]:
    """One move by the seeds' procedure as they give it (tests/lab/by_hand.py: criu dump, an
    archive, scp, criu restore): no flag for connections, no address moved."""
    try:
        by_hand.migrate(lab, int(what[-1]), src, dst, name="clients-seeds")
    except LabError as e:
        return 1, str(e)[-300:], {}
    return 0, "", {}


def run(lab: Lab, workload: str, mode: str, moves: int, every: float) -> list[dict]:
    """moves moves of a fresh workload with its client on, in mode: a sample each."""
    if workload == "postgres":      # (its address is its container's)
        lab.run("c", ["ip", "neigh", "flush", "to", sv.ADDRESS], check=False)
    else:
        sv.take_address(lab)
    samples: list[dict] = []
    try:
        what = start(lab, workload)
        client: Clients | PgClients = (PgClients(lab, sv.pg_bin(lab), moves * every + 20) if workload == "postgres"
                                       else Clients(lab, workload))
        client.start()
        time.sleep(2)       # connected, and answering
        began = time.monotonic()
        for i in range(moves):
            src, dst = ("a", "b") if i % 2 == 0 else ("b", "a")
            time.sleep(max(0.0, began + i * every - time.monotonic()))
            t0 = time.time()
            code, error, report = seeds(lab, what, src, dst) if mode == "seeds" else livemig(lab, mode, what, src, dst)
            samples.append({"workload": workload, "mode": mode, "move": i, "from": src, "to": dst,
                            "started": t0, "ended": time.time(), "exit_code": code, "error": error,
                            "livemig_mode": report.get("mode"), "downtime_seconds": report.get("downtime_seconds"),
                            "report": report})
            if code != 0:
                break
        time.sleep(AFTER_MOVE)
        answers, lost = client.stop()
    finally:
        sv.clear(lab)
        for h in ("a", "b"):
            lab.run(h, ["pkill", "-KILL", "-f", "memcounter.py run"], check=False)
            if workload == "podman":
                lab.run(h, [*PODMAN_ENV, "podman", "rm", "--force", PODMAN["name"]], check=False)
                lab.run(h, [*PODMAN_ENV, "podman", "network", "rm", "--force", PODMAN["network"]], check=False)
    for s in samples:
        waits = [wait for end, wait in answers if s["started"] <= end <= s["ended"] + AFTER_MOVE]
        s["client_answers"] = len(waits)
        s["client_wait_seconds"] = max(waits, default=None)
        s["failed_requests"] = int(s["exit_code"] != 0)
    if samples and lost:
        samples[-1]["failed_requests"] += 1       # the connection, lost
        samples[-1]["client_error"] = lost
    return samples


def summary(samples: list[dict]) -> list[dict]:
    out = []
    for workload in dict.fromkeys(s["workload"] for s in samples):
        for mode in dict.fromkeys(s["mode"] for s in samples if s["workload"] == workload):
            these = [s for s in samples if s["workload"] == workload and s["mode"] == mode]
            waits = [s["client_wait_seconds"] for s in these if s["client_wait_seconds"] is not None]
            downs = [s["downtime_seconds"] for s in these if s["downtime_seconds"] is not None]
            out.append({"workload": workload, "mode": mode, "moves": len(these),
                        "moved": sum(s["exit_code"] == 0 for s in these),
                        "client_wait_p50": percentile(waits, 50) if waits else None,
                        "client_wait_p99": percentile(waits, 99) if waits else None,
                        "client_wait_max": max(waits, default=None),
                        "downtime_p50": statistics.median(downs) if downs else None,
                        "failed_requests": sum(s["failed_requests"] for s in these)})
    return out


def told(samples: list[dict]) -> list[dict]:
    """samples, their summary printed as they come (a long run shows how it goes)."""
    print(table(summary(samples)), flush=True)
    return samples


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def table(rows: list[dict]) -> str:
    head = (f"{'workload':11} {'mode':9} {'moved':>7} {'client p50 ms':>13} {'p99 ms':>7} {'max ms':>7} "
            f"{'livemig p50 ms':>14} {'failed':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['workload']:11} {r['mode']:9} {r['moved']:>3}/{r['moves']:<3} "
                     f"{_ms(r['client_wait_p50']):>13} {_ms(r['client_wait_p99']):>7} {_ms(r['client_wait_max']):>7} "
                     f"{_ms(r['downtime_p50']):>14} {r['failed_requests']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__.split("\n\n")[0])
    ap.add_argument("--moves", type=int, default=10)
    ap.add_argument("--every", type=float, default=8.0, help="seconds from one move's start to the next's")
    ap.add_argument("--workloads", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--unprivileged-userfaultfd", action="store_true",
                    help="run with vm.unprivileged_userfaultfd 1 (as a host may set it; put back after): a workload "
                         "in a user namespace of its own (postgres) may then be restored with lazy pages")
    a = ap.parse_args(argv)
    Lab.down()      # a lab left up may carry another checkout: ours is mounted at /opt/livemig
    lab = Lab.up(3)
    started = time.gmtime()
    # (one kernel for the lab's hosts and this machine: the setting is the machine's, for the run alone)
    uffd = Path("/proc/sys/vm/unprivileged_userfaultfd")
    was = uffd.read_text().strip()
    if a.unprivileged_userfaultfd:
        uffd.write_text("1")
    try:
        samples = [s for workload in a.workloads for mode in a.modes if workload not in OWN_NETWORK or mode in AUTO
                   for s in told(run(lab, workload, mode, a.moves, a.every))]
    finally:
        uffd.write_text(was)
        Lab.down()
    rows = summary(samples)
    path = Path(a.out) / f"{time.strftime('%Y-%m-%dT%H-%M-%S', started)}-clients.json"
    path.write_text(json.dumps({"args": vars(a), "summary": rows, "samples": samples}, indent=2) + "\n")
    print(table(rows))
    print("(client: the longest the client waited for an answer during a move, over the moves; livemig: its "
          "report's downtime_seconds; failed: lost connections and failed moves)")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
