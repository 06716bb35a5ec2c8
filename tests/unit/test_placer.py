"""Post-copy's target side against the real kernel: a forked child plays the restored
process. It maps its memory where the "dump" had it, registers a uffd with the events
CRIU's restore asks for, and hands it over on lazy-pages.socket exactly as CRIU's restore
does (PID, uffd, RESTORE_FINISHED). The source's side is the real push.Pusher reading
a stand-in for CRIU's page server. The child then reads its memory, and forks, throws
pages away or moves them, as a program may, while its pages arrive."""

import asyncio
import contextlib
import ctypes
import os
import socket
import struct
from pathlib import Path

import pytest

from livemig.options import SIZES
from livemig.pages import pagehash, postcopy, push, shadow, uffd
from livemig.pages.pagemap import PAGE, Range
from livemig.pages.placer import RESTORE_FINISHED, SOCKET, Placer

from .pagefakes import GatedReader, fake_criu, page, pair

PID = 1                              # the process's PID in the "dump"
BIG, SMALL, SPLIT = 0x5a0000000000, 0x5b0000000000, 0x5c0000000000
MOVED_TO = 0x5d0000000000
# (address, pages, writable): SPLIT's two mappings differ, so they are two VMAs, and one
# lazy range spans both (the kernel refuses a copy across them as a whole)
VMAS = [(BIG, 700, True), (SMALL, 40, True), (SPLIT, 30, True), (SPLIT + 30 * PAGE, 30, False)]
RANGES = [Range(PID, BIG, 600), Range(PID, SMALL, 40), Range(PID, SPLIT, 60)]   # BIG's last 100: never written
LAZY_PAGES = 700
FIRST_FAULTS = range(550, 560)       # of BIG: the push, smallest ranges first, reaches them last


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def uffds_open() -> set[int]:
    """This process's descriptors that are userfaultfds."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):      # the listing's own descriptor, closed by now
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]":
                found.add(int(fd))
    return found


def _expect(address: int, was: int, pages: int, zeros: bool = False) -> list[str]:
    """What is wrong in [address, +pages): each should hold the dump's page at was (or zeros)."""
    bad = []
    for i in range(pages):
        got = ctypes.string_at(address + i * PAGE, PAGE)
        if got != (bytes(PAGE) if zeros else page(PID, was + i * PAGE)):
            bad.append(f"{address + i * PAGE:#x}")
    return bad


def restored(path: str, ctl: socket.socket, scenario: str) -> int:
    """The child: CRIU's restore, then the program. Reports on ctl; exits 0 if all was well."""
    libc = _libc()
    prot_rw, prot_r, flags = 3, 1, 0x02 | 0x20 | 0x100000      # PRIVATE | ANONYMOUS | FIXED_NOREPLACE
    for address, pages, writable in VMAS:
        if libc.mmap(address, pages * PAGE, prot_rw if writable else prot_r, flags, -1, 0) != address:
            ctl.send(b"mmap failed")
            return 1
    fd = uffd.create(features=uffd.CRIU_FEATURES)
    for address, pages, _ in VMAS:
        uffd.register(fd, address, pages * PAGE)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.send(struct.pack("<i", PID))
        socket.send_fds(s, [b"\0"], [fd])
        s.send(struct.pack("<i", -5))            # a zombie: a PID and nothing else
        ctl.recv(1)
        # CRIU's restore touches lazy memory before it is done (a task's stack): a page
        # pushed ahead, and one nobody sent yet
        bad = _expect(SMALL + 2 * PAGE, SMALL + 2 * PAGE, 1) + _expect(BIG + 3 * PAGE, BIG + 3 * PAGE, 1)
        s.send(struct.pack("<I", RESTORE_FINISHED))
    os.close(fd)                                 # as CRIU's restorer does: only the daemon holds it
    ctl.recv(1)                                  # resumed
    bad += _expect(BIG + FIRST_FAULTS[0] * PAGE, BIG + FIRST_FAULTS[0] * PAGE, len(FIRST_FAULTS))
    # what the program does to its memory, before the push starts (after its first faults)
    middle = (BIG + 450 * PAGE, BIG + 450 * PAGE, 50, False)   # pushed late: the push goes in address order
    child = 0
    if scenario == "fork":
        child = os.fork()
        if child == 0:          # the grandchild reads everything through a uffd of its own
            os._exit(1 if _expect(BIG, BIG, 600) + _expect(SMALL, SMALL, 40) + _expect(SPLIT, SPLIT, 60) else 0)
    elif scenario == "dontneed":
        libc.madvise(middle[0], 50 * PAGE, 4)    # MADV_DONTNEED: it reads zeros from now on
        middle = (middle[0], 0, 50, True)
    elif scenario == "mremap":
        if libc.mremap(middle[0], 50 * PAGE, 50 * PAGE, 1 | 2, MOVED_TO) != MOVED_TO:   # MAYMOVE | FIXED
            ctl.send(b"mremap failed")
            return 1
        middle = (MOVED_TO, middle[1], 50, False)
    ctl.send(b"f")
    for address, was, pages, zeros in [(BIG, BIG, 450, False), middle, (BIG + 500 * PAGE, BIG + 500 * PAGE, 100, False),
                                       (BIG + 600 * PAGE, 0, 100, True), (SMALL, SMALL, 40, False),
                                       (SPLIT, SPLIT, 60, False)]:
        bad += _expect(address, was, pages, zeros)
    if child:
        _, status = os.waitpid(child, 0)
        if status:
            bad.append("the forked child saw wrong pages")
    ctl.recv(1)                                  # every page is in: nothing may change now
    bad += _expect(*middle)
    ctl.send((" ".join(bad[:5]) or "ok").encode())
    return 0


