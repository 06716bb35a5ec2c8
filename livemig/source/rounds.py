"""One pre-copy round, of either kind: CRIU's pre-dump (soft-dirty tracking), or the
tree's pages read here and sent by hash (pagehash.py: where the kernel tracks no dirty
pages). Each returns what precopy.py's loop decides on: (its stats, what it sent,
seconds, when it began)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from .. import criu, proc
from ..errors import DumpError, LivemigError, Phase
from ..pages import frames, pagemap, shmem
from ..progress import Cautioned
from ..report import RoundReport
from ..runtimes.process import criu_failure
from ..wire import protocol as p
from ..wire import streams
from .local import by_pid
from .move import Move
from .session import token

Round = tuple[criu.DumpStats, streams.Meter, float, float]


async def hashed_round(m: Move) -> Round:
    """One round of pre-copy by hashes: every page of the tree whose content changed
    since the target got it (all of them, the first time), and of its shared memory, into
    the target's store."""
    tracker = m.tracker
    if tracker is None:
        raise LivemigError("pre-copy by hashes without a tracker", phase=Phase.PRECOPY)
    meter, level = streams.Meter(), m.options.compression_level
    t0 = time.monotonic()

    async def send(writer: asyncio.StreamWriter) -> int:
        out, pages = streams.CompressedWriter(writer, meter, level), 0
        tree = by_pid(m.w)
        # (post-copy's rounds pre-copy the shared memory alone: shared_memory_first)
        for pid, vpid in tree.items() if m.fills else ():
            # what a child shares with its parent copy-on-write is sent once, as the parent's
            parent = proc.parent_of(pid)
            try:
                for run in tracker.scan(pid, vpid, parent if parent in tree else None):
                    await out.write(frames.frame(frames.PAGES, run.vpid, run.vaddr, run.pages)
                                    + run.data, flush=False)
                    pages += run.pages
            except (FileNotFoundError, ProcessLookupError):
                continue      # it exited: the final dump knows what became of it
        # the tree's shared memory, each object once however many map it (pages/shmem.py)
        for run in shmem.scan(tracker, m.shmem_keys, list(tree)):
            await out.write(frames.frame(frames.PAGES, run.vpid, run.vaddr, run.pages) + run.data, flush=False)
            pages += run.pages
        await out.write(frames.frame(frames.PUSHED_ALL, 0, 0, pages), flush=True)
        await out.close()
        return pages

    stored, pages = await m.to.push(send, lambda tok: p.StorePages(stream=tok), p.PagesStored)
    if stored.held != tracker.pages:
        # found now, not at the fill: the final dump would name pages the target lacks
        raise LivemigError(f"the target's store holds {stored.held} pages of the {tracker.pages} pre-copy "
                           "sent it", phase=Phase.PRECOPY, host=m.target)
    seconds = time.monotonic() - t0
    for vpid, why in tracker.unwatched.items():
        said = f"process {vpid} of the tree is compared by page hashes, not watched for writes: {why}"
        if said not in m.report.warnings:
            m.report.warnings.append(said)
            m.progress(Cautioned(said))
    # ("hashes" either way: what was read is sent by digest; precopy_tracking says how it was found)
    m.report.rounds.append(RoundReport("hashes", pages, meter.raw, meter.wire, 0.0, seconds))
    return criu.DumpStats(pages_written=pages), meter, seconds, t0


async def predump_round(m: Move, n: int, lazy_final: bool) -> Round:
    """One round of CRIU's pre-dump (soft-dirty)."""
    w = m.w
    name, parent = f"pre-{n}", m.parent
    local = m.work / name
    local.mkdir(mode=0o700)
    tok = token()
    if w.streams_pages:
        await m.to.request(p.OpenPageServer(dir=name, stream=tok, parent=parent), p.Done)
    t0 = time.monotonic()
    run = await w.pre_dump(local, parent)
    easing = None
    if m.throttle is not None and m.throttle.current is not None:
        easing = asyncio.create_task(m.throttle.eased_while_held(w.root_pid, run.proc.wait()))
    try:
        sock = await run.pages()
        relayed = await m.to.relay(sock, tok) if sock else None
        rc = await run.proc.wait()
        err = await run.proc.stderr.read() if rc and run.proc.stderr else b""
        if easing is not None:
            await easing
    finally:
        await proc.kill(run.proc)
        run.close()
        if easing is not None and not easing.done():
            easing.cancel()
            await asyncio.wait({easing})
    if rc != 0:
        raise DumpError(criu_failure(f"{w.kind} pre-dump", rc, run.log, err), phase=Phase.PRECOPY)
    if w.streams_pages:
        await m.to.request(p.AwaitPageServer(dir=name), p.PageServerDone)
        if relayed is None:
            raise DumpError(f"{w.kind} pre-dump served no pages", phase=Phase.PRECOPY)
        sent = relayed.sent
    else:
        sent = await m.to.send_images(name, parent, local)
    seconds = time.monotonic() - t0
    if lazy_final:
        await _fetch_pagemaps(m, name, local)
    st = w.stats(local) or criu.DumpStats()
    m.round_dirs.append(name)
    m.report.rounds.append(RoundReport("pre-dump", st.pages_written, sent.raw, sent.wire, st.frozen_time, seconds))
    return st, sent, seconds, t0


async def _fetch_pagemaps(m: Move, name: str, local: Path) -> None:
    """The round's pagemaps as the target holds them: a lazy final dump names its pages from them."""
    tok = token()
    reader, _ = await m.to.stream(tok)
    receiving = asyncio.create_task(pagemap.receive(reader, local))     # checked: CRIU reads them as root
    await m.to.request(p.SendPagemaps(dir=name, stream=tok), p.FilesReceived)
    await receiving
