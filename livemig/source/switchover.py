"""The switchover: the workload freezes (final dump), its images cross (transfer), the
target restores its copy, stopped (restore), and at the commit the source's copy is
given up and the target's resumed. Stop-and-copy's commit is here; post-copy's and a
fill's, where the target's copy runs before it has every page, are postcopy.py's.

The downtime runs from the freeze to the target's resume; its parts (dump, images,
restore, resume) end at the instants noted on the Move as each step ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from .. import carried, host, replay, runtimes, service_address, workdirs
from ..errors import DumpError, LivemigError, Phase
from ..interrupts import uncancellable
from ..options import WAITS
from ..pages import cow, pagemap, relazy, shmem
from ..pages.pagemap import PAGE
from ..progress import Copied, Finishing, Running, Stepping
from ..report import DowntimePart, RoundReport
from ..runtimes.held import HeldCopy
from ..runtimes.process import criu_failure
from ..wire import protocol as p
from ..wire import streams
from . import bundles, owners, postcopy, recovery
from .failures import rolled_back, stranded
from .local import by_pid
from .move import Move
from .session import remote_error, token
from .stages import Stage
from .testpoints import stop_for_tests

CARRIED = "carried"     # the image directory the tree's carried files cross in


async def final_dump(m: Move, lazy: bool) -> None:
    """The workload freezes, and stays frozen until the commit (or a rollback) lets it go."""
    w = m.w
    parent = m.parent
    local = m.work / "final"
    local.mkdir(mode=0o700)
    if lazy:
        _in_memory(m, local)
    tok = m.lazy_token = token()
    streaming = w.streams_pages and not lazy
    if streaming:
        await m.to.request(p.OpenPageServer(dir="final", stream=tok, parent=parent), p.Done)
    await _keep_clients_packets(m)
    m.progress(Stepping(Phase.FINAL_DUMP, "final dump"))
    # switchover: auto-converge's throttle goes the moment the freeze begins
    lifting = None if m.throttle is None or m.throttle.current is None else \
        asyncio.create_task(m.throttle.released_once_held(w.root_pid, WAITS.freeze_start))
    try:
        dump = m.dump = await w.final_dump(local, parent, lazy)
        if streaming:
            m.relay = asyncio.create_task(_relay_when_connected(m, dump, tok))
        try:
            dumped_at = await w.dumped(dump, lazy)
            if lazy:
                await _relazy(m, local)
                await _keep_sharing(m, local)
                if m.tracker is not None:
                    await _name_shared_memory(m, local)
                    # frozen now: what pre-copy's watch vouches for is not read again (pagehash.py)
                    await asyncio.to_thread(m.tracker.settle)
                dumped_at = time.monotonic()
        except DumpError as e:
            # CRIU here sees only a broken pipe; the page server there knows why (a full disk...)
            raise (await _page_server_failure(m, e) if streaming else e) from None
    finally:
        if lifting is not None:
            lifting.cancel()        # done by now, unless the dump failed first: it releases
            await asyncio.wait({lifting})
    m.dumped_at = dumped_at
    # The record names the tree as it was frozen (children forked in pre-copy too), not
    # as it was before the freeze: what recover stops, resumes or ends.
    m.rec.source_copy = HeldCopy.of(w, m.rec.source_copy.bundle != "")
    m.save_record()
    rnd = RoundReport("dump", seconds=dumped_at - dump.frozen_at)
    if streaming and m.relay is not None:
        relayed = await m.relay
        await m.to.request(p.AwaitPageServer(dir="final"), p.PageServerDone)
        rnd.bytes_raw, rnd.bytes_wire = relayed.sent.raw, relayed.sent.wire
    m.report.rounds.append(rnd)


async def _keep_clients_packets(m: Move) -> None:
    """From now on, what the workload's clients send is kept, for the copy that runs next
    (replay.py): where its connections are to survive the move, in a network namespace of its
    own or at addresses that move with it."""
    pid = m.w.root_pid
    hosts = host.same_netns(pid)      # (then its moved addresses alone are its; else all its namespace's)
    if not (m.options.replay and m.options.criu.tcp_established) or (hosts and not m.addresses):
        return
    try:
        m.taking = await replay.Taking.open(pid, list(m.addresses) if hosts else [])
    except OSError as e:       # the move goes on: its clients wait for their retransmissions, as before
        m.report.warnings.append(f"what its clients send while it is frozen cannot be kept ({e}): those that "
                                 "ask then wait for their next retransmission")


def _in_memory(m: Move, images: Path) -> None:
    """A lazy dump's images in memory, where what CRIU writes into them while the workload
    is frozen is much: the tree's shared memory (pages/shmem.py), what its processes share
    copy-on-write (pages/cow.py), and the memory of a process it meets with a thread's stack
    pointer on a page boundary (pages/relazy.py). Where memory is short, or the kernel says no,
    on the image root's disk as always (workdirs.in_memory)."""
    pids = m.w.pids()
    size = host.images_in_memory(host.shared_memory_bytes(pids) + host.cow_shared_bytes(pids)
                                 + host.private_bytes(relazy.slips(pids)), host.largest_private_bytes(pids))
    if size and workdirs.in_memory(images, size):
        m.report.images_in_memory_bytes = size


