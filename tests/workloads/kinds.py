"""One process tree holding at once every kind of kernel object and process state that plain
CRIU carries from host to host (the survey of issue 32), for the lab's tests that livemig
carries them too.

    python3 kinds.py prepare --port P           this host's paths for a tree on port P
    python3 kinds.py run --port P [--pid N] [--daemon] [--also KIND]...
    python3 kinds.py query --port P [--wait S]

The root holds, itself: pipes, a FIFO, unix stream, datagram and seqpacket pairs with
unread data, a listening unix socket, a TCP listener (the one queries come to), a TCP
connection with both ends in the tree and unread bytes, a bound UDP socket, a timerfd, an
eventfd, a signalfd with its signal pending, an epoll set, an inotify watch (on /tmp, each
host's own tmpfs), a pty pair, a memfd, a private mapping of a file with a page written, an
open deleted file, a /dev/shm file mapped and then unlinked, a flock and an fcntl lock (on
files in /tmp), a POSIX timer, an interval timer, a signal handler, an ignored signal, a
blocked pending signal, three threads, limits, a cwd and a umask (kinds_files.py has the
objects held through files). Its children: one in a process group of its own, one in a
session of its own with a child in it, and one writing into memory it shares with the root
(MAP_SHARED|MAP_ANONYMOUS).

--also adds a kind plain CRIU cannot carry from host to host: an inotify watch on the
overlay root (inotify_overlay), SysV shared memory outside an IPC namespace of the tree's
own (sysv_shm), a /dev/shm file only this host has (posix_shm), a child in UTS and IPC
namespaces of its own (uts_ipc_ns), a userfaultfd (userfaultfd) and an io_uring instance
(io_uring): anonymous inodes CRIU has no handle for; a memfd sealed against writes and mapped
(memfd_sealed), which CRIU's restore maps before it seals, and fails.

Asked (query), the root looks at each kind and answers one JSON line: {"kinds": {kind: what
it holds}, "tasks": the tree's PIDs}, in values that are the same on any host, so that a
test compares them before and after a move. A look puts back what it consumed: it can be
asked again, before and after.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import mmap
import os
import resource
import signal
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass, field

import kinds_files  # beside this file, as memcounter
import memcounter

libc = kinds_files.libc
HERE = os.path.dirname(os.path.abspath(__file__))
TIMER_SIGNAL = signal.SIGRTMIN + 3
LOOK_WITHIN = 5.0       # seconds a look waits for what it waits for (a tick, a signal)


@dataclass
class Place:
    port: int
    inherited: list[int]                    # descriptors a child closes (the starter's pipe)
    tasks: dict = field(default_factory=dict)
    listener: socket.socket | None = None

    @property
    def dir(self) -> str:
        return f"/tmp/kinds-{self.port}"


def prepare(directory: str) -> None:
    """The paths the tree needs on every host it runs on: made where missing, fresh."""
    os.makedirs(f"{directory}/watched", exist_ok=True)
    if not os.path.exists(f"{directory}/fifo"):
        os.mkfifo(f"{directory}/fifo")
    for name in ("flock", "lockf"):             # empty: CRIU checks a file's size on restore
        open(f"{directory}/{name}", "w").close()


def _child(place: Place, body) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            for fd in place.inherited:
                os.close(fd)
            place.inherited.clear()         # this child's own copy: its children have none to close
            body()
        finally:
            os._exit(1)
    return pid


def _forever() -> None:
    while True:
        signal.pause()


def cwd(place):
    os.chdir(HERE)          # first: the children share it (the checkout: every host has it)
    return lambda: {"cwd": os.getcwd()}


def umask(place):
    os.umask(0o027)
    return lambda: {"umask": oct(os.umask(0o027))}     # read by setting it again


def rlimits(place):
    resource.setrlimit(resource.RLIMIT_NOFILE, (321, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    resource.setrlimit(resource.RLIMIT_CORE, (4096, 8192))
    return lambda: {"nofile_soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    "core": list(resource.getrlimit(resource.RLIMIT_CORE))}


def process_groups(place):
    told_r, told_w = os.pipe()

    def own_session():
        os.setsid()
        os.write(told_w, b"%d\n" % _child(place, _forever))    # its child, in its session and group
        _forever()

    root = os.getpid()
    group = _child(place, lambda: (os.setpgid(0, 0), _forever()))
    os.setpgid(group, group)        # the parent too: set whichever runs first
    session = _child(place, own_session)
    in_session = int(os.read(told_r, 32))       # written once its parent's setsid is done
    place.tasks.update(own_group=group, own_session=session, in_its_session=in_session)
    return lambda: {
        "root_leads": os.getpgid(root) == root == os.getsid(root),
        "own_group": os.getpgid(group) == group and os.getsid(group) == os.getsid(root),
        "own_session": os.getpgid(session) == session == os.getsid(session),
        "in_its_session": os.getpgid(in_session) == session == os.getsid(in_session)}


def shared_anon(place):
    memory = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    for i in range(8, len(memory), mmap.PAGESIZE):
        memory[i:i + 8] = i.to_bytes(8, "little")

    def count():
        while True:
            memory[0:8] = (int.from_bytes(memory[0:8], "little") + 1).to_bytes(8, "little")
            time.sleep(0.05)
    place.tasks["sharer"] = _child(place, count)

    def look():
        before = memory[0:8]
        while memory[0:8] == before and not (yield):
            pass
        return {"child_writes_seen": memory[0:8] != before,
                "pattern": all(memory[i:i + 8] == i.to_bytes(8, "little") for i in range(8, len(memory), 4096))}
    return look


def _counted(signo: int) -> list[int]:
    hits = [0]
    signal.signal(signo, lambda *_: hits.__setitem__(0, hits[0] + 1))
    return hits


def _fires(hits: list[int], before: int):
    """Has the signal come since hits was before? (a look's wait: see look)"""
    while hits[0] == before and not (yield):
        pass
    return hits[0] > before


def _sigbit(status: dict, key: str, signo: int) -> bool:
    return bool(int(status[key], 16) & 1 << (signo - 1))


def signals(place):
    hits = _counted(signal.SIGHUP)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # blocked before any thread starts, or a thread would take it and it would not stay pending
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGWINCH})
    os.kill(os.getpid(), signal.SIGWINCH)

    def look():
        with open("/proc/self/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        before = hits[0]
        os.kill(os.getpid(), signal.SIGHUP)
        return {"handled": (yield from _fires(hits, before)), "ignored": _sigbit(status, "SigIgn", signal.SIGTERM),
                "blocked": _sigbit(status, "SigBlk", signal.SIGWINCH),
                "pending": _sigbit(status, "ShdPnd", signal.SIGWINCH)}
    return look


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("interval", _Timespec), ("value", _Timespec)]


