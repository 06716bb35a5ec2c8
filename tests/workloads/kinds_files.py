"""The kinds of kernel object a process holds through its open files, for kinds.py's tree:
each set up once, and looked at as often as asked, putting back what the look consumed.

Each `setup(place)` here makes its object and returns a look: a function that answers what
the object holds now, in values that do not depend on the host or the PIDs, so that the
same answer before and after a move says the object came through. A look may be a
generator: it yields while what it waits for (a tick, an event) has not come, and is sent
True once its caller stops waiting (kinds.look).

`place` is the tree's own directory (kinds.place: one on each host, /tmp being each host's
own) and its port.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import socket
import struct
import termios
import time

libc = ctypes.CDLL(None, use_errno=True)
IN_CREATE = 0x100
SIGNALFD_SIGNAL = signal.SIGRTMIN + 2
FILES = {}


def kind(setup):
    FILES[setup.__name__] = setup
    return setup


def _read(fd: int, n: int, wait: float = 1.0) -> bytes:
    """What fd has to read, waiting at most wait for it: b"" if nothing came."""
    ready, _, _ = select.select([fd], [], [], wait)
    return os.read(fd, n) if ready else b""


@kind
def pipe(place):
    r, w = os.pipe()
    os.write(w, b"PIPEDATA")

    def look():
        got = _read(r, 8)
        os.write(w, got)
        return {"unread": got.decode()}
    return look


@kind
def fifo(place):
    path = f"{place.dir}/fifo"
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(path, os.O_WRONLY)
    os.write(w, b"FIFODATA")

    def look():
        got = _read(r, 8)
        os.write(w, got)
        return {"unread": got.decode(), "named": os.readlink(f"/proc/self/fd/{r}") == path}
    return look


def _socketpair(of: socket.SocketKind):
    def setup(place):
        one, other = socket.socketpair(socket.AF_UNIX, of)
        for sock in (one, other):
            sock.settimeout(2)

        def queue():
            one.send(b"QUEUED1")
            one.send(b"QUEUED2")
            other.send(b"BACK")
        queue()

        def look():
            # a stream gives both sends as one run of bytes; datagrams and records, one by one
            got = [other.recv(14)] if of == socket.SOCK_STREAM else [other.recv(64), other.recv(64)]
            back = one.recv(64)
            queue()
            return {"unread": [g.decode() for g in got], "back": back.decode()}
        return look
    return setup


FILES.update(unix_stream=_socketpair(socket.SOCK_STREAM), unix_dgram=_socketpair(socket.SOCK_DGRAM),
             unix_seqpacket=_socketpair(socket.SOCK_SEQPACKET))


@kind
def unix_listen(place):
    path = f"{place.dir}/listen.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    server.settimeout(2)

    def look():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(2)
            client.connect(path)
            conn, _ = server.accept()
            with conn:
                client.send(b"hi")
                return {"accepts": conn.recv(2).decode()}
    return look


@kind
def tcp_established(place):
    # both ends in the tree, over loopback, with bytes the far end has not read
    server = socket.create_server(("127.0.0.1", place.port + 1))
    near = socket.create_connection(("127.0.0.1", place.port + 1))
    far, _ = server.accept()
    server.close()          # only the connection's two ends are left
    near.send(b"TCPQUEUED")
    for sock in (near, far):
        sock.settimeout(2)

    def look():
        got = far.recv(9)
        far.send(b"pong")
        back = near.recv(4)
        near.send(got)
        return {"unread": got.decode(), "back": back.decode()}
    return look


@kind
def udp(place):
    # CRIU drops a bound UDP socket's queued datagrams (plain CRIU as well): only the
    # socket is looked at, not a queue
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", place.port + 2))
    sock.settimeout(2)

    def look():
        sock.sendto(b"live", ("127.0.0.1", place.port + 2))
        return {"echo": sock.recv(64).decode()}
    return look


@kind
def timerfd(place):
    fd = os.timerfd_create(time.CLOCK_MONOTONIC, flags=os.TFD_NONBLOCK)
    os.timerfd_settime(fd, initial=0.25, interval=0.25)

    def look():
        _, interval = os.timerfd_gettime(fd)
        ticks = 0
        while not ticks:
            try:
                ticks = int.from_bytes(os.read(fd, 8), "little")
            except BlockingIOError:
                if (yield):
                    break
        return {"interval": round(interval, 6), "ticks": ticks > 0}
    return look


@kind
def eventfd(place):
    fd = os.eventfd(5, os.EFD_NONBLOCK)
    os.eventfd_write(fd, 3)

    def look():
        value = os.eventfd_read(fd)
        os.eventfd_write(fd, value)
        return {"counter": value}
    return look


@kind
def signalfd(place):
    # blocked before kinds.py starts its threads: they inherit the mask, and none takes it
    signal.pthread_sigmask(signal.SIG_BLOCK, {SIGNALFD_SIGNAL})
    mask = ctypes.create_string_buffer(struct.pack("<Q", 1 << (SIGNALFD_SIGNAL - 1)), 128)
    fd = libc.signalfd(-1, mask, os.O_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "signalfd")
    os.kill(os.getpid(), SIGNALFD_SIGNAL)

    def look():
        got = _read(fd, 128)
        os.kill(os.getpid(), SIGNALFD_SIGNAL)        # pending again, for the next look
        return {"pending_read": struct.unpack_from("<I", got)[0] == SIGNALFD_SIGNAL if got else False}
    return look


@kind
def epoll(place):
    r, w = os.pipe()
    edge = os.eventfd(0, os.EFD_NONBLOCK)
    os.write(w, b"x")
    poll = select.epoll()
    poll.register(r, select.EPOLLIN)
    poll.register(edge, select.EPOLLIN | select.EPOLLET)

    def look():
        ready = dict(poll.poll(2))
        os.eventfd_write(edge, 1)
        fired = dict(poll.poll(2))
        os.eventfd_read(edge)
        return {"level_ready": ready.get(r) == select.EPOLLIN, "edge_quiet": edge not in ready,
                "edge_fires": edge in fired}
    return look


def watch(path: str):
    """An inotify watch for files made in path: its look makes one, and says whether the
    event came."""
    fd = libc.inotify_init1(os.O_NONBLOCK)
    if fd < 0 or libc.inotify_add_watch(fd, path.encode(), IN_CREATE) < 0:
        raise OSError(ctypes.get_errno(), f"inotify on {path}")

    def look():
        name = f"made-{time.monotonic_ns()}"
        open(f"{path}/{name}", "w").close()
        got = _read(fd, 4096)
        os.unlink(f"{path}/{name}")
        return {"event": name.encode() in got}
    return look


@kind
def inotify(place):
    return watch(f"{place.dir}/watched")     # in /tmp: each host's own tmpfs


@kind
def pty(place):
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    os.write(master, b"PTYQUEUED\n")

    def look():
        unread = _read(slave, 64)
        os.write(master, b"ping\n")
        got = _read(slave, 64)
        os.write(master, b"PTYQUEUED\n")
        return {"unread": unread.decode(), "reads": got.decode(),
                "echo": bool(termios.tcgetattr(slave)[3] & termios.ECHO)}
    return look


@kind
def memfd(place):
    fd = os.memfd_create("kinds")
    os.ftruncate(fd, 65536)
    os.pwrite(fd, b"MEMFDDATA", 0)
    mapped = mmap.mmap(fd, 65536, flags=mmap.MAP_SHARED)
    mapped[4096:4105] = b"MAPPEDXYZ"

    def look():
        mapped[8192:8196] = b"live"
        return {"by_fd": os.pread(fd, 9, 0).decode(), "by_map": os.pread(fd, 9, 4096).decode(),
                "shared": os.pread(fd, 4, 8192) == b"live"}
    return look


@kind
def private_file_map(place):
    # this file: the same on every host (the lab's checkout), one page of it written to
    with open(os.path.abspath(__file__), "rb") as f:
        original = f.read(4096)
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mapped[0:4] = b"COW!"

    def look():
        return {"written": bytes(mapped[0:4]).decode(), "rest_as_file": mapped[4:4096] == original[4:]}
    return look


@kind
def deleted_file(place):
    fd = os.open(f"{place.dir}/ghost", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"GHOSTDATA" * 100)
    os.unlink(f"{place.dir}/ghost")

    def look():
        return {"content": os.pread(fd, 900, 0) == b"GHOSTDATA" * 100,
                "deleted": os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)")}
    return look


@kind
def shm_unlinked(place):
    # a /dev/shm file mapped, then unlinked (shm_unlink): only the tree holds it
    path = f"/dev/shm/kinds-{place.port}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 65536)
    mapped = mmap.mmap(fd, 65536, flags=mmap.MAP_SHARED)
    mapped[0:10] = b"POSIXSHMDT"
    os.unlink(path)

    def look():
        return {"by_map": bytes(mapped[0:10]).decode(), "by_fd": os.pread(fd, 10, 0).decode(),
                "deleted": os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)")}
    return look


def _held(path: str, lock) -> bool:
    """Is path locked against another process (a child that tries, and gives up at once)?"""
    pid = os.fork()
    if pid == 0:
        try:
            lock(os.open(path, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os._exit(0)
        except OSError as e:
            os._exit(3 if e.errno in (errno.EAGAIN, errno.EACCES) else 4)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3


def _locked(name: str, lock):
    def setup(place):
        path = f"{place.dir}/{name}"
        lock(os.open(path, os.O_RDWR), fcntl.LOCK_EX)
        return lambda: {"held": _held(path, lock)}
    return setup


FILES.update(flock=_locked("flock", fcntl.flock), fcntl_lock=_locked("lockf", fcntl.lockf))