async def take_addresses(m: Move) -> None:
    """The service addresses leave this host, the tree frozen (service_address.py): the
    target puts them on before its restore; a rollback puts them back here."""
    for address, (here, _) in m.addresses.items():
        await service_address.take_off(address, here)
        m.addresses_taken[address] = here
        m.rec.addresses = dict(m.addresses_taken)
        m.save_record()
    m.report.moved_addresses = [f"{a}: {here} on {m.report.source} to {there} on {m.target}"
                                for a, (here, there) in m.addresses.items()]


async def _relazy(m: Move, images: Path) -> None:
    """What CRIU's lazy dump wrote into its images though it means to leave it lazy, left lazy
    (pages/relazy.py): else it would cross, and be restored, while the workload is frozen."""
    try:
        pages = await asyncio.to_thread(relazy.undo_stack_slip, images)
    except relazy.RelazyError as e:
        raise DumpError(f"the lazy dump's images: {e}", phase=Phase.FINAL_DUMP) from None
    m.report.relazied_bytes = pages * PAGE


async def _keep_sharing(m: Move, images: Path) -> None:
    """What the frozen tree's processes share copy-on-write leaves its lazy ranges, for the
    target's restore to share again (pages/cow.py)."""
    try:
        kept = await asyncio.to_thread(cow.into_images, images, by_pid(m.w), m.known)
    except (OSError, cow.CowError) as e:
        raise DumpError(f"cannot keep what the tree shares copy-on-write: {e}", phase=Phase.FINAL_DUMP) from None
    m.report.shared_kept_bytes, m.report.shared_sent_bytes = kept.pages * PAGE, kept.sent * PAGE


async def _name_shared_memory(m: Move, images: Path) -> None:
    """The frozen tree's shared memory leaves its images where the target holds it as it is
    now, pre-copied (pages/shmem.py)."""
    assert m.tracker is not None
    try:
        named = await asyncio.to_thread(shmem.into_images, images, m.shmem_keys, m.tracker,
                                        by_pid(m.w))
    except (OSError, shmem.ShmemError) as e:
        raise DumpError(f"cannot name the shared memory the target holds: {e}", phase=Phase.FINAL_DUMP) from None
    m.report.shared_memory_named_bytes = named.pages * PAGE


async def _page_server_failure(m: Move, dump_error: DumpError) -> LivemigError:
    """The target's page server's own failure, if it failed: the cause of dump_error."""
    # no word from it either (a lost link, a mute agent): CRIU's own failure is all there is to tell
    with contextlib.suppress(Exception, TimeoutError):
        try:
            async with asyncio.timeout(WAITS.page_server_reason):
                await m.to.request(p.AwaitPageServer(dir="final"), p.PageServerDone)
        except p.RemoteFailure as e:
            return remote_error(e, Phase.FINAL_DUMP, m.target)
    return dump_error