class _Sigevent(ctypes.Structure):
    _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("pad", ctypes.c_char * 48)]


def posix_timer(place):
    hits = _counted(TIMER_SIGNAL)
    timer = ctypes.c_void_p()
    quarter = _Timespec(0, 250_000_000)
    if (libc.timer_create(time.CLOCK_MONOTONIC, ctypes.byref(_Sigevent(signo=TIMER_SIGNAL, notify=0)),
                          ctypes.byref(timer))
            or libc.timer_settime(timer, 0, ctypes.byref(_Itimerspec(quarter, quarter)), None)):
        raise OSError(ctypes.get_errno(), "timer_create")

    def look():
        now = _Itimerspec()
        if libc.timer_gettime(timer, ctypes.byref(now)):
            raise OSError(ctypes.get_errno(), "timer_gettime")
        with open("/proc/self/timers") as f:
            listed = f"ID: {timer.value or 0}\n" in f.read()
        return {"interval": now.interval.sec + now.interval.nsec / 1e9, "listed": listed,
                "fires": (yield from _fires(hits, hits[0]))}
    return look


def itimer(place):
    hits = _counted(signal.SIGALRM)
    signal.setitimer(signal.ITIMER_REAL, 0.25, 0.25)

    def look():
        return {"interval": round(signal.getitimer(signal.ITIMER_REAL)[1], 6), "fires": (yield from _fires(hits, hits[0]))}
    return look


def threads(place):
    # last of the kinds: they start with every signal the root blocks blocked
    counts, tids = [0, 0, 0], []

    def count(i):
        tids.append(threading.get_native_id())
        while True:
            counts[i] += 1
            time.sleep(0.05)
    for i in range(3):
        threading.Thread(target=count, args=(i,), daemon=True).start()
    while len(tids) < 3:
        time.sleep(0.01)
    place.tasks["threads"] = sorted(tids)

    def look():
        before = list(counts)
        while not all(now > then for now, then in zip(counts, before)) and not (yield):
            pass
        return {"tasks": len(os.listdir("/proc/self/task")),
                "all_count": all(now > then for now, then in zip(counts, before))}
    return look


def tcp_listen(place):
    place.listener = socket.create_server(("0.0.0.0", place.port))
    return lambda: {"address": place.listener.getsockname()[0]}      # a query came to it


def inotify_overlay(place):
    watched = f"/root/kinds-{place.port}"       # the overlay root: CRIU has no handle for it
    os.makedirs(watched, exist_ok=True)
    return kinds_files.watch(watched)


def sysv_shm(place):
    libc.shmat.restype = ctypes.c_void_p
    segment = libc.shmget(0, 65536, 0o1000 | 0o600)         # IPC_PRIVATE, IPC_CREAT
    address = libc.shmat(segment, None, 0)
    if segment < 0 or address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "shmget")
    libc.shmctl(segment, 0, None)       # IPC_RMID: gone with its last user, as the tree dies
    ctypes.memmove(address, b"SYSVSHMDATA", 11)
    return lambda: {"data": ctypes.string_at(address, 11).decode()}


