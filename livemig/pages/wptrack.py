"""Pre-copy with the kernel tracking writes, where there is no soft-dirty: userfaultfd
write-protection in asynchronous mode, read with PAGEMAP_SCAN (Linux 6.7+).

CRIU's pre-dump needs soft-dirty; without it pre-copy by page hashes (pagehash.py) reads and
hashes all of the tree's memory in every round, and once more while it is frozen: a downtime
that grows with the memory. Yet the kernel can record writes without soft-dirty: a range
registered with a userfaultfd made with UFFD_FEATURE_WP_ASYNC and write-protected is not
faulted on when written, the kernel just lifts the protection of the written page; and
PAGEMAP_SCAN, an ioctl on /proc/PID/pagemap, lists the pages whose protection is gone and,
with PM_SCAN_WP_MATCHING, protects them again in the same call. No released CRIU does this.

A userfaultfd belongs to the memory of the process that made it, so each process of the tree
makes one (inject): one of its threads is stopped with ptrace (seized with its seccomp filter
suspended, every signal blocked meanwhile), runs userfaultfd() at a `syscall` instruction its
own code has (the vDSO's), livemig takes the descriptor (pidfd_getfd), the thread close()s its
copy, and its registers and signal mask are put back. A thread stopped in a system call is
put back to restart it, as CRIU's compel does. The workload sees a pause of a thread and
nothing else: its descriptor table is as it was. The descriptor made is user-mode-only, so
that vm.unprivileged_userfaultfd=0 allows it to any process; that affects only faults, and
asynchronous write-protection has none.

Each round (Watch.written) registers the process's private mappings (again: a new mapping is
not registered, and its pages then show as written) and takes the pages written since the
last round, protecting them again. A process forked since is watched from its first round on,
all of its pages written. What the kernel does not count as a write changes a page without
lifting its protection: MADV_DONTNEED leaves a marker in its place, a read after it maps the
zero page. So at the final pass (Watch.unchanged, the tree frozen) a page is trusted as sent
only if it is present, not the zero page, still protected, in a mapping still registered, and
read since its protection (the Tracker keeps that); every other page is read and compared by
hash as before. Direct I/O into pages pinned before they were protected is not seen either,
as soft-dirty does not see it.

Nothing is left for CRIU: the watched processes' descriptor tables never keep the uffd; the
registrations end, and with them every protection, when livemig closes its copies (close()).
A process that holds a userfaultfd of its own (its ranges registered already: EBUSY), that is
stopped, traced, or whose thread cannot be stopped is not watched: its pages are compared by
hash as before, and the move says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import signal
import struct
import time
from dataclasses import dataclass

from .. import proc
from ..errors import LivemigError, Phase
from ..options import WAITS
from .uffd import UFFD_API, UFFDIO_API, UFFDIO_REGISTER

PAGE = 4096
FEATURE = "uffd_wp_async"     # its row among the hosts' features: write-protect tracking works here
# <linux/fs.h>: PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg), its twelve u64
_SCAN_ARG = struct.Struct("<12Q")
PAGEMAP_SCAN = (3 << 30) | (_SCAN_ARG.size << 16) | (ord("f") << 8) | 16
PM_SCAN_WP_MATCHING = 1 << 0
IS_WPALLOWED, IS_WRITTEN, IS_FILE, IS_PRESENT, IS_SWAPPED, IS_PFNZERO = (1 << i for i in range(6))
_REGION = struct.Struct("<3Q")        # struct page_region {start, end, categories}
_REGIONS = 4096                       # regions per call: a call that fills them goes on from walk_end
# <linux/userfaultfd.h>
UFFD_USER_MODE_ONLY = 1
FEATURE_WP_UNPOPULATED, FEATURE_WP_ASYNC = 1 << 13, 1 << 15
REGISTER_MODE_WP = 1 << 1
_API = struct.Struct("<3Q")
_REGISTER = struct.Struct("<4Q")

# x86-64: system call numbers, ptrace requests and options
SYS_USERFAULTFD, SYS_CLOSE, SYS_PIDFD_GETFD, SYS_RESTART = 323, 3, 438, 219
PTRACE_SYSCALL, PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH = 24, 12, 13, 17
PTRACE_CONT, PTRACE_SEIZE, PTRACE_INTERRUPT = 7, 0x4206, 0x4207
PTRACE_GETSIGMASK, PTRACE_SETSIGMASK = 0x420A, 0x420B
PTRACE_O_TRACESYSGOOD, PTRACE_O_SUSPEND_SECCOMP = 1, 1 << 21
PTRACE_EVENT_STOP = 128
_WALL = 0x40000000
_RESTARTS = {-512, -513, -514}       # ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND
_RESTART_BLOCK = -516
_SYSCALL_INSN = b"\x0f\x05"
_FIELDS = ["r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs"]


class _Regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in _FIELDS]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long
_libc.syscall.restype = ctypes.c_long


class Unwatched(LivemigError):
    """This process cannot be watched: why, in words. Never a move's failure: the process is
    compared by hash instead, and the move says so."""

    def __init__(self, message: str):
        super().__init__(message, phase=Phase.PRECOPY)


class Gone(Unwatched):
    """It exited (a zombie, or reaped): no memory to watch, nothing to say."""


def available() -> str:
    """'' if this kernel and machine can track writes so (tried on a mapping of our own), else
    why not, in words."""
    if platform.machine() != "x86_64":
        return f"write-protect tracking is built for x86-64 only, not {platform.machine()}"
    fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    if fd < 0:
        return f"userfaultfd: {os.strerror(ctypes.get_errno())}"
    buf = ctypes.create_string_buffer(PAGE * 2)
    try:
        _api(fd)
        start = (ctypes.addressof(buf) + PAGE - 1) & ~(PAGE - 1)
        _register(fd, start, start + PAGE)
        with open("/proc/self/pagemap", "rb", buffering=0) as pm:
            _scan(pm.fileno(), start, start + PAGE, True)
    except OSError as e:
        return f"userfaultfd write-protection or PAGEMAP_SCAN: {e.strerror}"
    finally:
        os.close(fd)
    return ""


def _api(fd: int) -> None:
    arg = bytearray(_API.pack(UFFD_API, FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED, 0))
    fcntl.ioctl(fd, UFFDIO_API, arg)


def _register(fd: int, start: int, end: int) -> None:
    fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(_REGISTER.pack(start, end - start, REGISTER_MODE_WP, 0)))


def _scan(pagemap_fd: int, start: int, end: int, protect: bool) -> list[tuple[int, int]]:
    """protect: the runs (first, end) of pages in [start, end) written since they were last
    protected, protected again. Else: the runs of pages that surely hold what they held when
    last protected (present, not the zero page, protected, in a registered mapping)."""
    vec = (ctypes.c_byte * (_REGION.size * _REGIONS))()
    if protect:
        flags, mask, inverted, anyof, want = (PM_SCAN_WP_MATCHING, IS_WRITTEN, 0,
                                              IS_PRESENT | IS_SWAPPED, IS_WRITTEN)
    else:
        flags, inverted = 0, IS_WRITTEN | IS_PFNZERO
        mask, anyof, want = IS_WPALLOWED | IS_PRESENT | inverted, 0, IS_PRESENT
    out: list[tuple[int, int]] = []
    at = start
    while at < end:
        arg = bytearray(_SCAN_ARG.pack(_SCAN_ARG.size, flags, at, end, 0, ctypes.addressof(vec), _REGIONS,
                                       0, inverted, mask, anyof, want))
        n = fcntl.ioctl(pagemap_fd, PAGEMAP_SCAN, arg)
        for i in range(n):
            first, last, _ = _REGION.unpack_from(vec, i * _REGION.size)
            if out and out[-1][1] == first:
                out[-1] = (out[-1][0], last)
            else:
                out.append((first, last))
        walk_end = _SCAN_ARG.unpack(arg)[4]
        if walk_end <= at or (n < _REGIONS and walk_end >= end):
            break
        at = walk_end
    return out


@dataclass
class Watch:
    """One process's writes, as its userfaultfd and pagemap tell them."""
    pid: int
    uffd: int
    pagemap: int

    def written(self, start: int, end: int) -> list[tuple[int, int]] | None:
        """The runs of [start, end) written since the last call (all present pages, the first
        time), protected again; None if the range cannot be watched (it changed meanwhile, or
        is a kind the kernel will not register): the caller compares it by hash."""
        try:
            _register(self.uffd, start, end)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise Unwatched("it holds a userfaultfd of its own") from None
            return None
        try:
            return _scan(self.pagemap, start, end, True)
        except OSError:
            return None

    def unchanged(self, start: int, end: int) -> list[tuple[int, int]]:
        """The runs of [start, end) that surely hold what they held when last protected
        (the tree frozen: nothing is protected again)."""
        try:
            return _scan(self.pagemap, start, end, False)
        except OSError:     # nothing is vouched for: every page is read and compared
            return []

    def close(self) -> None:
        for fd in (self.uffd, self.pagemap):
            with contextlib.suppress(OSError):      # closed already: nothing of it is left
                os.close(fd)
        self.uffd = self.pagemap = -1


