#!/usr/bin/env python3
"""A workload whose state must survive a migration, and a client to ask it.

    memcounter.py run --mib M [--dirty-mibps D] [--port P] [--pid N] [--daemon]
                      [--children C] [--fork-every S] [--cpu-per-page K] [--hot-mib H] [--shared]
                      [--remap-every S]
    memcounter.py query [--port P] [--wait S] get|verify|sum|next

`run` holds M MiB of anonymous memory whose every page can be checked (its
index, a generation number bumped on each write, and content derived from the
index), rewrites D MiB/s of random pages, counts once every 10 ms, and notes
every stall longer than 50 ms it lives through: a migration's downtime as the
application saw it. It answers one request per connection on a TCP port:

    get     {"counter", "pid", "host", "dirtied_pages", "shared", "stalls": [[start, end], ...],
             "fork_checks", "fork_failures", ...}
    verify  {"bad_pages", "pages", "counter"}: every page checked against what it must hold
    sum     {"sha256", "counter"}: a digest of all the memory
    next    {"next", "pid", "host"}: the next integer, 1 first, one for each request: what a
            client was told, which a copy that runs on from an older state tells again

A family: `--children C` first forks C more memcounters, each with memory of its
own, answering on the next ports (P+1...); `--fork-every S` forks a child every S
seconds that checks every page it inherited, lingers as long, and exits 1 if one
was wrong (a page a migration lost, or placed wrong, in the child's own copy);
"get" counts those checks and the failures.

`--hot-mib H` writes only in its first H MiB: what it dirties is bounded by H, however long
a migration's rounds take (a test's premise that holds on any machine).

`--cpu-per-page K` hashes each page it writes K times over (about 5 us each here): work
done for every page dirtied, as a real program does, so that a CPU quota slows its
dirtying in proportion (auto-converge's premise), however small the kernel's smallest
quota is beside the CPU the writes alone take.

`--remap-every S` churns a scratch MiB of its own every S seconds, by turns: unmaps it and
maps a fresh one (often at the same address), filled anew; or drops one of its pages
(MADV_DONTNEED) and reads it, so that the kernel maps its zero page there without a write.
"verify" checks the scratch too: what a migration that trusted a page it saw unwritten
would get wrong.

`--shared` maps the memory MAP_SHARED|MAP_ANONYMOUS instead of MAP_PRIVATE, as Python's
mmap.mmap(-1, n) does by default and as shared buffers are: same content, same checks, but
the kernel keeps it in shmem, which CRIU dumps and restores apart from private memory
(bench/shm.py measures what that costs a move). A shared mapping is not copied at a fork,
so a fork check's child would take its parent's later writes for wrong pages: `--shared`
does not combine with `--fork-every` (with `--children`, each maps its own, shared too).

`--aligned-sp` runs a thread that waits in pause(2) with its stack pointer on a page
boundary, for good (machine code of its own: Python's frames never leave it so). CRIU 4.2's
lazy dump then writes every page of the process into its images (pages/relazy.py says why):
a dump that meets this otherwise one time in 256 or so, on purpose every time.

Stdlib only: it runs on whatever python3 a lab host has.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import mmap
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable

PAGE = 4096
TICK = 0.010
STALL = 0.050
STALLS_KEPT = 4096
_BLOCK = random.Random(1234).randbytes(1 << 20)
_TEXT = (b"livemig memcounter page -- " * 200)[: PAGE // 2]
SCRATCH_PAGES = 256


def expected_body(p: int) -> bytes:
    """Bytes 16..4096 of page p: half pseudo-random (so it does not compress
    away), half text (so it compresses like real memory does, somewhat)."""
    off = (p * 4099) % (len(_BLOCK) - (PAGE // 2 - 16))
    return _BLOCK[off:off + PAGE // 2 - 16] + _TEXT


class Memory:
    def __init__(self, mib: int, cpu_per_page: int = 0, hot_mib: int = 0, shared: bool = False):
        self.pages, self.cpu_per_page = mib * 256, cpu_per_page
        self.hot = min(self.pages, hot_mib * 256) if hot_mib else self.pages    # the pages it writes
        flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
        self.buf = mmap.mmap(-1, max(self.pages, 1) * PAGE, flags=flags)
        # Soft-dirty is tracked per huge page when THP backs us: one write would
        # make 512 pages dirty and pre-copy would resend everything.
        self.buf.madvise(mmap.MADV_NOHUGEPAGE)
        self.gens = array.array("Q", bytes(8 * self.pages))
        self.scratch: mmap.mmap | None = None      # --remap-every's
        self.dropped: set[int] = set()
        self.turn = 0
        for p in range(self.pages):
            o = p * PAGE
            self.buf[o:o + 16] = struct.pack("<QQ", p, 0)
            self.buf[o + 16:o + PAGE] = expected_body(p)

    def churn(self) -> None:
        """One turn of --remap-every's: a fresh scratch mapping, or one of its pages dropped."""
        self.turn += 1
        if self.turn % 2:
            if self.scratch is not None:
                self.scratch.close()
            self.scratch = mmap.mmap(-1, SCRATCH_PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.dropped = set()
            for p in range(SCRATCH_PAGES):
                self.scratch[p * PAGE:p * PAGE + 16] = struct.pack("<QQ", p, self.turn)
        elif self.scratch is not None:
            p = (self.turn // 2) % SCRATCH_PAGES
            self.scratch.madvise(mmap.MADV_DONTNEED, p * PAGE, PAGE)
            self.dropped.add(p)
            _ = self.scratch[p * PAGE]       # a read: the zero page, mapped without a write

    def _bad_scratch(self) -> int:
        if self.scratch is None:
            return 0
        made = self.turn - (self.turn + 1) % 2      # the turn that mapped it
        return sum(self.scratch[p * PAGE:(p + 1) * PAGE] != (bytes(PAGE) if p in self.dropped else
                                                            struct.pack("<QQ", p, made) + bytes(PAGE - 16))
                   for p in range(SCRATCH_PAGES))

    def dirty(self, rng: random.Random, n: int) -> None:
        for _ in range(n):
            p = rng.randrange(self.hot)
            self.gens[p] += 1
            struct.pack_into("<Q", self.buf, p * PAGE + 8, self.gens[p])
            for _ in range(self.cpu_per_page):
                hashlib.blake2b(self.buf[p * PAGE:(p + 1) * PAGE])

    def bad_pages(self) -> int:
        bad = 0
        for p in range(self.pages):
            o = p * PAGE
            if (self.buf[o:o + 16] != struct.pack("<QQ", p, self.gens[p])
                    or self.buf[o + 16:o + PAGE] != expected_body(p)):
                bad += 1
        return bad + self._bad_scratch()

    def sha256(self) -> str:
        return hashlib.sha256(self.buf).hexdigest()


def serve(args: argparse.Namespace, ready_fd: int | None) -> None:
    for i in range(1, args.children + 1):
        if os.fork() == 0:
            if ready_fd is not None:
                os.close(ready_fd)
            serve(argparse.Namespace(**{**vars(args), "port": args.port + i, "children": 0, "fork_every": 0.0}), None)
            os._exit(0)
    mem = Memory(args.mib, args.cpu_per_page, args.hot_mib, args.shared)
    if args.aligned_sp:
        _wait_with_an_aligned_sp()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(16)
    if ready_fd is not None:
        os.write(ready_fd, b"%d\n" % os.getpid())
        os.close(ready_fd)
    per_tick = args.dirty_mibps * 256 * TICK
    rng = random.Random(os.getpid())
    counter = dirtied = 0
    carry = 0.0
    stalls: list[list[float]] = []
    last = time.time()
    next_tick = next_fork = next_remap = time.monotonic()
    forks = {"fork_checks": 0, "fork_failures": 0}
    told = {"next": 0}      # the last integer "next" answered
    held: list[socket.socket] = []   # connections a client keeps ("hold"): one "next" a line
    while True:
        if args.remap_every and time.monotonic() >= next_remap:
            next_remap = time.monotonic() + args.remap_every
            mem.churn()
        if args.fork_every and time.monotonic() >= next_fork:
            next_fork = time.monotonic() + args.fork_every
            _fork_check(mem, args.fork_every, forks)
        now = time.time()
        if now - last > STALL:
            stalls.append([round(last, 6), round(now, 6)])
            # Enough to span a whole move: a post-copy that keeps faulting stalls hundreds of
            # times after the resume, and 16 (as it was) lost the move's own stall among them.
            del stalls[:-STALLS_KEPT]
        last = now
        counter += 1
        carry += per_tick
        n, carry = int(carry), carry - int(carry)
        mem.dirty(rng, n)
        dirtied += n
        next_tick += TICK
        wait = next_tick - time.monotonic()
        if wait < -2 * TICK:       # we were frozen or moved: never race to catch up
            next_tick, wait = time.monotonic(), 0.0
        readable, _, _ = select.select([listener, *held], [], [], max(wait, 0.0))
        for conn in readable:
            if conn is listener:
                kept = _answer(listener, mem, counter, dirtied, stalls, args, forks, told)
                if kept is not None:
                    held.append(kept)
            elif not _answer_held(conn, told):
                held.remove(conn)
                conn.close()


# pause() for good, the stack pointer set to the address given (the first argument), never
# pushing a byte: x86-64 (mov rsp, rdi; loop: mov eax, 34; syscall; jmp loop) and arm64
# (mov sp, x0; loop: x0..x3 = 0, x8 = 73, ppoll(NULL, 0, NULL, NULL); b loop: it has no pause)
_PAUSE_ON = {
    "x86_64": bytes.fromhex("4889fc" "b822000000" "0f05" "ebf7"),
    "aarch64": b"".join(i.to_bytes(4, "little") for i in (
        0x9100001F, 0xD2800000, 0xD2800001, 0xD2800002, 0xD2800003, 0xD2800928, 0xD4000001, 0x17FFFFFA)),
}


def _wait_with_an_aligned_sp() -> None:
    """A thread that waits for good with its stack pointer on a page boundary (--aligned-sp)."""
    import ctypes
    import threading

    code = _PAUSE_ON.get(os.uname().machine)
    if code is None:
        sys.exit(f"--aligned-sp: no machine code for {os.uname().machine}")
    text = mmap.mmap(-1, PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    text.write(code)
    stack = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    stack.write(b"s" * len(stack))      # present pages, that a dump writes or leaves lazy
    top = ctypes.addressof(ctypes.c_char.from_buffer(stack)) + 8 * PAGE      # room below for nothing
    pause_on = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ctypes.addressof(ctypes.c_char.from_buffer(text)))

    def wait() -> None:
        # no signal lands on this thread: its handler would run on the stack given
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        pause_on(top)       # never returns (ctypes lets go of the GIL first)

    threading.Thread(target=wait, daemon=True, name="aligned-sp").start()
    _keep.extend([text, stack, pause_on])


_keep: list = []      # what the thread runs on, alive as long as the process


def _fork_check(mem: Memory, linger: float, forks: dict) -> None:
    """A child that checks the memory it inherited; and the children that have exited."""
    if os.fork() == 0:
        bad = mem.bad_pages()
        time.sleep(linger)
        os._exit(1 if bad else 0)
    forks["fork_checks"] += 1
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        forks["fork_failures"] += bool(status)


def _answer_held(conn: socket.socket, told: dict) -> bool:
    """A kept connection's "next" lines, each answered with the next integer; False once it
    ended (or broke)."""
    try:
        data = conn.recv(4096)
        if not data:
            return False
        for _ in range(data.count(b"\n")):
            told["next"] += 1
            conn.sendall(json.dumps({"next": told["next"], "host": socket.gethostname()}).encode() + b"\n")
        return True
    except OSError:
        return False


def _answer(listener, mem: Memory, counter: int, dirtied: int, stalls, args, forks: dict,
            told: dict) -> socket.socket | None:
    """One command on a new connection, answered; "hold": the connection, kept."""
    conn, _ = listener.accept()
    conn.settimeout(5)
    try:
        cmd = conn.recv(64).strip()
    except OSError:
        conn.close()
        return None
    if cmd == b"hold":
        conn.sendall(b'{"held": true}\n')
        return conn
    with conn:
        try:
            if cmd == b"verify":
                reply = {"bad_pages": mem.bad_pages(), "pages": mem.pages, "counter": counter}
            elif cmd == b"next":
                told["next"] += 1
                reply = {"next": told["next"], "pid": os.getpid(), "host": socket.gethostname()}
            elif cmd == b"sum":
                reply = {"sha256": mem.sha256(), "counter": counter}
            else:
                reply = {"counter": counter, "pid": os.getpid(), "host": socket.gethostname(),
                         "dirtied_pages": dirtied, "mib": args.mib, "shared": args.shared, "time": time.time(),
                         "stalls": stalls, **forks}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass


def run(args: argparse.Namespace) -> None:
    start(args, serve, "memcounter")


def start(args: argparse.Namespace, serve_as: Callable[[argparse.Namespace, int | None], None], name: str) -> None:
    """serve_as(args, ready_fd) as PID args.pid (if set); with args.daemon in a session of
    its own, detached: its PID printed once it writes it to ready_fd, and we return."""
    if args.pid:
        # The next fork gets this PID: a bare process restores only onto free
        # PIDs, so tests pick one that is free on every lab host.
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(args.pid - 1))
    if not args.daemon:
        serve_as(args, None)
        return
    r, w = os.pipe()
    child = os.fork()
    if child:
        os.close(w)
        line = os.read(r, 64)
        if not line:
            sys.exit(f"{name}: the workload died while starting")
        print(line.decode().strip(), flush=True)
        return
    os.close(r)
    os.setsid()
    # Our own /dev/null: an fd inherited from whoever started us might point at
    # a mount CRIU cannot find on the other side.
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    serve_as(args, w)


def tree_main(name: str, serve_as: Callable[[argparse.Namespace, int | None], None],
              run_options: Callable[[argparse.ArgumentParser], None]) -> int:
    """The command line of another lab tree that serves as memcounter does (states.py,
    prefork.py): `run --port P [--pid N] [--daemon]` and run_options' own, and `query
    --port P [--wait S]`, whose answer (to "get") it prints."""
    ap = argparse.ArgumentParser(prog=name)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--pid", type=int, default=0)
    r.add_argument("--daemon", action="store_true")
    run_options(r)
    q = sub.add_parser("query")
    q.add_argument("--port", type=int, required=True)
    q.add_argument("--wait", type=float, default=0.0)
    args = ap.parse_args()
    if args.cmd == "run":
        start(args, serve_as, name)
        return 0
    return query(argparse.Namespace(what="get", host="127.0.0.1", timeout=10.0, **vars(args)))


def query(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    while True:
        try:
            with socket.create_connection((args.host, args.port), timeout=args.timeout) as s:
                s.sendall(args.what.encode() + b"\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            print(data.decode().strip())
            return 0
        except OSError as e:
            if time.monotonic() >= deadline:
                print(f"memcounter: {args.host}:{args.port}: {e}", file=sys.stderr)
                return 1
            time.sleep(0.02)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--mib", type=int, default=64)
    r.add_argument("--dirty-mibps", type=float, default=0.0)
    r.add_argument("--port", type=int, default=7777)
    r.add_argument("--bind", default="0.0.0.0", help="the address to listen on")
    r.add_argument("--pid", type=int, default=0, help="start as this PID (written to ns_last_pid)")
    r.add_argument("--daemon", action="store_true", help="detach; print the PID once serving")
    r.add_argument("--children", type=int, default=0, help="fork C more memcounters first, on the next ports")
    r.add_argument("--fork-every", type=float, default=0.0, help="fork a child this often that checks its memory")
    r.add_argument("--cpu-per-page", type=int, default=0, help="hash each page written this many times over")
    r.add_argument("--hot-mib", type=int, default=0, help="write only in the first H MiB (0: anywhere)")
    r.add_argument("--remap-every", type=float, default=0.0,
                   help="remap a scratch MiB, or drop one of its pages, this often")
    r.add_argument("--shared", action="store_true",
                   help="map the memory MAP_SHARED|MAP_ANONYMOUS, not MAP_PRIVATE (not with --fork-every)")
    r.add_argument("--aligned-sp", action="store_true",
                   help="a thread that waits with its stack pointer on a page boundary (CRIU's lazy dump then "
                        "writes every page)")
    q = sub.add_parser("query")
    q.add_argument("what", choices=["get", "verify", "sum", "next"])
    q.add_argument("--port", type=int, default=7777)
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--wait", type=float, default=0.0, help="retry this long while nothing answers")
    q.add_argument("--timeout", type=float, default=120.0,
                   help="for one answer (a stopped workload's port takes the connection, and answers never)")
    args = ap.parse_args()
    if args.cmd == "run" and args.shared and args.fork_every:
        ap.error("--shared does not combine with --fork-every: a fork check's child shares the memory "
                 "its parent goes on writing")
    if args.cmd == "run":
        run(args)
        return 0
    return query(args)


if __name__ == "__main__":
    sys.exit(main())
