"""Write-protect tracking (livemig/pages/wptrack.py) on real processes of this machine's
kernel: no lab, but no fake either, since what is tested is what the kernel records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from livemig import proc
from livemig.pages import compare, pagehash, postcopy, wptrack
from livemig.pages.pagemap import PAGE, Range
from tests.waiting import eventually

PAGES = 1024
CHILD = textwrap.dedent(f"""
    import ctypes, fcntl, mmap, os, struct, sys, time
    m = mmap.mmap(-1, {PAGES} * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    for p in range({PAGES}):
        m[p * 4096:p * 4096 + 8] = struct.pack("<Q", p)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if sys.argv[1:] == ["own-uffd"]:
        libc = ctypes.CDLL(None, use_errno=True)
        uffd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK | 1)
        fcntl.ioctl(uffd, 0xC018AA3F, bytearray(struct.pack("<3Q", 0xAA, 0, 0)))
        fcntl.ioctl(uffd, 0xC020AA00, bytearray(struct.pack("<4Q", base, {PAGES} * 4096, 1, 0)))
    print(base, flush=True)
    for line in sys.stdin:
        what, arg = line.split()
        p = int(float(arg)) * 4096
        if what == "write":
            m[p + 8:p + 16] = b"written!"
        elif what == "drop":
            m.madvise(mmap.MADV_DONTNEED, p, 4096)
            m[p]         # a read: the zero page, with no write the kernel sees
        elif what == "sleep":
            time.sleep(float(arg))
        print("done", flush=True)