def watch(pid: int) -> Watch:
    """A Watch of pid's memory, its userfaultfd made by one of its threads. Unwatched: why not."""
    state = proc.state(pid)
    if state is None or state in "ZX":
        raise Gone("it has exited")
    if state in "Tt":
        raise Unwatched("it is stopped")
    if proc.tracer(pid):
        raise Unwatched("another process traces it")
    pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        uffd = _made_in(pid)
        try:
            _api(uffd)
        except OSError as e:
            os.close(uffd)
            raise Unwatched(f"its userfaultfd refused write-protection: {e.strerror}") from None
    except BaseException:
        os.close(pagemap)
        raise
    return Watch(pid, uffd, pagemap)


def _syscall_insn(pid: int) -> int:
    """The address of a `syscall` instruction in pid's own code: the vDSO's first."""
    maps = proc.mappings(pid)
    order = [m for m in maps if m[3] == "[vdso]"] + [m for m in maps if m[2][2] == "x" and m[3] != "[vdso]"]
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, _, _ in order:
            try:
                code = os.pread(mem.fileno(), min(end - start, 1 << 20), start)
            except OSError:     # not readable (vsyscall): the next one
                continue
            if (i := code.find(_SYSCALL_INSN)) >= 0:
                return start + i
    raise Unwatched("no syscall instruction found in its code")


