"""A pre-fork server's memory, for the lab: a parent fills M MiB, then forks K children
that only read it (every 5 s), so that every page is shared copy-on-write by K+1 processes (as
PostgreSQL's, gunicorn's or Apache's prefork workers share their parent's).

    python3 prefork.py run --port P --mib M --children K [--pid N] [--daemon]
    python3 prefork.py query --port P [--wait S]

Asked (query), the parent answers one JSON line: its PID, its children's, whether its
memory and every child's still hold what the parent wrote (each child checks its own and
says so in a pipe to the parent), and how many such reports it has had. Asked `next`, it
answers the next integer, as memcounter does (a client of the moved service: tests/clients.py).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import socket
import sys
import time

import memcounter  # beside this file: its command line for a lab tree


def _page(i: int) -> bytes:
    return (i + 1).to_bytes(8, "little")


def _intact(memory: mmap.mmap) -> bool:
    return all(memory[i:i + 8] == _page(i // mmap.PAGESIZE) for i in range(0, len(memory), mmap.PAGESIZE))


def _reader(memory: mmap.mmap, report: int) -> None:
    """A child: reads every page, every 5 s, and says whether all were intact."""
    try:
        while True:
            os.write(report, b"1" if _intact(memory) else b"0")
            time.sleep(5)
    finally:
        os._exit(1)


def serve(args: argparse.Namespace, ready_fd: int | None) -> None:
    memory = mmap.mmap(-1, args.mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, len(memory), mmap.PAGESIZE):
        memory[i:i + 8] = _page(i // mmap.PAGESIZE)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", args.port))
    listener.listen()
    children, reports = [], {}
    for _ in range(args.children):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _reader(memory, w)
        os.close(w)
        children.append(pid)
        reports[r] = b""
    if ready_fd is not None:
        os.write(ready_fd, f"{os.getpid()}\n".encode())
        os.close(ready_fd)
    open_reports = set(reports)
    reads = 0       # the children's reports so far: a later answer's children_ok is a fresh one
    told = 0        # the last integer a client was told (memcounter's `next`)
    while True:
        ready, _, _ = select.select([listener, *open_reports], [], [])
        for r in ready:
            if r is not listener:
                said = os.read(r, 64)
                if not said:            # the child is gone: not ok
                    said = b"0"
                    open_reports.discard(r)
                reports[r] = said[-1:]
                reads += len(said)
                continue
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                if conn.recv(64).strip() == b"next":      # a client's question (tests/clients.py)
                    told += 1
                    answer = {"next": told}
                else:
                    answer = {"root": os.getpid(), "children": children, "memory_ok": _intact(memory),
                              "children_ok": all(v == b"1" for v in reports.values()), "reads": reads}
                conn.sendall(json.dumps(answer).encode() + b"\n")


def options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--mib", type=int, default=512)
    r.add_argument("--children", type=int, default=8)


if __name__ == "__main__":
    sys.exit(memcounter.tree_main("prefork", serve, options))
