"""userfaultfd from Python: the kernel's side of post-copy's page placer (placer.py).

A uffd's events (faults, and the forks, moves and removals of the memory it covers), and
placing pages into the process it belongs to. CRIU's restore creates one per task and
registers the task's lazy ranges with it before handing it over.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import LivemigError

PAGE = 4096


def _iowr(nr: int, size: int, read_only: bool = False) -> int:
    direction = 2 if read_only else 3          # _IOR or _IOWR, as <linux/userfaultfd.h> has them
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


UFFD_API = 0xAA
UFFDIO_API = _iowr(0x3F, 24)          # struct uffdio_api {api, features, ioctls}
UFFDIO_REGISTER = _iowr(0x00, 32)     # struct uffdio_register {start, len, mode, ioctls}
UFFDIO_UNREGISTER = _iowr(0x01, 16, read_only=True)   # struct uffdio_range {start, len}
UFFDIO_WAKE = _iowr(0x02, 16, read_only=True)
UFFDIO_COPY = _iowr(0x03, 40)         # struct uffdio_copy {dst, src, len, mode, copy}
UFFDIO_ZEROPAGE = _iowr(0x04, 32)     # struct uffdio_zeropage {start, len, mode, zeropage}
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
    except BlockingIOError:     # nothing to read now: the fd does not block
        return []


class Gone(LivemigError):
    """The process behind the uffd has exited. The placer catches it: nothing more goes
    to that process."""


class Busy(LivemigError):
    """The process's memory map is changing (a fork, mremap, munmap or madvise): the uffd
    has an event to be read first, after which the same call goes through. The placer
    catches it and tries again."""

    def __init__(self, done: int = 0):
        super().__init__("the memory map is changing")
        self.done = done     # bytes of the data dealt with (placed or skipped) before it said so


def _source(data: memoryview):
    """A ctypes view of data for the kernel to read: writable memory (the store's pages) is
    read where it is, saving a copy; read-only bytes (off the wire) are copied first."""
    n = len(data)
    if not data.readonly and data.c_contiguous:
        return (ctypes.c_char * n).from_buffer(data)
    return (ctypes.c_char * n).from_buffer_copy(data)


def _copy(fd: int, address: int, data: memoryview) -> tuple[int, int]:
    """One UFFDIO_COPY: (bytes placed, the errno that stopped it, or 0)."""
    n = len(data)
    buf = _source(data)
    arg = bytearray(struct.pack("<QQQQq", address, ctypes.addressof(buf), n, 0, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_COPY, arg, True)
        return n, 0
    except OSError as e:
        done = struct.unpack_from("<q", arg, 32)[0]
        return max(done, 0), e.errno or 0


def _stop(err: int, done: int) -> None:
    if err == errno.EAGAIN:
        raise Busy(done)
    if err in (errno.ESRCH, errno.ENOSPC):    # ENOSPC: newer kernels, once the mm is gone
        raise Gone(os.strerror(err))
    raise OSError(err, os.strerror(err))


def place(fd: int, address: int, data) -> int:
    """Copy data's pages to address in the uffd's process, waking whoever waits on them;
    bytes placed. A page there already (EEXIST: a fault's copy came first, or a child
    inherited it) or no longer mapped (ENOENT: unmapped, or beyond the end of its VMA, as a
    run that spans two VMAs is, which the kernel refuses whole) is skipped, one page at a
    time where the run as a whole was refused. Raises Busy or Gone."""
    data = memoryview(data)
    off = placed = 0
    while off < len(data):
        done, err = _copy(fd, address + off, data[off:])
        off, placed = off + done, placed + done
        if not err:
            break
        if err == errno.EAGAIN and done:
            continue           # what the kernel says of a copy cut short: the rest, again
        if err in (errno.EEXIST, errno.ENOENT):
            one, err = _copy(fd, address + off, data[off:off + PAGE])
            if err and err not in (errno.EEXIST, errno.ENOENT):
                _stop(err, off)
            off, placed = off + PAGE, placed + one
            continue
        _stop(err, off)
    return placed


def zero(fd: int, address: int, length: int = PAGE) -> None:
    """Map zeros where nothing was ever written (a page the image does not have)."""
    arg = bytearray(struct.pack("<QQQq", address, length, 0, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_ZEROPAGE, arg, True)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOENT):
            _stop(e.errno or 0, 0)


def wake(fd: int, address: int, length: int = PAGE) -> None:
    """Wake threads waiting on pages that are there (placed while their fault was queued)."""
    # refused only once the range or the process is gone: then nobody waits there
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, UFFDIO_WAKE, struct.pack("<QQ", address, length))


# The top of a process's address space as kernels set it, highest first (x86-64 with five levels
# of page table, AArch64 with 52 and 48 bits, x86-64 with four): UFFDIO_WAKE refuses a range past
# the process's own (EINVAL), and the first it takes covers all of it.
_TOPS = ((1 << 56) - PAGE, 1 << 52, 1 << 48, (1 << 47) - PAGE)


def wake_all(fd: int) -> None:
    """Wake every thread that waits on fd: a fault read by an agent that died before it
    answered it faults again, and is read anew."""
    try:
        lowest = int(Path("/proc/sys/vm/mmap_min_addr").read_text()) or PAGE
    except (OSError, ValueError):
        lowest = 1 << 16          # the kernel's default: nothing is ever mapped below
    lowest = -(-lowest // PAGE) * PAGE
    for top in _TOPS:
        try:
            fcntl.ioctl(fd, UFFDIO_WAKE, struct.pack("<QQ", lowest, top - lowest))
            return
        except OSError as e:
            if e.errno in (errno.ENOMEM, errno.ESRCH):      # what the kernel says once the process is gone
                raise Gone(os.strerror(e.errno)) from None
            if e.errno != errno.EINVAL:
                raise


def unregister(fd: int, address: int, length: int) -> None:
    """Faults in the range no longer come here: the kernel fills them (zeros)."""
    try:
        fcntl.ioctl(fd, UFFDIO_UNREGISTER, struct.pack("<QQ", address, length))
    except OSError as e:
        if e.errno == errno.ENOMEM:          # what the kernel says once the process is gone
            raise Gone(os.strerror(e.errno)) from None
        if e.errno != errno.EINVAL:          # the range is no longer mapped: nothing to undo
            raise


# --- creating one: what CRIU's restorer does for each task (and the tests) -------------------------
_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}


FEATURE_EVENT_FORK, FEATURE_EVENT_REMAP, FEATURE_EVENT_REMOVE, FEATURE_EVENT_UNMAP = 1 << 1, 1 << 2, 1 << 3, 1 << 6
CRIU_FEATURES = FEATURE_EVENT_FORK | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP   # its restore's


def create(nonblocking: bool = True, features: int = 0) -> int:
    """A new uffd for this process, its API agreed (with the events in features)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_NR_USERFAULTFD[os.uname().machine], os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd: " + os.strerror(ctypes.get_errno()))
    fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("<QQQ", UFFD_API, features, 0)), True)
    return fd


def register(fd: int, address: int, length: int) -> None:
    """Every missing page in [address, address + length) faults to this uffd."""
    fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", address, length, REGISTER_MODE_MISSING, 0)),
                True)