async def move(tmp_path, scenario: str = "plain", fault_stream: bool = True, gate: bool = False,
               known: pagehash.Tracker | None = None, store: shadow.Store | None = None, cut: bool = False):
    """One post-copy into a child playing the restored process: (placer, pusher, its report).
    cut: the link breaks once the copy's first faults are answered, and a fresh one, a fresh
    push of what the placer says it lacks, comes a moment later (its faults wait meanwhile).
    store: a fill: the copy runs once every page is here, and is filled from the store while
    it runs: held back until its first faults are answered. known: pre-copy by hashes filled
    the store (else every page is pushed into it: stop-and-copy into memory)."""
    held: list[int] = []
    before = uffds_open()
    fill = store is not None
    placer = Placer(tmp_path, RANGES, on_uffd=lambda pid, fd: held.append(os.dup(fd)), store=store)
    filling = asyncio.Event()
    if fill:
        place = placer._fill

        async def held_back(*args):
            await filling.wait()
            await place(*args)
        placer._fill = held_back
    placer.listen()
    ctl, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ctl.close()
            code = restored(str(tmp_path / SOCKET), theirs, scenario)
        finally:
            os._exit(code)
    theirs.close()
    ctl.setblocking(False)
    loop = asyncio.get_running_loop()
    (criu_end, pusher_end), (link_src, link_dst) = await pair(), await pair()
    faults_src = faults_dst = None
    if fault_stream:
        faults_src, faults_dst = await pair()
    gated = GatedReader(link_dst[0])
    pusher = push.Pusher(RANGES, prefetch_pages=40, known=known)     # SMALL, while "CRIU" restores
    if fill:
        pusher.start_pushing(fill=True)
    relinked = asyncio.Event()

    async def first_push():
        with contextlib.suppress(postcopy.LinkLost):     # cut: its link breaks under it
            await pusher.run(pusher_end, link_src, faults_src)

    async def relink():
        await asyncio.sleep(0.3)            # the copy faults meanwhile: those faults wait
        (criu2, pusher2), (src2, dst2) = await pair(), await pair()
        second = push.Pusher(placer.missing())
        second.start_pushing()
        tg.create_task(fake_criu(*criu2, RANGES, []))
        tg.create_task(second.run(pusher2, src2))
        relinked.set()
        return dst2, None

    try:
        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as tg:
                tg.create_task(fake_criu(*criu_end, RANGES, []))
                tg.create_task(first_push())
                tg.create_task(placer.run((gated, link_dst[1]), faults_dst, relink=relink))
                while placer._early_page(PID, SMALL + 2 * PAGE) is None:
                    await asyncio.sleep(0.01)
                await loop.sock_sendall(ctl, b"r")
                while not placer.finished:
                    await asyncio.sleep(0.01)
                if fill:        # it runs only once every page is on this host
                    await placer.all_here.wait()
                    assert not placer.whole
                placer.resumed()
                if gate:                  # pushed pages pile up on a stuck stream
                    gated.open.clear()
                    pusher.start_pushing()
                    await asyncio.sleep(0.2)
                await loop.sock_sendall(ctl, b"g")
                assert await loop.sock_recv(ctl, 100) == b"f"   # its first faults are answered
                if cut:
                    link_src[1].transport.abort()
                    if faults_src is not None:
                        faults_src[1].transport.abort()
                    await relinked.wait()
                filling.set()
                gated.open.set()
                pusher.start_pushing()
            await loop.sock_sendall(ctl, b"c")
            report = (await loop.sock_recv(ctl, 1000)).decode()
    except BaseException:
        os.kill(pid, 9)          # a child stuck on a page nobody will place
        raise
    finally:
        _, status = os.waitpid(pid, 0)  # noqa: ASYNC222 - the forked child has ended or is ending: no wait worth a loop
        placer.close()
        for fd in held:
            os.close(fd)
    assert status == 0
    assert uffds_open() <= before       # none left in the agent: each holds a copy's memory map
    return placer, pusher, report, held


