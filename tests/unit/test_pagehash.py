"""Pre-copy by page hashes: which pages changed, judged by content, read from a real
running process's memory."""

import os
import subprocess
import sys
import textwrap

import pytest

from livemig import pagehash
from livemig.pagemap import PAGE

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
    assert pagehash.vpid_of(os.getpid()) == os.getpid() == pagehash.vpid_of(os.getpid(), 0)
    assert pagehash.vpid_of(os.getpid(), 3) == pagehash.ns_pids(os.getpid())[-1]


def test_the_kernel_s_own_mappings_are_never_read():
    ranges = pagehash.private_ranges(os.getpid())
    with open(f"/proc/{os.getpid()}/maps") as f:
        vdso = [line for line in f if "[vdso]" in line or "[vvar]" in line]
    for line in vdso:
        start = int(line.split("-")[0], 16)
        assert all(not (a <= start < b) for a, b in ranges)
