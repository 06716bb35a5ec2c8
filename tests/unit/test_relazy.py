"""pages/relazy.py on images written as CRIU writes them: a lazy dump that wrote, for a stack
pointer on a page boundary, the pages it means to leave lazy; and host.py's foresight of it, on
a real process with such a thread."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livemig import host, protobuf
from livemig.options import SIZES
from livemig.pages import pagemap, relazy
from livemig.pages.pagemap import PAGE, PE_LAZY, PE_PARENT, PE_PRESENT, Entry

_U32 = struct.Struct("<I")
ANON_PRIVATE = relazy.MAP_ANONYMOUS | relazy.MAP_PRIVATE
HEAP, LOCKED, FILE_AT, VDSO = 0x10000, 0x20000, 0x30000, 0x40000


def vma(start: int, pages: int, flags: int, status: int = 0) -> bytes:
    return (protobuf.varint_field(1, start) + protobuf.varint_field(2, start + pages * PAGE)
            + protobuf.varint_field(6, flags) + protobuf.varint_field(7, status))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def mm_image(*vmas: bytes) -> bytes:
    """An mm image: MmEntry's first field, then its vmas (field 14, length-delimited)."""
    msg = protobuf.varint_field(1, 0x400000) + b"".join(varint(14 << 3 | 2) + varint(len(v)) + v for v in vmas)
    return _U32.pack(pagemap.IMG_COMMON_MAGIC) + _U32.pack(relazy.MM_MAGIC) + _U32.pack(len(msg)) + msg


def page(n: int) -> bytes:
    return bytes([n % 251 + 1]) * PAGE


@pytest.fixture
def images(tmp_path):
    """One process (PID 7): an anonymous private heap of 4 pages, a locked mapping of 2, a
    file's private mapping of 2 and the vDSO's page; CRIU wrote every page present, as it
    does when a thread's stack pointer is on a page boundary, and one entry named in a
    parent (a hybrid's pre-dump)."""
    (tmp_path / "mm-7.img").write_bytes(mm_image(
        vma(HEAP, 4, ANON_PRIVATE), vma(LOCKED, 2, ANON_PRIVATE | relazy.MAP_LOCKED),
        vma(FILE_AT, 2, relazy.MAP_PRIVATE), vma(VDSO, 1, ANON_PRIVATE, relazy.VMA_AREA_VDSO)))
    written = [Entry(HEAP, 2, PE_PRESENT), Entry(HEAP + 2 * PAGE, 1, PE_PARENT), Entry(HEAP + 3 * PAGE, 1, PE_PRESENT),
               Entry(LOCKED, 2, PE_PRESENT), Entry(FILE_AT, 2, PE_PRESENT), Entry(VDSO, 1, PE_PRESENT)]
    (tmp_path / "pagemap-7.img").write_bytes(pagemap.image(3, written))
    # present pages in order: heap 0, 1, 3; locked 0, 1; file 0, 1; vdso
    (tmp_path / "pages-3.img").write_bytes(b"".join(page(n) for n in range(8)))
    return tmp_path


def test_the_pages_criu_means_to_leave_lazy_are_lazy_again_and_their_bytes_gone(images):
    assert relazy.undo_stack_slip(images) == 3
    _, entries = pagemap.read((images / "pagemap-7.img").read_bytes())
    assert entries == [Entry(HEAP, 2, PE_LAZY), Entry(HEAP + 2 * PAGE, 1, PE_PARENT), Entry(HEAP + 3 * PAGE, 1, PE_LAZY),
                       Entry(LOCKED, 2, PE_PRESENT), Entry(FILE_AT, 2, PE_PRESENT), Entry(VDSO, 1, PE_PRESENT)]
    # the pages that stay present keep their bytes, in order
    assert (images / "pages-3.img").read_bytes() == b"".join(page(n) for n in (3, 4, 5, 6, 7))
    assert sorted(p.name for p in images.iterdir()) == ["mm-7.img", "pagemap-7.img", "pages-3.img"]
    assert [r.pages for r in pagemap.lazy_ranges(images)] == [2, 1]


def test_a_dump_as_criu_means_it_is_left_untouched(images):
    relazy.undo_stack_slip(images)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    assert relazy.undo_stack_slip(images) == 0
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_an_entry_across_a_lazy_mapping_s_edge_is_split_there():
    lazy = [(HEAP, HEAP + 4 * PAGE)]
    entries, kept = relazy.split([Entry(HEAP - 2 * PAGE, 8, PE_PRESENT)], lazy)
    assert entries == [Entry(HEAP - 2 * PAGE, 2, PE_PRESENT), Entry(HEAP, 4, PE_LAZY),
                       Entry(HEAP + 4 * PAGE, 2, PE_PRESENT)]
    assert kept == [True] * 2 + [False] * 4 + [True] * 2


def test_a_pages_file_shorter_than_its_pagemap_fails_and_leaves_the_images_as_they_were(images):
    (images / "pages-3.img").write_bytes(page(0))
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    with pytest.raises(relazy.RelazyError, match="ends before"):
        relazy.undo_stack_slip(images)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_an_mm_image_that_is_not_one_is_refused():
    with pytest.raises(relazy.RelazyError, match="not a CRIU mm image"):
        relazy.lazy_mappings(b"\0" * 16)


# --- foreseen: relazy.slips, host.images_in_memory ------------------------------------------
MEMCOUNTER = Path(__file__).parents[1] / "workloads" / "memcounter.py"


@pytest.fixture
def memcounter():
    """Start a memcounter (its flags), serving; its PID. Killed after."""
    started = []

    def start(*flags: str) -> int:
        proc = subprocess.run([sys.executable, str(MEMCOUNTER), "run", "--daemon", "--mib", "4",
                               "--port", str(free_port()), "--bind", "127.0.0.1", *flags], capture_output=True, check=True, timeout=60)
        started.append(pid := int(proc.stdout))
        return pid
    yield start
    for pid in started:
        os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_thread_waiting_with_its_stack_pointer_on_a_page_boundary_is_foreseen(memcounter):
    aligned, plain = memcounter("--aligned-sp"), memcounter()
    deadline = time.monotonic() + 10      # its thread reaches its pause() a moment after it serves
    while relazy.slips([aligned]) != [aligned] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relazy.slips([aligned, plain]) == [aligned]
    assert host.private_bytes(relazy.slips([aligned, plain])) >= 4 << 20


def test_images_in_memory_leave_room_for_one_process_more_where_half_the_memory_allows(monkeypatch):
    least, slack = SIZES.images_in_memory_least, SIZES.images_in_memory_slack
    monkeypatch.setattr(host, "mem_available", lambda: 8 << 30)
    assert host.images_in_memory(least - 1, 1 << 30) == 0          # too little to matter: on disk
    size = 256 << 20
    room = size + size // 4 + slack
    assert host.images_in_memory(size) == room
    assert host.images_in_memory(size, 1 << 30) == room + (1 << 30)
    assert host.images_in_memory(size, 16 << 30) == 4 << 30         # half the memory at most
    monkeypatch.setattr(host, "mem_available", lambda: room * 2 - 1)
    assert host.images_in_memory(size, 1 << 30) == 0                # not even what is foreseen fits
