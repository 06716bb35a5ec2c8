"""How hard the move compresses what it sends: the zstd level, chosen before anything crosses
(the measure and the choice: wire/compression.py), unless the user set one."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

from .. import host
from ..options import SIZES
from ..pages import pagehash
from ..wire import compression
from . import downtime
from .move import Move


async def choose(m: Move) -> None:
    """m's streams' level, from the link's rate and this CPU's on a sample of the workload's
    memory; told in the report (compression_level, compression_reason)."""
    level = m.options.compression_level
    why = f"zstd level {level}: set by --compression-level or the configuration"
    if not level:
        pids = m.w.pids()
        sample = b""
        if host.resident_bytes(pids) >= SIZES.compression_least_bytes:
            sample = await asyncio.to_thread(_sample, pids, SIZES.compression_sample_bytes)
        if len(sample) < SIZES.compression_sample_bytes // 2:
            level, why = 1, (f"zstd level 1, the fastest: under {SIZES.compression_least_bytes >> 20} MiB of "
                             "memory (or too little of it in one piece to sample), no slower level pays for itself")
        else:
            link = await downtime.link_rate(m)
            measured = await asyncio.to_thread(compression.measure, sample, SIZES.compression_levels)
            choice = compression.choose(measured, link, SIZES.compression_gain)
            level, why = choice.level, choice.why
        m.options = m.to.options = replace(m.options, compression_level=level)
    m.report.compression_level, m.report.compression_reason = level, why


def _sample(pids: list[int], size: int) -> bytes:
    """Up to size bytes of the tree's private memory, its longest stretches first, each read
    whole (what a stream's window sees: wire/compression.py)."""
    out = bytearray()
    for length, pid, at in sorted(((b - a, pid, a) for pid, a, b in pagehash.tree_runs(pids)), reverse=True):
        want = min(length, size - len(out))
        if want <= 0:
            break
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError:     # gone meanwhile: the next stretch
            continue
        try:
            out += os.pread(fd, want, at)
        except OSError:     # unmapped meanwhile: the next stretch
            pass
        finally:
            os.close(fd)
    return bytes(out)