@pytest.mark.parametrize("fault_stream", [True, False], ids=["fault stream", "one stream"])
async def test_every_page_lands_where_the_dump_had_it_and_faults_go_first(tmp_path, fault_stream):
    placer, pusher, report, held = await move(tmp_path, fault_stream=fault_stream)
    assert report == "ok"                           # every page, and zeros where the dump had none
    assert placer.whole and placer.status == 0
    assert placer.stats.pages_served == LAZY_PAGES  # each placed once
    assert placer.stats.requests_waited >= 1 and pusher.stats.pages_on_demand >= len(FIRST_FAULTS)
    assert pusher.stats.pages_pushed + pusher.stats.pages_on_demand >= LAZY_PAGES
    assert len(held) == 1                           # the guard got the one uffd (the zombie has none)


async def test_a_fault_is_answered_on_its_own_stream_while_the_pushing_stream_is_stuck(tmp_path):
    _placer, pusher, report, _ = await move(tmp_path, gate=True)
    assert report == "ok"
    assert pusher.stats.pages_on_demand >= len(FIRST_FAULTS)


async def test_a_child_forked_during_post_copy_gets_every_page_too(tmp_path):
    placer, _, report, held = await move(tmp_path, "fork")
    assert report == "ok"
    assert len(held) == 2                           # the child's uffd went to the guard too
    assert placer.stats.pages_served == LAZY_PAGES  # the parent's; the child's are extra


async def test_pages_thrown_away_stay_zeros_after_their_push(tmp_path):
    placer, _, report, _ = await move(tmp_path, "dontneed")
    assert report == "ok"                           # zeros, before and after the push passed
    assert placer.stats.pages_served == LAZY_PAGES - 50     # never placed


async def test_a_moved_range_gets_its_pages_where_it_is_now(tmp_path):
    _, _, report, _ = await move(tmp_path, "mremap")
    assert report == "ok"


@pytest.mark.parametrize("scenario", ["plain", "fork"])
async def test_a_fill_names_the_pages_the_store_holds_as_they_are_and_sends_only_the_rest(tmp_path, scenario):
    # pre-copy by hashes left BIG and SPLIT in the store; 10 pages of BIG and one of SPLIT
    # changed since (the store holds what they were); SMALL never made it there
    known, store = pagehash.Tracker(), shadow.Store()
    stale = {BIG + i * PAGE for i in range(100, 110)} | {SPLIT + 5 * PAGE}
    for r in (RANGES[0], RANGES[2]):
        for i in range(r.pages):
            vaddr = r.vaddr + i * PAGE
            data = b"was" * 1000 + bytes(PAGE - 3000) if vaddr in stale else page(PID, vaddr)
            known.changed(PID, vaddr, data)
            store.write(PID, vaddr, data)
    placer, pusher, report, _ = await move(tmp_path, scenario, known=known, store=store)
    assert report == "ok"      # every page as the dump has it, stale or not; in a child forked meanwhile too
    in_store = 600 + 60 - len(stale)
    # the restore's own fault on BIG's 4th page asks for it before the fill names it (then
    # it is not named), or after (named twice)
    assert in_store - 1 <= pusher.stats.pages_known == placer.stats.pages_known <= in_store + 1
    assert pusher.stats.sent.raw < (LAZY_PAGES - in_store + 20) * PAGE + 10_000    # named, not sent
    # it ran before the fill: its faults were answered here, from the store, never by the source,
    # but for that one page when its fault reached the source first: then the source answered
    # it on demand, sent (before the fill named it: named one page fewer) or named again (after)
    assert placer.stats.requests >= len(FIRST_FAULTS) // SIZES.fault_pages + 1
    assert pusher.stats.pages_on_demand == abs(in_store - pusher.stats.pages_known)
    store.close()


