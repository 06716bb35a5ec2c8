"""The placer lets go of every uffd it was given or read (livemig/pages/placer.py): a
descriptor left open in the agent holds a copy's memory map, and a forked child's that
nobody reads leaves the child waiting on its faults for good. Two ways one stayed open,
each made to happen here on purpose (in the lab they came about 1 move in 25)."""

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from livemig.pages import placer, uffd
from livemig.pages.pagemap import PAGE, Range
from livemig.pages.placer import Placer


def held_of(fd: int) -> int:
    """How many of this process's descriptors are of fd's file (its duplicates, by inode: not
    by number, which another thread of the test run may take and free meanwhile)."""
    return held(os.fstat(fd).st_ino)


def held(ino: int) -> int:
    n = 0
    for one in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):      # the listing's own, or one closed meanwhile
            n += os.stat(f"/proc/self/fd/{one}").st_ino == ino
    return n


async def test_a_fill_cancelled_before_its_thread_began_leaves_no_duplicate_open(tmp_path):
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    gate = threading.Event()
    busy = asyncio.ensure_future(asyncio.to_thread(gate.wait))     # the executor's one thread, taken
    p = Placer(tmp_path, [Range(1, 0x10000, 4)])
    r, w = os.pipe()                         # stands for the copy's uffd
    p.tasks[1] = [placer._Task(1, r, [bytearray(b"\1") * 4], 4)]
    try:
        before = held_of(r)                  # (a pipe's two ends are one file)
        fill = asyncio.ensure_future(p._fill(1, 0x10000, 4, memoryview(bytes(4 * PAGE))))
        await asyncio.sleep(0.05)
        assert held_of(r) == before + 1      # its duplicate, lent to a thread that has not begun
        fill.cancel()                        # the executor drops the thread's work unstarted
        with contextlib.suppress(asyncio.CancelledError):
            await fill
        assert held_of(r) == before
    finally:
        gate.set()                           # (else the test run waits for that thread at its exit)
        await busy
        os.close(r)
        os.close(w)


async def test_a_fork_read_with_a_fault_of_a_parent_that_has_exited_is_taken_up(tmp_path, monkeypatch):
    p = Placer(tmp_path, [Range(1, 0x10000, 4)])
    (parent_fd, parent_w), (child_fd, child_w) = os.pipe(), os.pipe()    # stand for the two uffds
    parent_ino, child_ino = os.fstat(parent_fd).st_ino, os.fstat(child_fd).st_ino
    parent = placer._Task(1, parent_fd, [bytearray(b"\1") * 4], 4)
    p.tasks[1] = [parent]
    reads = iter([[uffd.PageFault(0x10000, False), uffd.Fork(child_fd)]])
    monkeypatch.setattr(uffd, "read_events", lambda fd: next(reads, []))

    def exited(*_args, **_kwargs):
        raise uffd.Gone("its process has exited")
    monkeypatch.setattr(p, "_fault", exited)
    p._drain(parent)
    assert parent.fd == -1 and held(parent_ino) == 1         # the parent's let go (its pipe's other end stays)
    child = p.tasks[1][1]
    assert child.fd == child_fd and child.forked and child.left == 4     # the child's taken up, lacking what it lacked
    p.close()
    assert held(child_ino) == 1
    os.close(parent_w)
    os.close(child_w)
