"""A process tree in the states CRIU carries from host to host, for the lab's tests of
what a move must keep as it was.

    python3 states.py run --port P [--pid N] [--daemon] [--freebind ADDR]... [--mib M]
    python3 states.py query --port P [--wait S]

The root forks four children: one it stops (SIGSTOP), one with two more threads that it
stops too, one that runs (reading, every 0.1 s, memory it shares copy-on-write with the
root) and one that exits at once and is never reaped (a zombie). The root blocks SIGUSR1
and SIGUSR2, with one of each pending: SIGUSR1 sent to the process (ShdPnd), SIGUSR2 to
its thread (SigPnd). With --freebind it also listens at ADDR (P+1, P+2... for each one)
with IP_FREEBIND (IPV6_FREEBIND): an address no host need have. With --connected it holds
a TCP connection to itself over loopback (both ends in the tree), with --locked a flock on
a file. It counts every 0.1 s.

Asked (query), the root answers one JSON line: its counter, and each task's state as its
own /proc shows it (in its own PID namespace: a container's too), so that a test reads
the tree's view of itself wherever it runs.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import select
import signal
import socket
import sys
import threading
import time

import memcounter  # beside this file: its command line for a lab tree


def _status(pid: int | str) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:     # gone: an empty status says so
        pass
    return out


def _task(pid: int) -> dict:
    st = _status(pid)
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:     # gone: no threads to show
        tids = []
    return {"pid": pid, "state": st.get("State", "gone")[:1],
            "threads": [_status(f"{pid}/task/{t}").get("State", "gone")[:1] for t in tids],
            "sigpnd": int(st.get("SigPnd", "0"), 16), "shdpnd": int(st.get("ShdPnd", "0"), 16)}


def _child(kind: str, memory: mmap.mmap) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        if kind == "zombie":
            os._exit(0)
        if kind == "threads":
            for _ in range(2):
                threading.Thread(target=time.sleep, args=(1e9,), daemon=True).start()
        while True:
            sum(memory[i] for i in range(0, len(memory), mmap.PAGESIZE))   # reads what it shares
            time.sleep(0.1)
    finally:
        os._exit(1)


def _talks(pair: tuple[socket.socket, socket.socket] | None) -> bool | None:
    """Does the tree's loopback connection still carry a byte each way? None: it has none."""
    if pair is None:
        return None
    try:
        for one, other in (pair, pair[::-1]):
            one.sendall(b"x")
            other.settimeout(5)
            if other.recv(1) != b"x":
                return False
        return True
    except OSError:     # reset, closed: it does not talk
        return False


def _locks(pid: int) -> int:
    """The file locks /proc/locks says pid holds."""
    with open("/proc/locks") as f:
        return sum(1 for line in f if len(line.split()) > 4 and line.split()[4] == str(pid))


def serve(args: argparse.Namespace, ready_fd: int | None) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
    os.kill(os.getpid(), signal.SIGUSR1)                         # pending on the process
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)   # pending on its thread
    memory = mmap.mmap(-1, args.mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, len(memory), mmap.PAGESIZE):
        memory[i:i + 8] = (i // mmap.PAGESIZE + 1).to_bytes(8, "little")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", args.port))
    listener.listen()
    free = []
    for i, address in enumerate(args.freebind, 1):
        v6 = ":" in address
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
        sock.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.SOL_IP, 78 if v6 else 15, 1)  # IP(V6)_FREEBIND
        sock.bind((address, args.port + i))
        sock.listen()
        free.append(sock)
    pair = None
    if args.connected:          # a TCP connection with both its ends in the tree, over loopback
        server = socket.create_server(("127.0.0.1", args.port + 10))
        pair = (socket.create_connection(("127.0.0.1", args.port + 10)), server.accept()[0])
    if args.locked:             # a file lock (flock) on a file every host has
        held = open(args.locked)    # noqa: SIM115 (held for the tree's life)
        fcntl.flock(held, fcntl.LOCK_EX)
    kids = {kind: _child(kind, memory) for kind in ("stopped", "threads", "running", "zombie")}
    # its threads started, the zombie dead: then the stops
    while len(_task(kids["threads"])["threads"]) < 3 or _task(kids["zombie"])["state"] != "Z":
        time.sleep(0.01)
    for kind in ("stopped", "threads"):
        os.kill(kids[kind], signal.SIGSTOP)
    while not all(_status(kids[k]).get("State", "")[:1] == "T" for k in ("stopped", "threads")):
        time.sleep(0.01)
    if ready_fd is not None:
        os.write(ready_fd, f"{os.getpid()}\n".encode())
        os.close(ready_fd)
    counter, last = 0, time.monotonic()
    while True:
        ready, _, _ = select.select([listener], [], [], 0.1)
        if time.monotonic() - last >= 0.1:
            counter, last = counter + 1, time.monotonic()
        if not ready:
            continue
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(64)
            answer = {"counter": counter, "root": _task(os.getpid()), "connected": _talks(pair),
                      "locks": _locks(os.getpid()),
                      **{kind: _task(pid) for kind, pid in kids.items()},
                      "memory_ok": all(memory[i:i + 8] == (i // mmap.PAGESIZE + 1).to_bytes(8, "little")
                                       for i in range(0, len(memory), mmap.PAGESIZE))}
            conn.sendall(json.dumps(answer).encode() + b"\n")


def options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--freebind", action="append", default=[], help="listen at this address too, on the next port")
    r.add_argument("--mib", type=int, default=16)
    r.add_argument("--connected", action="store_true", help="hold a TCP connection to itself, over loopback")
    r.add_argument("--locked", default="", help="hold a flock on this file (one every host has)")


if __name__ == "__main__":
    sys.exit(memcounter.tree_main("states", serve, options))