@pytest.mark.parametrize("scenario", ["plain", "fork"])
async def test_stop_and_copy_into_memory_has_every_page_here_before_the_copy_runs(tmp_path, scenario):
    store = shadow.Store()
    placer, pusher, report, _ = await move(tmp_path, scenario, store=store)
    assert report == "ok"      # every page as the dump has it; in a child forked meanwhile too
    assert pusher.stats.pages_known == 0 and pusher.stats.pages_pushed >= LAZY_PAGES
    # it ran before the fill: its faults were answered here, from the store; only the
    # restore's own fault on BIG's 4th page may have asked the source, if it came first
    assert placer.stats.requests >= len(FIRST_FAULTS) // SIZES.fault_pages + 1
    assert placer.stats.requests_waited <= 1
    store.close()


@pytest.mark.parametrize("scenario", ["plain", "fork"])
async def test_a_link_broken_while_the_copy_runs_is_taken_up_again_on_a_fresh_one(tmp_path, scenario):
    # cut before the push began: all but the first faults' pages and SMALL come on the
    # fresh link, pushed from what the placer says the copy lacks, and the faults that
    # waited across the cut are asked again there
    placer, _, report, held = await move(tmp_path, scenario, cut=True)
    assert report == "ok"      # every page as the dump has it; in a child forked meanwhile too
    assert placer.relinks == 1 and placer.whole
    assert placer.stats.pages_served == LAZY_PAGES      # each placed once, across both links
    assert len(held) == (2 if scenario == "fork" else 1)


def test_a_frame_that_fills_a_slot_is_kept_as_it_came_and_copied_only_once_written_into():
    store = shadow.Store()
    base = 7 << pagehash.CHUNK_SHIFT
    data = b"".join(page(PID, base + i * PAGE) for i in range(pagehash.CHUNK_PAGES + 3))
    store.hold(PID, base, data)              # a whole slot, and three pages of the next
    assert store.pages == pagehash.CHUNK_PAGES + 3
    pieces = store.pieces(PID, base, pagehash.CHUNK_PAGES + 3)
    assert [(a, n) for a, n, _ in pieces] == [(base, pagehash.CHUNK_PAGES), (base + shadow.SLOT, 3)]
    assert pieces[0][2].obj is data          # the frame itself, no copy
    assert b"".join(bytes(v) for _, _, v in pieces) == data
    del pieces
    store.write(PID, base + PAGE, b"x" * PAGE)      # into a kept frame: a slot of its own from now on
    assert bytes(store.pieces(PID, base + PAGE, 1)[0][2]) == b"x" * PAGE
    assert bytes(store.pieces(PID, base, 1)[0][2]) == data[:PAGE]
    assert data[PAGE:2 * PAGE] == page(PID, base + PAGE)     # the frame as it came, untouched
    store.release(PID, base, pagehash.CHUNK_PAGES)
    assert store.pages == 3
    store.hold(PID, base + shadow.SLOT, data[:3 * PAGE])     # part of a slot: written into it
    assert bytes(store.pieces(PID, base + shadow.SLOT, 3)[0][2]) == data[:3 * PAGE]
    store.close()