def _ptrace(request: int, tid: int, addr: int = 0, data=0) -> int:
    ret = _libc.ptrace(request, tid, addr, data)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}): {os.strerror(err)}")
    return ret


def _wait(tid: int) -> int:
    """The tracee's next stop (its wait status), within WAITS.wp_inject."""
    deadline = time.monotonic() + WAITS.wp_inject
    while True:
        got, status = os.waitpid(tid, os.WNOHANG | _WALL)
        if got:
            if not os.WIFSTOPPED(status):
                raise Unwatched("it exited while its userfaultfd was made")
            return status
        if time.monotonic() > deadline:
            raise Unwatched(f"its thread {tid} did not stop within {WAITS.wp_inject:.0f} s")
        time.sleep(WAITS.wp_inject_poll)


def _run(tid: int, base: _Regs, insn: int, nr: int, *args: int) -> int:
    """nr(*args) run by the stopped thread tid, at insn; its return value."""
    regs = _Regs.from_buffer_copy(base)
    regs.rip, regs.rax, regs.orig_rax = insn, nr, 2**64 - 1
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, value)
    _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))
    for _ in range(2):          # the syscall's entry, then its exit
        _ptrace(PTRACE_SYSCALL, tid)
        status = _wait(tid)
        if os.WSTOPSIG(status) != signal.SIGTRAP | 0x80:
            raise Unwatched(f"its thread stopped otherwise (signal {os.WSTOPSIG(status)}) while its "
                            "userfaultfd was made")
    _ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return ctypes.c_int64(regs.rax).value


def _made_in(pid: int) -> int:
    """A userfaultfd made by one of pid's threads, as a descriptor here."""
    tids = [t for t in proc.threads(pid) if proc.state(t) not in (None, "Z", "X")]
    if not tids:
        raise Unwatched("none of its threads runs")
    tid, insn = tids[0], _syscall_insn(pid)
    try:
        _ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_SUSPEND_SECCOMP)
    except OSError as e:
        raise Unwatched(f"ptrace: {e.strerror}") from None
    saved, mask, blocked = _Regs(), ctypes.c_uint64(), ctypes.c_uint64(2**64 - 1)
    held = resumed = False      # held: its registers and mask are saved, to be put back
    try:
        _ptrace(PTRACE_INTERRUPT, tid)
        while True:
            status = _wait(tid)
            if status >> 16 == PTRACE_EVENT_STOP:
                if os.WSTOPSIG(status) != signal.SIGTRAP:
                    raise Unwatched("it was being stopped")
                break
            _ptrace(PTRACE_CONT, tid, 0, os.WSTOPSIG(status))     # a signal on its way: delivered
        _ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(saved))
        _ptrace(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
        held = True
        _ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(blocked))
        back = _resumable(saved)
        made = _run(tid, back, insn, SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
        if made < 0:
            raise Unwatched(f"its userfaultfd(): {os.strerror(-made)}")
        try:
            pidfd = os.pidfd_open(pid)
            try:
                fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, made, 0)
                if fd < 0:
                    raise Unwatched(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(pidfd)
        finally:
            _run(tid, back, insn, SYS_CLOSE, made)
        _ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(mask))
        _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(back))
        resumed = True
        return fd
    except OSError as e:
        raise Unwatched(f"ptrace: {e.strerror}") from None
    finally:
        if held and not resumed:
            # put back what can be (a thread killed meanwhile refuses: nothing to put back)
            with contextlib.suppress(OSError):
                _ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(mask))
                _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(_resumable(saved)))
        with contextlib.suppress(OSError):      # gone: no tracee left to let go of
            _ptrace(PTRACE_DETACH, tid)


def _resumable(saved: _Regs) -> _Regs:
    """saved, as the thread resumes after the injected calls: a system call that the stop
    interrupted is restarted (as the kernel would have, had it not been used meanwhile)."""
    back = _Regs.from_buffer_copy(saved)
    if ctypes.c_int64(saved.orig_rax).value >= 0:
        ret = ctypes.c_int64(saved.rax).value
        if ret in _RESTARTS:
            back.rax, back.rip = saved.orig_rax, saved.rip - 2
        elif ret == _RESTART_BLOCK:
            back.rax, back.rip = SYS_RESTART, saved.rip - 2
    back.orig_rax = 2**64 - 1      # no restart of its own on the way out
    return back

