"""The zstd level of a move's streams, chosen from what is measured (issue 34).

Every byte livemig sends is zstd-compressed (streams.CompressedWriter). A low level costs the
source's CPU little and sends more bytes; a high one sends fewer and costs more. Which one moves
the workload sooner depends on the link: on the lab's veth (gigabytes a second) the CPU is the
bottleneck and level 1 wins; on 100 Mbit/s the link is, and level 1 put 1.7 times the seeds'
bytes on it (their tar's level 3: bench/results/2026-12-06T10-51-47.json). So a move measures
both before it sends anything: the link's rate (with incompressible bytes, as the estimate does),
and, on a contiguous sample of the workload's own memory, each candidate level's ratio and speed,
compressed as the streams do it (in writes of a MiB, each flushed). The level that sends the most
of the workload's bytes a second wins: the lesser of what this CPU compresses and what the link
carries once compressed. A higher level must beat a lower one by a margin (SIZES.compression_gain):
its CPU is taken from the workload and from CRIU, which share the source's cores.

A sample spread page by page over the memory would miss what a stream's window finds: pages
that repeat others a few MiB away (measured on memcounter: level 9 sent 0.10 of its bytes in a
stream, 0.48 of the same pages sampled apart). So the sample is contiguous.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import zstandard

WRITE = 1 << 20     # the streams' writes, each flushed (CompressedWriter with flush=True)


@dataclass(frozen=True)
class Measured:
    """One level on the sample."""
    level: int
    ratio: float              # wire bytes per raw byte
    bytes_per_s: float        # raw bytes this CPU compresses a second, one thread

    def rate(self, link_bytes_per_s: float) -> float:
        """Raw bytes a second a stream at this level sends: the CPU's pace or the link's."""
        return min(self.bytes_per_s, link_bytes_per_s / max(self.ratio, 1e-9))


@dataclass(frozen=True)
class Choice:
    level: int
    ratio: float              # the sample's, at that level: what the estimate counts on the wire
    why: str


def measure(sample: bytes, levels: tuple[int, ...]) -> list[Measured]:
    """Each level's ratio and speed on sample, compressed as the streams compress."""
    out = []
    for level in levels:
        comp = zstandard.ZstdCompressor(level=level).compressobj()
        wire = 0
        t = time.perf_counter()
        for at in range(0, len(sample), WRITE):
            wire += len(comp.compress(sample[at:at + WRITE])) + len(comp.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        wire += len(comp.flush())
        seconds = max(time.perf_counter() - t, 1e-6)
        out.append(Measured(level, wire / max(len(sample), 1), len(sample) / seconds))
    return out


def choose(measured: list[Measured], link_bytes_per_s: float, gain: float) -> Choice:
    """The level that sends the workload soonest over the link; a higher one only if it sends
    gain times the raw bytes a second of the best lower one. measured: by level, lowest first."""
    best = measured[0]
    for m in measured[1:]:
        if m.rate(link_bytes_per_s) >= gain * best.rate(link_bytes_per_s):
            best = m
    bound = "the link" if best.rate(link_bytes_per_s) < best.bytes_per_s else "this CPU"
    others = ", ".join(f"{m.level}: {m.ratio:.2f} at {m.bytes_per_s / 2**20:.0f} MiB/s" for m in measured)
    return Choice(best.level, best.ratio,
                  f"zstd level {best.level}: the link carries {link_bytes_per_s / 2**20:.0f} MiB/s, and on a sample of "
                  f"the workload's memory each level came to (ratio, this CPU's pace) {others}; level {best.level} "
                  f"sends the most of it a second, about {best.rate(link_bytes_per_s) / 2**20:.0f} MiB/s, bound by {bound}")