""")


class Child:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.base = int(self.proc.stdout.readline())
        self.end = self.base + PAGES * PAGE

    def do(self, what: str, page: float) -> None:
        self.proc.stdin.write(f"{what} {page}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def fds(self) -> list[str]:
        return sorted(os.readlink(f"/proc/{self.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{self.pid}/fd"))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def child():
    c = Child()
    yield c
    c.close()


def pages(runs) -> list[int]:
    return [p for a, b in runs for p in range(a // PAGE, b // PAGE)]


def in_buffer(child: Child, runs) -> list[tuple[int, int]]:
    """The runs a scan of the whole process sent that are the child's buffer's (the rest is
    the interpreter's own memory)."""
    return [(r.vaddr, r.pages) for r in runs if child.base <= r.vaddr < child.end]


def test_this_kernel_can_track_writes_so():
    # the machines livemig runs its tests on have it (kernel 6.18, x86-64): a failure here is the finding
    assert wptrack.available() == ""


def test_the_kernel_tells_exactly_the_pages_written_since_the_last_look_and_the_workload_sees_nothing(child):
    fds = child.fds()
    watch = wptrack.watch(child.pid)
    try:
        assert child.fds() == fds          # the descriptor it made is closed again on its side
        assert pages(watch.written(child.base, child.end)) == list(range(child.base // PAGE, child.end // PAGE))
        assert watch.written(child.base, child.end) == []
        child.do("write", 5)
        child.do("write", 700)
        assert pages(watch.written(child.base, child.end)) == [child.base // PAGE + 5, child.base // PAGE + 700]
        assert watch.written(child.base, child.end) == []
        # a thread stopped in a system call (sleep) is put back to finish it: the child answers after it
        child.proc.stdin.write("sleep 0.3\n")
        child.proc.stdin.flush()
        other = wptrack.watch(child.pid)
        other.close()
        assert child.proc.stdout.readline() == "done\n"
    finally:
        watch.close()
    child.do("write", 6)        # unprotected now: writes as ever


def test_the_final_comparison_reads_only_what_was_written_or_cannot_be_vouched_for(child):
    tracker = pagehash.Tracker(watching=True)
    try:
        assert sum(n for _, n in in_buffer(child, tracker.scan(child.pid, 1))) == PAGES
        child.do("write", 5)
        assert in_buffer(child, tracker.scan(child.pid, 1)) == [(child.base + 5 * PAGE, 1)]
        child.do("write", 9)            # after the last round: the final pass must find it
        child.do("drop", 20)            # its content changed with no write: never vouched for
        os.kill(child.pid, signal.SIGSTOP)      # frozen, as for the final dump
        tracker.settle()
        unread = [(a, n) for a, n, same in tracker.known(1, child.base, PAGES) if not same]
        assert unread == [(child.base + 9 * PAGE, 1), (child.base + 20 * PAGE, 1)]
        assert tracker.settled_pages >= PAGES - 2
        with open(f"/proc/{child.pid}/mem", "rb", buffering=0) as mem:
            runs = compare.read_compared(tracker, mem.fileno(), 1, child.base, PAGES, bytearray(PAGES * PAGE))
        changed = [(a, n, bytes(data)) for a, n, was_changed, data in runs if was_changed]
        assert [(a, n) for a, n, _ in changed] == [(child.base + 9 * PAGE, 1), (child.base + 20 * PAGE, 1)]
        assert changed[0][2][8:16] == b"written!" and changed[1][2] == bytes(PAGE)
        assert sum(n for _, n, was_changed, _ in runs if not was_changed) == PAGES - 2
        # a fill's push names what the watch vouches for in a few frames, and reads the rest
        whole = [Range(1, child.base, PAGES)]
        slots = list(postcopy.chunks(whole, pagehash.CHUNK_PAGES, aligned=True))
        for most in (pagehash.CHUNK_PAGES * 8, 300):
            plan = list(compare.planned(tracker, whole, pagehash.CHUNK_PAGES, most))
            assert [(p.vaddr, p.pages) for p in plan if not p.named] == \
                [(v, n) for _, v, n in slots if v <= child.base + 9 * PAGE < v + n * PAGE
                 or v <= child.base + 20 * PAGE < v + n * PAGE]
            assert sum(p.pages - p.vouched for p in plan) == 2
            assert [a for p in plan for a in range(p.vaddr, p.vaddr + p.pages * PAGE, PAGE)] == \
                list(range(child.base, child.end, PAGE))
            assert max(p.pages for p in plan if p.named) <= max(most, pagehash.CHUNK_PAGES)
        # never across two ranges, even where one ends as the next begins: a frame is placed in one
        halves = [Range(1, child.base, PAGES // 2), Range(1, child.base + PAGES // 2 * PAGE, PAGES // 2)]
        plan = list(compare.planned(tracker, halves, pagehash.CHUNK_PAGES, PAGES))
        assert all(any(r.vaddr <= p.vaddr and p.vaddr + p.pages * PAGE <= r.vaddr + r.pages * PAGE for r in halves)
                   for p in plan)
    finally:
        tracker.close()
        os.kill(child.pid, signal.SIGCONT)


def test_a_process_with_a_userfaultfd_of_its_own_is_compared_by_hash_and_said_so():
    child = Child("own-uffd")
    tracker = pagehash.Tracker(watching=True)
    try:
        assert sum(n for _, n in in_buffer(child, tracker.scan(child.pid, 1))) == PAGES   # all sent all the same
        assert tracker.unwatched == {1: "it holds a userfaultfd of its own"} and tracker.watches == {}
        child.do("write", 3)
        assert in_buffer(child, tracker.scan(child.pid, 1)) == [(child.base + 3 * PAGE, 1)]
        tracker.settle()
        assert all(not same for _, _, same in tracker.known(1, child.base, PAGES))
    finally:
        tracker.close()
        child.close()


def test_a_stopped_process_is_not_watched(child):
    os.kill(child.pid, signal.SIGSTOP)
    try:
        # stopped, as the kernel has it, before it is looked at: a signal is delivered when the
        # process next runs, which on a busy machine is a moment later
        eventually(lambda: proc.state(child.pid), lambda state: state in ("T", "t"))
        with pytest.raises(wptrack.Unwatched, match="it is stopped"):
            wptrack.watch(child.pid)
    finally:
        os.kill(child.pid, signal.SIGCONT)
    # nothing was left behind: it runs as before
    child.do("write", 1)
