"""userfaultfd from Python: what a post-copy page placer of livemig's own needs (issue 9).

CRIU's lazy-pages daemon asks its page server for one page per fault and spins while it
waits, so a workload that keeps faulting gets its memory at a few hundred pages a second.
QEMU's post-copy does better by placing pages as they arrive: every page the source
pushes is copied into the process at once (UFFDIO_COPY), and only pages touched before
they arrive fault. This module is the kernel side of that: a uffd's events, and copying
pages into the process it belongs to. The restore hands each task's uffd over on
CRIU's lazy-pages socket; the uffd is already registered for the task's lazy ranges.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

PAGE = 4096


def _iowr(nr: int, size: int, read_only: bool = False) -> int:
    direction = 2 if read_only else 3          # _IOR or _IOWR, as <linux/userfaultfd.h> has them
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


UFFD_API = 0xAA
UFFDIO_API = _iowr(0x3F, 24)          # struct uffdio_api {api, features, ioctls}
UFFDIO_REGISTER = _iowr(0x00, 32)     # struct uffdio_register {start, len, mode, ioctls}
UFFDIO_WAKE = _iowr(0x02, 16, read_only=True)
UFFDIO_COPY = _iowr(0x03, 40)         # struct uffdio_copy {dst, src, len, mode, copy}
REGISTER_MODE_MISSING = 1

_MSG = struct.Struct("<B3xI24s")      # struct uffd_msg: event, reserved, the event's arguments
MSG_SIZE = _MSG.size                  # 32

EVENT_PAGEFAULT, EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16


@dataclass(frozen=True)
class PageFault:
    address: int            # the faulting address, page-aligned
    write: bool


@dataclass(frozen=True)
class Fork:
    uffd: int               # the child's own uffd, a new fd in this process


@dataclass(frozen=True)
class Remap:
    old: int
    new: int
    length: int


@dataclass(frozen=True)
class Removed:
    """MADV_DONTNEED or munmap: the range needs no pages any more."""
    start: int
    end: int
    unmapped: bool


Event = PageFault | Fork | Remap | Removed


def parse(data: bytes) -> list[Event]:
    """The events in what a read() of a uffd returned (a whole number of uffd_msg)."""
    events: list[Event] = []
    for off in range(0, len(data) - len(data) % MSG_SIZE, MSG_SIZE):
        kind, _, args = _MSG.unpack_from(data, off)
        if kind == EVENT_PAGEFAULT:
            flags, address = struct.unpack_from("<QQ", args)
            events.append(PageFault(address & ~(PAGE - 1), bool(flags & 1)))
        elif kind == EVENT_FORK:
            events.append(Fork(struct.unpack_from("<I", args)[0]))
        elif kind == EVENT_REMAP:
            events.append(Remap(*struct.unpack_from("<QQQ", args)))
        elif kind in (EVENT_REMOVE, EVENT_UNMAP):
            start, end = struct.unpack_from("<QQ", args)
            events.append(Removed(start, end, kind == EVENT_UNMAP))
        else:
            raise ValueError(f"unknown userfaultfd event {kind:#x}")
    return events


def read_events(fd: int) -> list[Event]:
    """What the uffd has to say now ([] if nothing: the fd is non-blocking)."""
    try:
        return parse(os.read(fd, MSG_SIZE * 64))
    except BlockingIOError:
        return []


class Gone(Exception):
    """The process behind the uffd has exited (or the range is no longer there)."""


def copy(fd: int, address: int, pages: bytes | bytearray | memoryview) -> int:
    """Place pages at address in the uffd's process, waking whoever waits on them. The
    number of bytes placed: 0 if they were there already (a fault's copy came first)."""
    n = len(pages)
    buf = (ctypes.c_char * n).from_buffer_copy(pages)
    arg = bytearray(struct.pack("<QQQQq", address, ctypes.addressof(buf), n, 0, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_COPY, arg, True)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return 0
        if e.errno in (errno.ENOENT, errno.ESRCH):
            raise Gone(str(e)) from None
        raise
    return struct.unpack_from("<q", arg, 32)[0]


# --- creating one: what CRIU's restorer does for each task (and the tests) -------------------------
_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}


def create(nonblocking: bool = True) -> int:
    """A new uffd for this process, its API agreed."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_NR_USERFAULTFD[os.uname().machine], os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd: " + os.strerror(ctypes.get_errno()))
    fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("<QQQ", UFFD_API, 0, 0)), True)
    return fd


def register(fd: int, address: int, length: int) -> None:
    """Every missing page in [address, address + length) faults to this uffd."""
    fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", address, length, REGISTER_MODE_MISSING, 0)),
                True)