def test_the_store_hands_pages_back_in_pieces_of_its_slots_and_knows_what_it_lacks():
    store = shadow.Store()
    base = (7 << pagehash.CHUNK_SHIFT) - 3 * PAGE        # three pages before a slot's end
    data = b"".join(page(PID, base + i * PAGE) for i in range(8))
    store.write(PID, base, data)
    store.write(PID, base + PAGE, data[PAGE:2 * PAGE])   # again: counted once
    assert store.pages == 8
    pieces = store.pieces(PID, base, 8)
    assert [(a, n) for a, n, _ in pieces] == [(base, 3), (base + 3 * PAGE, 5)]
    assert b"".join(bytes(v) for _, _, v in pieces) == data
    with pytest.raises(shadow.MissingPages):
        store.pieces(PID, base, 9)
    with pytest.raises(shadow.MissingPages):
        store.pieces(PID + 1, base, 1)
    del pieces
    # placed and let go: named again (the copy faulted on them while they were on their way),
    # they are skipped, not missing; the rest of the run still comes, in pieces of one slot
    store.release(PID, base + 2 * PAGE, 2)
    pieces = store.pieces(PID, base, 8)
    assert [(a, n) for a, n, _ in pieces] == [(base, 2), (base + 4 * PAGE, 4)]
    assert b"".join(bytes(v) for _, _, v in pieces) == data[:2 * PAGE] + data[4 * PAGE:]
    assert store.pages == 6
    with pytest.raises(shadow.MissingPages):
        store.pieces(PID, base + 7 * PAGE, 2)        # the page after them never came
    del pieces
    store.close()


async def test_the_source_gone_mid_copy_fails_the_target_side_loudly(tmp_path):
    placer = Placer(tmp_path, RANGES)
    placer.listen()
    (_, src_writer), (dst_reader, dst_writer) = await pair()
    async with asyncio.timeout(10):
        placing = asyncio.create_task(placer.run((dst_reader, dst_writer)))
        src_writer.close()
        with pytest.raises(postcopy.PageStreamError, match="source's page stream ended"):
            await placing
    placer.close()


async def test_a_silent_link_fails_the_target_side_once_its_copy_runs_and_not_before(tmp_path):
    # the link is cut: the source's end stays open, and nothing more arrives
    _source, (dst_reader, dst_writer) = await pair()
    placer = Placer(tmp_path, RANGES, stall_seconds=0.5)
    placer.listen()
    async with asyncio.timeout(10):
        placing = asyncio.create_task(placer.run((dst_reader, dst_writer)))
        await asyncio.sleep(1.6)
        assert not placing.done()        # restored, stopped: the source may take its time
        placer.resumed()
        with pytest.raises(postcopy.PageStreamError, match="nothing from the source for 0 s"):
            await placing
    placer.close()


def test_addresses_follow_each_move_and_a_vacated_range_holds_nothing():
    from livemig.pages.placer import _Task
    t = _Task(PID, -1, [], 0, remaps=[(0x10000, 0x90000, 0x4000),     # moved 4 pages away
                                       (0x91000, 0x20000, 0x1000)])   # then the 2nd of them again
    assert t.current(0x10000) == 0x90000 and t.current(0x11000) == 0x20000 and t.current(0x13000) == 0x93000
    assert t.current(0x50000) == 0x50000                                # never moved
    assert t.image(0x90000, 0x94000) == [(0x10000, 0x11000), (0x12000, 0x14000)]  # the 2nd page left
    assert t.image(0x20000, 0x21000) == [(0x11000, 0x12000)]
    assert t.image(0x10000, 0x14000) == []       # where they were: nothing of the image (mremap's unmap event)


def test_what_a_copy_lacks_is_said_in_runs_a_forked_child_s_too_and_joined_past_the_limit(monkeypatch):
    import dataclasses

    from livemig.pages import placer as placer_mod
    from livemig.pages.placer import _Task
    p = Placer(Path("/nonexistent"), [Range(PID, BIG, 10), Range(PID, SMALL, 4)])
    parent = bytearray(b"\1\1\0\0\1\0\0\0\0\1")
    child = bytearray(b"\0\0\0\1\0\0\0\0\0\0")      # forked after its parent got page 3; lost it since
    p.tasks[PID] = [_Task(PID, 99, [parent, bytearray(4)], 4),
                    _Task(PID, 98, [child, bytearray(4)], 1, forked=True)]
    assert p.missing() == [Range(PID, BIG, 2), Range(PID, BIG + 3 * PAGE, 2), Range(PID, BIG + 9 * PAGE, 1)]
    monkeypatch.setattr(placer_mod, "SIZES", dataclasses.replace(SIZES, rejoin_runs=2))
    assert p.missing() == [Range(PID, BIG, 5), Range(PID, BIG + 9 * PAGE, 1)]     # the 1-page gap joined first
