"""Pre-copy by page hashes: which pages changed, judged by content, read from a real
running process's memory."""

import asyncio
import contextlib
import ctypes
import mmap
import os
import subprocess
import sys
import textwrap

import pytest

from livemig import proc
from livemig.pages import compare, pagehash
from livemig.pages.pagemap import PAGE

CHILD = textwrap.dedent("""
    import mmap, sys, ctypes
    m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(48):                      # the last 16 pages are never touched
        m[i * 4096:(i + 1) * 4096] = bytes([i + 1]) * 4096
    print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
    for line in sys.stdin:                   # "i": rewrite page i, then say so
        i = int(line)
        m[i * 4096] = (m[i * 4096] + 1) % 256
        print("ok", flush=True)
""")


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    base = int(p.stdout.readline())
    yield p, base
    p.kill()
    p.wait()


def ours(runs, base):
    """The runs inside the child's 64-page buffer, as (first page, pages)."""
    return [((r.vaddr - base) // PAGE, r.pages) for r in runs if base <= r.vaddr < base + 64 * PAGE]


def test_the_first_scan_sends_every_page_written_and_the_next_only_those_changed(child):
    p, base = child
    t = pagehash.Tracker()
    first = list(t.scan(p.pid, p.pid))
    assert ours(first, base) == [(0, 48)]            # never-touched pages are not read
    run = next(r for r in first if r.vaddr == base)
    assert run.data[:PAGE] == b"\1" * PAGE and run.vpid == p.pid
    assert ours(t.scan(p.pid, p.pid), base) == []           # nothing changed
    for i in (3, 4, 40):
        p.stdin.write(f"{i}\n")
        p.stdin.flush()
        assert p.stdout.readline() == "ok\n"
    assert ours(t.scan(p.pid, p.pid), base) == [(3, 2), (40, 1)]
    assert ours(t.scan(p.pid, p.pid), base) == []


def test_changed_tells_runs_and_records_only_when_asked():
    t = pagehash.Tracker(seed=7)
    a = bytes(range(256)) * 16 * 4                   # 4 pages
    assert t.changed(1, 0x10000, a, record=False) == [(0x10000, 4, True)]
    assert t.changed(1, 0x10000, a) == [(0x10000, 4, True)]
    assert t.changed(1, 0x10000, a) == [(0x10000, 4, False)]
    b = a[:PAGE] + b"x" * PAGE + a[2 * PAGE:]
    assert t.changed(1, 0x10000, b, record=False) == [(0x10000, 1, False), (0x11000, 1, True), (0x12000, 2, False)]
    assert t.changed(1, 0x10000, a) == [(0x10000, 4, False)]       # not recorded: still a
    assert t.changed(2, 0x10000, a, record=False) == [(0x10000, 4, True)]    # another process's
    assert t.pages == 4


def test_a_stretch_across_two_table_chunks_is_one_run():
    t = pagehash.Tracker()
    start = (1 << pagehash.CHUNK_SHIFT) - 2 * PAGE
    data = os.urandom(4 * PAGE)
    assert t.changed(1, start, data) == [(start, 4, True)]
    assert t.changed(1, start, data) == [(start, 4, False)]


def test_a_process_in_no_pid_namespace_of_its_own_keeps_its_pid():
    assert proc.vpid_of(os.getpid()) == os.getpid() == proc.vpid_of(os.getpid(), 0)
    assert proc.vpid_of(os.getpid(), 3) == proc.ns_pids(os.getpid())[-1]


def test_the_kernel_s_own_mappings_are_never_read():
    ranges = pagehash.private_ranges(os.getpid())
    with open(f"/proc/{os.getpid()}/maps") as f:
        vdso = [line for line in f if "[vdso]" in line or "[vvar]" in line]
    for line in vdso:
        start = int(line.split("-")[0], 16)
        assert all(not (a <= start < b) for a, b in ranges)


def test_a_comparison_cut_short_closes_its_pipe_once_and_nothing_else():
    # A rollback cancels the fill while it waits for the comparing process's first piece.
    # Its pipe must be closed exactly once: a descriptor closed under a file object that
    # still owns it is closed again when that object is collected (EBADF at exit, or another
    # file that took the same number closed). Under uvloop, as the CLI runs.
    import gc

    import uvloop

    memory = mmap.mmap(-1, 64 * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    tracker = pagehash.Tracker()
    tracker.changed(1, base, memory, record=True)
    unraisable = []

    async def cut_short() -> int:
        mem = os.open(f"/proc/{os.getpid()}/mem", os.O_RDONLY)
        try:
            comparer = compare.Comparer(tracker, [(1, base, 64)] * 200, {1: mem})
            task = asyncio.ensure_future(comparer.next())
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            comparer.close()
            return os.open("/dev/null", os.O_RDONLY)      # the lowest free number: the pipe's again
        finally:
            os.close(mem)

    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            other = runner.run(cut_short())
        gc.collect()
        os.fstat(other)          # still open: nobody closed it in the pipe's name
        os.close(other)
    finally:
        sys.unraisablehook = old_hook
    assert unraisable == []
