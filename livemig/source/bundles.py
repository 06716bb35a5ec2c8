"""A container's files, beside its memory: its image (podman's), if the target lacks it,
and its bundle, unless the target shares it. Both cross before anything stops; the
bundle's files changed since go at the transfer, and once moved the source's bundle goes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..progress import Copied
from ..runtimes import bundle
from ..wire import protocol as p
from ..wire import streams
from .move import Move


async def precopy_image(m: Move) -> None:
    """A container's image (podman's), if the target lacks it, before anything stops."""
    w = m.w
    if w.image is None or (m.to.facts is not None and m.to.facts.image_present):
        return
    meter = await m.to.load_image(w)
    m.report.image_bytes_wire = meter.wire
    m.progress(Copied("image", meter.raw, meter.wire))


async def precopy_bundle(m: Move) -> None:
    """A container's bundle, unless the target shares it: all of it now, the rest frozen;
    once (a trial restore sends it first, trial_run.py)."""
    root = m.w.bundle()
    if root is None or (m.to.facts is not None and m.to.facts.bundle == "shared") or m.bundle_copied_at is not None:
        return
    m.bundle_copied_at = time.time()
    index = m.work / "bundle.index"
    meter = await send_tree(m, root, None, [], index, running=True)
    m.bundle_sent = bundle.archived(index)
    m.report.bundle_bytes_wire += meter.wire
    m.progress(Copied("bundle", meter.raw, meter.wire))


async def send_changes(m: Move) -> streams.Meter | None:
    """At the transfer: the bundle's files changed since its pre-copy, and those deleted:
    what the pre-copy sent that is not there now (None: the bundle did not move). The
    container is stopped: what is there now stays so."""
    root = m.w.bundle()
    if m.bundle_copied_at is None or root is None:
        return None
    now = bundle.listing(root)
    return await send_tree(m, root, m.bundle_copied_at, sorted(m.bundle_sent - now))


async def send_tree(m: Move, root: Path, newer_than: float | None, deleted: list[str],
                    index: Path | None = None, running: bool = False) -> streams.Meter:
    _, meter = await m.to.push(
        lambda w: bundle.send(root, w, m.options.compression_level, newer_than, index, running),
        lambda tok: p.ReceiveTree(path=str(root), stream=tok, deleted=deleted), p.TreeReceived)
    return meter


def remove_source_bundle(m: Move) -> None:
    """The bundle moved with the container, unless shared; a tree with mounts in it
    may hold someone else's data, and stays."""
    root = m.w.bundle()
    if root is None or m.bundle_copied_at is None:
        return
    if bundle.mounts_under(root):
        m.report.warnings.append(f"the bundle {root} stays here: file systems are mounted in it")
        return
    shutil.rmtree(root, ignore_errors=True)