async def _relay_when_connected(m: Move, run: runtimes.DumpRun, tok: str) -> streams.Relay:
    sock = await run.pages()
    if sock is None:
        raise DumpError(criu_failure(f"{m.w.kind} dump", run.proc.returncode, run.log), phase=Phase.FINAL_DUMP)
    return await m.to.relay(sock, tok)


async def transfer(m: Move) -> None:
    """The images that are not streamed pages; and a bundle's files changed since its pre-copy."""
    stop_for_tests("transfer")
    async with asyncio.TaskGroup() as tg:
        # (in memory here: much shared memory crosses in them, unless pre-copy sent it)
        images = tg.create_task(m.to.send_images("final", m.parent, m.work / "final",
                                                 m.report.images_in_memory_bytes))
        tree = tg.create_task(bundles.send_changes(m))
        if m.report.carried_files:
            tg.create_task(_carry(m))
    meter = images.result()
    if not m.w.streams_pages:
        # crun wrote the pages among the images: they crossed here, with the rest
        rnd = m.report.rounds[-1]
        rnd.bytes_raw, rnd.bytes_wire = meter.raw, meter.wire
    changed = tree.result()
    if changed is not None:
        m.report.bundle_bytes_wire += changed.wire
    m.report.image_files_bytes = meter.raw
    m.images_at = time.monotonic()
    m.progress(Copied("images", meter.raw, meter.wire))


async def _carry(m: Move) -> None:
    """The tree's files the target lacks, as they are now that it is frozen (carried.py)."""
    packed = m.work / CARRIED
    m.report.carried_bytes = await asyncio.to_thread(carried.pack, m.report.carried_files, packed)
    await m.to.send_images(CARRIED, None, packed)


async def restore(m: Move, lazy: bool, fill: bool = False) -> None:
    """The target brings the tree back, stopped: it runs only once the commit says so."""
    stop_for_tests("restore")
    fault_token = None
    if lazy:
        try:
            ranges = pagemap.lazy_ranges(m.work / "final")
        except (OSError, pagemap.PagemapError) as e:
            ranges = []
            m.report.warnings.append(f"cannot read the dump's pagemaps ({e}): post-copy "
                                     "fetches pages only when the target asks")
        fault_token = await postcopy.start_pages(m, ranges, fill)
    m.progress(Stepping(Phase.RESTORE, "restoring on the target"))
    restored = await m.to.request(
        p.Restore(dir="final", lazy_stream=m.lazy_token if lazy else None,
                  fault_stream=fault_token, container=m.spec, fill=fill,
                  rejoin=m.rejoin_token or None, rejoin_within=m.options.reconnect_timeout,
                  tcp_established=m.options.criu.tcp_established, file_locks=m.options.criu.file_locks,
                  carried=CARRIED if m.report.carried_files else "",
                  move_addresses={a: there for a, (_, there) in m.addresses.items()},
                  journal_streams=m.journal, unit=m.unit if m.spec else None),
        p.Restored)
    m.report.target_pid, m.report.restore_seconds = restored.pid, restored.restore_seconds
    m.restored_at = time.monotonic()
    stop_for_tests("restored")


async def commit_lazy(m: Move, fill: bool) -> None:
    """Post-copy's or a fill's commit, once marked: the source's copy is released (it
    stays frozen, its pages served from it), the target's runs and gets the rest. A
    failure is settled by the target's verdict, never rolled back (postcopy.settle).

    The target's Resume is the commit point, as QEMU's post-copy has it: once the target's
    copy may have run (the Resume sent, answered or not), it may have answered clients, and
    the source's copy, older, would answer them again. So from then on an interrupt waits
    for the copy to be whole (the move is then done), and a failure that leaves the target
    without its copy leaves the source's stopped (TargetLost): it runs again only by the
    operator's word (`livemig recover --target-lost`)."""
    whole: asyncio.Future[None] | None = None
    try:
        m.report.warnings += await uncancellable(m.w.release(m.final, True))
        stop_for_tests("released")
        m.rec.target_resumed_at = time.time()      # on disk before the Resume can be heard
        # who comes back with these takes the page stream up, should we vanish (rejoin.py)
        m.rec.rejoin_token, m.rec.stream_socket = m.rejoin_token, m.to.welcome.stream_socket if m.to.welcome else ""
        m.rec.protocol = m.to.protocol
        m.save_record()
        whole = asyncio.ensure_future(_run_target(m, fill))
        await uncancellable(whole, told=lambda: m.progress(Finishing(m.target)))
    except BaseException as e:      # every end, an interrupt too, is settled by the target's verdict
        if whole is not None and whole.done() and not whole.cancelled() and whole.exception() is None:
            m.stages.to(Stage.MOVED)     # interrupted once it was whole: the move is done all the same
            raise
        if not await asyncio.shield(postcopy.settle(m, e)):
            raise rolled_back(m, e) from None


