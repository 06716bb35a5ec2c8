"""livemig.uffd against the real kernel: a child process's memory, registered with a uffd
that it hands over (as CRIU's restore does), gets its pages from this process: some placed
before it touches them (no fault), the rest when it faults."""

import mmap
import os
import select
import socket
import struct

import pytest

from livemig.pages import uffd

PAGES = 16


def content(i: int) -> bytes:
    return struct.pack("<I", i) * (uffd.PAGE // 4)


def child(sock: socket.socket) -> None:
    mem = mmap.mmap(-1, PAGES * uffd.PAGE)
    import ctypes
    address = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fd = uffd.create(nonblocking=False)
    uffd.register(fd, address, PAGES * uffd.PAGE)
    socket.send_fds(sock, [struct.pack("<Q", address)], [fd])
    sock.recv(1)                       # the parent is ready: now touch every page
    ok = all(mem[i * uffd.PAGE:(i + 1) * uffd.PAGE] == content(i) for i in range(PAGES))
    sock.send(b"1" if ok else b"0")


def test_pages_placed_ahead_never_fault_and_the_others_arrive_on_their_fault():
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            child(theirs)
        finally:
            os._exit(0)
    theirs.close()
    try:
        msg, fds, _, _ = socket.recv_fds(ours, 8, 1)
        [fd], (address,) = fds, struct.unpack("<Q", msg)
        os.set_blocking(fd, False)
        # the last half goes before the child touches anything, as pushed pages would
        for i in range(PAGES // 2, PAGES):
            assert uffd.place(fd, address + i * uffd.PAGE, content(i)) == uffd.PAGE
        ours.send(b"go")
        faults = []
        while len(faults) < PAGES // 2:
            select.select([fd], [], [], 10)
            for e in uffd.read_events(fd):
                assert isinstance(e, uffd.PageFault)
                i = (e.address - address) // uffd.PAGE
                faults.append(i)
                assert uffd.place(fd, e.address, content(i)) == uffd.PAGE
                if i == 0:      # the child waits on page 1 now: page 0 is there, so no copy, no error
                    assert uffd.place(fd, address, content(0)) == 0
        assert ours.recv(1) == b"1"                       # every page as it must be
        assert faults == list(range(PAGES // 2))          # only the pages not placed ahead faulted
    finally:
        os.waitpid(pid, 0)
    with pytest.raises(uffd.Gone):                        # its process has exited
        uffd.place(fd, address, content(0))
    os.close(fd)


def test_events_parse_as_the_kernel_lays_them_out():
    fault = struct.pack("<B3xI", 0x12, 0) + struct.pack("<QQI4x", 1, 0x7f0000001234, 42)
    fork = struct.pack("<B3xI", 0x13, 0) + struct.pack("<I20x", 9)
    unmap = struct.pack("<B3xI", 0x16, 0) + struct.pack("<QQ8x", 0x1000, 0x3000)
    assert uffd.parse(fault + fork + unmap) == [uffd.PageFault(0x7f0000001000, True), uffd.Fork(9),
                                                uffd.Removed(0x1000, 0x3000, unmapped=True)]