def posix_shm(place):
    fd = os.open(f"/dev/shm/kinds-only-here-{place.port}", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 65536)
    mapped = mmap.mmap(fd, 65536, flags=mmap.MAP_SHARED)
    os.close(fd)
    mapped[0:10] = b"POSIXSHMDT"
    return lambda: {"by_map": bytes(mapped[0:10]).decode()}


# (x86-64's and arm64's numbers: io_uring_setup came when both took new calls' numbers from one table)
SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}[os.uname().machine]
SYS_IO_URING_SETUP = 425


def userfaultfd(place):
    # user-mode only: allowed whatever vm.unprivileged_userfaultfd says
    fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | 1)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    return lambda: {"held": os.readlink(f"/proc/self/fd/{fd}")}


def io_uring(place):
    params = ctypes.create_string_buffer(120)       # struct io_uring_params, zeroed: the defaults
    fd = libc.syscall(SYS_IO_URING_SETUP, 4, params)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "io_uring_setup")
    return lambda: {"held": os.readlink(f"/proc/self/fd/{fd}")}


def memfd_sealed(place):
    fd = os.memfd_create("kinds-sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 65536)
    os.pwrite(fd, b"SEALEDDATA", 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    mapped = mmap.mmap(fd, 65536, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    return lambda: {"by_map": bytes(mapped[0:10]).decode(), "seals": fcntl.fcntl(fd, fcntl.F_GET_SEALS)}


def uts_ipc_ns(place):
    ask_r, ask_w = os.pipe()
    told_r, told_w = os.pipe()

    def answer():
        os.unshare(os.CLONE_NEWUTS | os.CLONE_NEWIPC)
        socket.sethostname("kinds-child")
        os.write(told_w, b"up")
        while os.read(ask_r, 1):
            os.write(told_w, socket.gethostname().encode())
    child = place.tasks["own_namespaces"] = _child(place, answer)
    os.read(told_r, 2)

    def look():
        os.write(ask_w, b"?")
        return {"hostname": os.read(told_r, 64).decode(),
                **{f"own_{ns}": os.readlink(f"/proc/{child}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
                   for ns in ("uts", "ipc")}}
    return look


# In this order: the children are forked before the signals are set and the threads start
FIRST = {f.__name__: f for f in (cwd, umask, rlimits, process_groups, shared_anon)}
LAST = {"signals": signals, **kinds_files.FILES, **{f.__name__: f for f in (posix_timer, itimer, threads, tcp_listen)}}
ALSO = {f.__name__: f for f in (inotify_overlay, sysv_shm, posix_shm, uts_ipc_ns, userfaultfd, io_uring,
                                 memfd_sealed)}


def look(looks: dict, within: float = LOOK_WITHIN) -> dict:
    """Each kind's answer. A look that waits (a generator) is stepped, with the others,
    until it answers, and told at last (sent True) that its time is up."""
    def stepped(look_at):
        got = look_at()
        return (yield from got) if isinstance(got, types.GeneratorType) else got
    waiting = {name: stepped(look_at) for name, look_at in looks.items()}
    answers: dict = {}
    deadline, late = time.monotonic() + within, None      # None: each one's first step
    while waiting:
        for name, steps in list(waiting.items()):
            try:
                steps.send(late)
                continue
            except StopIteration as done:
                answers[name] = done.value
            except Exception as e:  # noqa: BLE001 (a kind that fails says how; the others answer)
                answers[name] = {"error": repr(e)}
            del waiting[name]
        if waiting:
            time.sleep(0.02)
        late = time.monotonic() > deadline
    return {name: answers[name] for name in looks}


def serve(args: argparse.Namespace, ready_fd: int | None) -> None:
    place = Place(args.port, [] if ready_fd is None else [ready_fd], {"root": os.getpid()})
    prepare(place.dir)
    setups = {**FIRST, **{name: ALSO[name] for name in args.also}, **LAST}
    looks = {name: setup(place) for name, setup in setups.items()}
    if ready_fd is not None:
        os.write(ready_fd, f"{os.getpid()}\n".encode())
        os.close(ready_fd)
    assert place.listener is not None
    while True:
        conn, _ = place.listener.accept()
        with conn:
            conn.settimeout(LOOK_WITHIN * 2)
            conn.recv(64)
            conn.sendall(json.dumps({"kinds": look(looks), "tasks": place.tasks}).encode() + b"\n")


def options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--also", action="append", default=[], choices=list(ALSO),
                   help="a kind plain CRIU cannot carry from host to host, too")


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        ap = argparse.ArgumentParser(prog="kinds prepare")
        ap.add_argument("--port", type=int, required=True)
        prepare(Place(ap.parse_args(sys.argv[2:]).port, []).dir)
        sys.exit(0)
    sys.exit(memcounter.tree_main("kinds", serve, options))
