"""The streams' zstd level, chosen from the link's rate and the CPU's (livemig/wire/compression.py,
livemig/source/compressing.py): real zstd on real bytes; the rates given, so that no figure here
depends on this machine's speed."""

from __future__ import annotations

import os

from livemig.source import compressing
from livemig.wire.compression import Measured, choose, measure

MiB = 2**20


def test_a_stream_s_window_finds_what_repeats_a_few_mib_away_and_so_does_the_measure():
    # 2 MiB of random bytes, then the same again: level 1's window (512 KiB) never reaches back
    # that far, level 9's (8 MiB) does, as the streams would find it in the workload's memory
    block = os.urandom(2 * MiB)
    by_level = {m.level: m for m in measure(block + block, (1, 9))}
    assert by_level[1].ratio > 0.95
    assert by_level[9].ratio < 0.55
    assert all(m.bytes_per_s > 0 for m in by_level.values())


def test_a_fast_link_keeps_the_fastest_level_and_a_slow_one_takes_the_one_that_sends_the_most():
    levels = [Measured(1, 0.50, 1000 * MiB), Measured(3, 0.33, 600 * MiB), Measured(9, 0.10, 200 * MiB)]
    # 2 GiB/s of link: level 1 sends 1000 MiB/s of memory, bound by the CPU; the others less
    fast = choose(levels, 2048 * MiB, gain=1.1)
    assert fast.level == 1 and "bound by this CPU" in fast.why
    # 100 MiB/s: level 1 sends 200 MiB/s, level 3 about 300, level 9 200 (its CPU): level 3
    assert choose(levels, 100 * MiB, gain=1.1).level == 3
    # 10 MiB/s: level 9 sends 100 MiB/s of memory, ten times level 1's 20
    slow = choose(levels, 10 * MiB, gain=1.1)
    assert slow.level == 9 and slow.ratio == 0.10 and "bound by the link" in slow.why


def test_a_higher_level_must_pay_for_its_cpu_by_the_margin():
    close = [Measured(1, 0.50, 1000 * MiB), Measured(3, 0.47, 600 * MiB)]
    # at 100 MiB/s level 3 sends 213 MiB/s against level 1's 200: under 10 % more, so level 1
    assert choose(close, 100 * MiB, gain=1.1).level == 1
    assert choose(close, 100 * MiB, gain=1.0).level == 3


def test_the_sample_is_the_tree_s_memory_read_in_one_piece():
    mine = bytearray(os.urandom(64 * MiB))      # present, private, one mapping: this process's longest stretch
    sample = compressing._sample([os.getpid()], 2 * MiB)
    assert len(sample) == 2 * MiB
    # a piece of it, whole, in its order (past the first page, which begins with the allocator's header)
    assert sample[4096:] in bytes(mine)