async def _run_target(m: Move, fill: bool) -> None:
    """The target's copy runs (a fill's once every page is on its host: the agent waits),
    until it has every page."""
    running_at = await resume_target(m, lazy=not fill)
    stop_for_tests("running")
    if fill:
        m.stages.to(Stage.FILL)
        await postcopy.fill(m, running_at)
    else:
        m.stages.to(Stage.POSTCOPY)
        await postcopy.postcopy(m, running_at)


async def switch_over(m: Move) -> None:
    """Stop-and-copy's commit, once marked: the source's copy is given up, the target's
    runs, and what is left of the source's goes. Nothing cuts it short: cut between the
    first two, it would leave the only copy stopped (an interrupt then ends a move that is
    done).

    A container's copy goes after the Resume, not before: given up by the mark, it stays
    paused (podman's, checkpointed) and quiet, so it can neither run nor answer, and its
    removal (its links, the runtime's delete: most of the 0.2 s from the restore's end to
    the Resume in the lab) was downtime. Its record stays until it is gone: `livemig
    recover`, finding it given up and standing, ends it once the target's copy runs. A tree
    goes at its release, before the Resume: CRIU, told, kills it (its journal, which CRIU reads
    should we vanish, must say "committed" before the target's copy may run); CRIU's exit and
    the network lock it leaves are waited for after."""
    m.report.warnings += await m.w.release(m.final, False)
    stop_for_tests("released")
    try:
        await resume_target(m)
    except BaseException as e:  # noqa: BLE001 (however it failed, the target's copy is stranded)
        if m.w.gone_at_release:
            m.report.warnings += await m.w.remove(m.final)     # what CRIU leaves of a tree
        # (a container's copy stays, given up: recover ends it once the target's runs, or, should
        # the target be lost, runs it again by the operator's word)
        raise stranded(m, e) from None
    stop_for_tests("running")
    m.report.warnings += await m.w.remove(m.final)
    recovery.drop(m.work)
    m.stages.to(Stage.MOVED)


async def resume_target(m: Move, lazy: bool = False) -> float:
    """The target's copy runs: the downtime ends here, and its parts are told."""
    resumed = await m.to.request(p.Resume(packets=replay.packed(m.take_packets().packets)), p.Resumed)
    m.report.packets_replayed = resumed.given
    running_at = time.monotonic()
    frozen_at = m.final.frozen_at
    m.report.downtime_seconds = running_at - frozen_at
    # a fill's Resume waits, on the target, for the pages still on their way
    marks = [("dump", m.dumped_at), ("images", m.images_at), ("restore", m.restored_at),
             ("pages and resume" if m.fills else "resume", running_at)]
    since = frozen_at
    for name, at in marks:
        m.report.downtime_parts.append(DowntimePart(name, at - since))
        since = at
    m.progress(Running(resumed.pids, lazy))
    return running_at


def note_final_stats(m: Move) -> None:
    """Stop-and-copy's final dump as CRIU counted it (a lazy dump's counters are zeros:
    postcopy.py counts what crossed instead)."""
    st = m.w.stats(m.work / "final")
    if st:
        m.report.rounds[-1].pages_written = st.pages_written
        m.report.rounds[-1].frozen_seconds = st.frozen_time
        m.report.final_dump_frozen_seconds = st.frozen_time


async def after_move(m: Move) -> None:
    """The target's copy runs, whole, and the source's is gone: what is left is tidying."""
    if not m.to.ended:
        await owners.hand_over(m)
        await m.to.finish()
    bundles.remove_source_bundle(m)
