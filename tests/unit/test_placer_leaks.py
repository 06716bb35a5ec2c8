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


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_a_fill_cancelled_before_its_thread_began_leaves_no_duplicate_open(tmp_path):
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    gate = threading.Event()
    busy = asyncio.ensure_future(asyncio.to_thread(gate.wait))     # the executor's one thread, taken
    p = Placer(tmp_path, [Range(1, 0x10000, 4)])
    r, w = os.pipe()                         # stands for the copy's uffd
    p.tasks[1] = [placer._Task(1, r, [bytearray(b"\1") * 4], 4)]
    duplicate = os.dup(0)                    # the number the fill's duplicate gets: the lowest free
    os.close(duplicate)
    try:
        fill = asyncio.ensure_future(p._fill(1, 0x10000, 4, memoryview(bytes(4 * PAGE))))
        await asyncio.sleep(0.05)
        assert is_open(duplicate)            # lent to a thread that has not begun
        fill.cancel()                        # the executor drops the thread's work unstarted
        with contextlib.suppress(asyncio.CancelledError):
            await fill
        assert not is_open(duplicate)
    finally:
        gate.set()                           # (else the test run waits for that thread at its exit)
        await busy
        os.close(r)
        os.close(w)


async def test_a_fork_read_with_a_fault_of_a_parent_that_has_exited_is_taken_up(tmp_path, monkeypatch):
    p = Placer(tmp_path, [Range(1, 0x10000, 4)])
    parent_fd, child_fd = os.pipe()          # stand for the parent's uffd and its child's
    parent = placer._Task(1, parent_fd, [bytearray(b"\1") * 4], 4)
    p.tasks[1] = [parent]
    reads = iter([[uffd.PageFault(0x10000, False), uffd.Fork(child_fd)]])
    monkeypatch.setattr(uffd, "read_events", lambda fd: next(reads, []))

    def exited(*_args, **_kwargs):
        raise uffd.Gone("its process has exited")
    monkeypatch.setattr(p, "_fault", exited)
    p._drain(parent)
    assert parent.fd == -1 and not is_open(parent_fd)       # the parent's let go
    child = p.tasks[1][1]
    assert child.fd == child_fd and child.forked and child.left == 4     # the child's taken up, lacking what it lacked
    p.close()
    assert not is_open(child_fd)
