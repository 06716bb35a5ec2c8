#!/usr/bin/env python3
"""Every kind of shared memory at once, shared by two processes, for the lab: run in a
container with IPC and mount namespaces of its own (a SysV segment lives in an IPC namespace;
/dev/shm is the container's own tmpfs), and moved with it.

    shmkinds.py run --port P [--mib M]
    shmkinds.py query --port P [--wait S] check|poke TOKEN|next

`run` maps M MiB (default 8) of each kind: an anonymous shared mapping, a memfd (mapped, and
held open), a SysV segment, and a /dev/shm file; writes every page with a pattern of its own
(the kind and the page's index), then forks a child that inherits all four mappings. It
answers one request per connection on TCP port P:

    check       {"pages", "bad": {kind: pages not as written}, "counter"}: every page, checked
                by the parent, and the child's view of the first page of each kind
    poke TOKEN  {kind: what the parent reads where the child just wrote TOKEN}: the child writes
                TOKEN into the last page of each kind and the parent reads it back, so a kind
                that stopped being shared answers with the old bytes
    next        {"next"}: the next integer, as memcounter's, for tests/clients.py

Stdlib only: it runs on whatever python3 a lab host has.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import socket
import sys
import time

PAGE = 4096
KINDS = ("anon", "memfd", "sysv", "devshm")


def pattern(kind: int, index: int) -> bytes:
    head = f"{KINDS[kind]}:{index:08d}:".encode()
    return (head * (PAGE // len(head) + 1))[:PAGE]


def sysv(size: int) -> mmap.mmap | ctypes.Array:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    segment = libc.shmget(0, size, 0o1000 | 0o600)         # IPC_PRIVATE, IPC_CREAT
    address = libc.shmat(segment, None, 0)
    if segment < 0 or address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "shmget")
    libc.shmctl(segment, 0, None)       # IPC_RMID: gone with its last user
    return (ctypes.c_char * size).from_address(address)


def regions(size: int) -> dict[str, object]:
    memfd = os.memfd_create("shmkinds")
    os.ftruncate(memfd, size)
    path = f"/dev/shm/shmkinds-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    devshm = mmap.mmap(fd, size)
    os.close(fd)
    return {"anon": mmap.mmap(-1, size), "memfd": mmap.mmap(memfd, size),     # memfd stays open
            "sysv": sysv(size), "devshm": devshm}


def child(mem: dict, asks: int, tells: int) -> None:
    """Writes each token it is sent into the last page of every kind, then says so."""
    while token := os.read(asks, 64):
        for m in mem.values():
            m[len(m) - PAGE:len(m) - PAGE + len(token)] = token
        os.write(tells, b"done")
    os._exit(0)


def serve(args: argparse.Namespace) -> None:
    size = args.mib << 20
    mem = regions(size)
    for k, m in enumerate(mem.values()):
        for i in range(size // PAGE):
            m[i * PAGE:(i + 1) * PAGE] = pattern(k, i)
    ask_r, ask_w = os.pipe()
    tell_r, tell_w = os.pipe()
    if os.fork() == 0:
        child(mem, ask_r, tell_w)
    listener = socket.create_server(("0.0.0.0", args.port))
    counter = 0
    while True:
        conn, _ = listener.accept()
        with conn:
            what = conn.recv(256).decode().split()
            if not what:        # a client that gave up before it asked (a stopped copy's backlog)
                continue
            if what[0] == "check":
                bad = {kind: sum(bytes(m[i * PAGE:(i + 1) * PAGE]) != pattern(k, i)
                                 for i in range(size // PAGE - 1))       # the last page is poke's
                       for k, (kind, m) in enumerate(mem.items())}
                answer: dict = {"pages": size // PAGE - 1, "bad": bad}
            elif what[0] == "poke":
                token = what[1].encode()
                os.write(ask_w, token)
                os.read(tell_r, 4)
                answer = {kind: bytes(m[size - PAGE:size - PAGE + len(token)]).decode(errors="replace")
                          for kind, m in mem.items()}
            else:
                counter += 1
                answer = {"next": counter, "pid": os.getpid(), "host": socket.gethostname()}
            conn.sendall(json.dumps(answer).encode())


def query(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    while True:
        try:
            with socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout) as s:
                s.sendall(" ".join(args.what).encode())
                s.shutdown(socket.SHUT_WR)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            print(out.decode())
            return 0
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--mib", type=int, default=8)
    q = sub.add_parser("query")
    q.add_argument("--port", type=int, required=True)
    q.add_argument("--wait", type=float, default=0.0)
    q.add_argument("--timeout", type=float, default=60.0)
    q.add_argument("what", nargs="+")
    a = ap.parse_args()
    if a.cmd == "run":
        serve(a)
        return 0
    return query(a)


if __name__ == "__main__":
    sys.exit(main())
